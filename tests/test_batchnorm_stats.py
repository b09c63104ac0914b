"""BatchNorm population statistics (coatnet_jax/batchnorm_stats.py) against a brute-force reference.

The reference records, with flax's method interceptor, the input of every BatchNorm call while the
same batches pass through the network in train mode, concatenates them over all batches and takes
numpy's mean and (biased) variance over examples and positions. The recalibrator must give the
same numbers through its sharded jit step on a 2-device mesh (a subprocess with two fake CPU
devices), and its batches must be the train split through the eval view (no augmentation).
"""

import os
import subprocess
import sys

import flax
import flax.linen as nn
import jax
import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NUM_BATCHES = 3


def _config():
  from configs import quickstart  # pylint: disable=g-import-not-at-top
  c = quickstart.get_config()
  c.data.image_size = 16
  c.data.max_shift = 2  # Augmentation the statistics must NOT see.
  c.batch_size = 8
  c.model.drop_path_rate = 0.2  # Stochastic depth the statistics must NOT see.
  c.batchnorm_batches = NUM_BATCHES
  c.mesh.data, c.mesh.fsdp = -1, 1
  return c


def _brute_force(config, variables, num_classes):
  """{BatchNorm path: (mean, var)} by numpy over every recorded input of every batch."""
  from coatnet_jax import input_pipeline, steps  # pylint: disable=g-import-not-at-top
  model = steps.build_model(_without_drop_path(config), num_classes)
  batches = input_pipeline.batchnorm_iterator(config.data, config.batch_size, seed=config.seed)
  seen = {}

  def record(next_fun, args, kwargs, context):
    if isinstance(context.module, nn.BatchNorm) and context.method_name == '__call__':
      seen.setdefault(context.module.path, []).append(np.asarray(args[0], np.float64))
    return next_fun(*args, **kwargs)

  for _ in range(NUM_BATCHES):
    batch = next(batches)
    with nn.intercept_methods(record):
      model.apply(variables, steps.normalize(batch['image']), train=True,
                  mutable=['batch_stats'])
  out = {}
  for path, xs in seen.items():
    x = np.concatenate(xs)
    axes = tuple(range(x.ndim - 1))
    out[path] = (x.mean(axes), x.var(axes))
  return out


def _without_drop_path(config):
  c = config.copy_and_resolve_references()
  c.model.drop_path_rate = 0.0
  return c


def check_on_mesh():
  """Run in a subprocess with 2 CPU devices: recalibrated statistics == the brute force."""
  from coatnet_jax import batchnorm_stats, sharding, steps  # pylint: disable=g-import-not-at-top
  assert jax.device_count() == 2
  config = _config()
  mesh = sharding.make_mesh(config.mesh)
  assert mesh.devices.size == 2
  model = steps.build_model(config, 10)
  _, tx = steps.build_optimizer(config, 1000)
  init_fn = steps.make_init_fn(config, model, tx)
  shardings = sharding.tree_shardings(jax.eval_shape(init_fn), mesh, config.sharding)
  state = jax.jit(init_fn, out_shardings=shardings)()
  recal = batchnorm_stats.Recalibrator(
      config, steps.build_model(batchnorm_stats.recalibration_config(config), 10), mesh, shardings)
  got = recal(state.params, state.batch_stats)
  assert jax.tree.structure(got) == jax.tree.structure(state.batch_stats)
  got = flax.traverse_util.flatten_dict(jax.device_get(got))
  running = flax.traverse_util.flatten_dict(jax.device_get(state.batch_stats))
  params = jax.device_get(state.params)
  want = _brute_force(config, {'params': params, 'batch_stats': jax.device_get(state.batch_stats)},
                      10)
  assert len(want) >= 4, sorted(want)
  for path, (mean, var) in want.items():
    np.testing.assert_allclose(got[path + ('mean',)], mean, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(got[path + ('var',)], var, rtol=1e-3, atol=1e-5)
    # Not a comparison the running averages (at init: mean 0, variance 1) would pass.
    assert not np.allclose(running[path + ('var',)], var, rtol=1e-2, atol=1e-3)
  # Twice the same: the same batches at every call (what a resumed run relies on).
  again = flax.traverse_util.flatten_dict(jax.device_get(recal(state.params, state.batch_stats)))
  assert all(np.array_equal(again[k], got[k]) for k in got)
  print('checked', len(want), 'BatchNorm layers')


def test_recomputed_statistics_equal_brute_force_population_on_a_2_device_mesh():
  env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS='cpu',
             XLA_FLAGS='--xla_force_host_platform_device_count=2')
  proc = subprocess.run([sys.executable, os.path.abspath(__file__)], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=900)
  assert proc.returncode == 0, proc.stderr[-5000:]
  assert 'checked' in proc.stdout


def test_batchnorm_batches_are_the_eval_view_of_the_train_split():
  """Digits: the batches hold the unshifted train images (eval pixels), in the train order."""
  from coatnet_jax import input_pipeline  # pylint: disable=g-import-not-at-top
  from coatnet_jax.data import digits  # pylint: disable=g-import-not-at-top
  config = _config()
  images, _ = digits.arrays(16, 'train')
  recal = next(input_pipeline.batchnorm_iterator(config.data, 8, seed=0))
  train = next(input_pipeline.train_iterator(config.data, 8, seed=0))
  np.testing.assert_array_equal(recal['label'], train['label'])
  rows = {im.tobytes() for im in images}
  assert all(im.tobytes() in rows for im in recal['image'])
  assert not all(im.tobytes() in rows for im in train['image'])  # The train view is shifted.


if __name__ == '__main__':
  sys.path.insert(0, ROOT)
  check_on_mesh()
