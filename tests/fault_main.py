"""The real ``coatnet_jax.main``, with one optional fault injected.

Used by test_faults as ``python tests/fault_main.py --config tests/tiny_quickstart.py:smoke ...``.
``COATNET_TEST_NAN_FROM=K`` makes the learning rate NaN from optimizer step K on (a divergence the
trainer must catch, naming step K + 1, saving nothing NaN): no config can ask for that, so the
schedule is wrapped here, in this driver's own process only.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax.numpy as jnp  # pylint: disable=g-import-not-at-top

from coatnet_jax import main, optim

if os.environ.get('COATNET_TEST_NAN_FROM'):
  _nan_from = int(os.environ['COATNET_TEST_NAN_FROM'])
  _make_schedule = optim.make_schedule

  def _nan_schedule(*args, **kwargs):
    schedule = _make_schedule(*args, **kwargs)
    return lambda step: jnp.where(step >= _nan_from, jnp.nan, schedule(step))

  optim.make_schedule = _nan_schedule

if __name__ == '__main__':
  main.run()
