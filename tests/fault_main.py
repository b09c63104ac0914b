"""The real ``coatnet_jax.main``, with optional fault injection.

Used by test_faults as ``python tests/fault_main.py --config tests/tiny_quickstart.py:smoke ...``. ``COATNET_TEST_NAN_FROM=K`` makes the learning rate NaN from
optimizer step K on (a divergence the trainer must catch, naming step K + 1, saving nothing NaN). ``COATNET_TEST_SAVE_TIMEOUT_S`` shortens the bound on a checkpoint wait.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax.numpy as jnp  # pylint: disable=g-import-not-at-top

from coatnet_jax import checkpointing, main, optim

if os.environ.get('COATNET_TEST_NAN_FROM'):
  _nan_from = int(os.environ['COATNET_TEST_NAN_FROM'])
  _make_schedule = optim.make_schedule

  def _nan_schedule(*args, **kwargs):
    schedule = _make_schedule(*args, **kwargs)
    return lambda step: jnp.where(step >= _nan_from, jnp.nan, schedule(step))

  optim.make_schedule = _nan_schedule

if os.environ.get('COATNET_TEST_SAVE_TIMEOUT_S'):
  checkpointing.WAIT_TIMEOUT_S = float(os.environ['COATNET_TEST_SAVE_TIMEOUT_S'])

if __name__ == '__main__':
  main.run()
