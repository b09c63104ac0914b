"""Helper for test_train: a tiny CoAtNet through ``train.train_and_evaluate`` on N CPU devices.

Run as ``XLA_FLAGS=--xla_force_host_platform_device_count=N python tests/tiny_run.py WORKDIR MESH``
(the flag must be set before JAX starts, hence a subprocess), or as several processes with
``... WORKDIR MESH PROCESS_ID NUM_PROCESSES PORT``. Process 0 writes ``WORKDIR/result.npz`` (the
final parameters) and ``result.json`` (exact eval counts next to a brute-force count, NaN guard).
"""

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # pylint: disable=g-import-not-at-top
import numpy as np

from coatnet_jax import checkpointing, input_pipeline, optim, sharding, steps, train
import tiny_quickstart  # pylint: disable=g-bad-import-order  (tests/, this script's directory)


def tiny_config(mesh):
  c = tiny_quickstart.get_config()
  c.model.drop_path_rate = 0.1
  c.batch_size = 32
  c.accum_steps = 2
  c.total_steps = 4
  c.eval_batch_size = 64
  c.optim.warmup_steps = 2
  # Structurally-zero gradients (a conv bias before BatchNorm) are pure float noise, which Adam's
  # 1/sqrt(v) would blow up to +-lr; a larger eps keeps the 1-vs-8-device comparison meaningful.
  c.optim.eps = 1e-3
  c.loss.mixup_alpha = 0.8
  c.loss.cutmix_alpha = 1.0
  c.ema.decay = 0.9
  c.log_every_steps = 1
  c.eval_every_steps = 0
  c.checkpoint_every_steps = 0
  c.tensorboard = False
  c.mesh.data, c.mesh.fsdp = mesh
  c.sharding.min_size = 64  # Shard even tiny arrays, so the fsdp path is exercised.
  return c


def main(workdir, mesh):
  config = tiny_config(mesh)
  results = train.train_and_evaluate(config, workdir)

  # Reload the final state and evaluate it again at other batch sizes, next to brute force.
  m = sharding.make_mesh(config.mesh)
  model = steps.build_model(config, 10)
  schedule, tx = steps.build_optimizer(config, 1438)
  abstract = jax.eval_shape(steps.make_init_fn(config, model, tx))
  shardings = sharding.tree_shardings(abstract, m, config.sharding)
  state, _ = checkpointing.restore_latest(workdir, abstract, shardings)
  sharded = [optim.path_str(p) for (p, _), s in zip(
      jax.tree_util.tree_leaves_with_path(state.params), jax.tree.leaves(shardings.params))
             if any(x is not None for x in s.spec)]

  from coatnet_jax.data import digits  # pylint: disable=g-import-not-at-top
  images, labels = digits.arrays(32, 'test')
  variables = {'params': jax.device_get(state.params),
               'batch_stats': jax.device_get(state.batch_stats)}
  logits = jax.jit(lambda v, x: model.apply(v, x, train=False))(
      variables, steps.normalize(images))  # All 359 at once: no padding, no mask.
  brute = int(np.sum(np.argmax(np.asarray(logits), -1) == labels))

  out = {'brute_correct': brute, 'eval_count': results['eval/count'],
         'eval_top1': results['eval/top1'], 'num_sharded': len(sharded)}
  for batch in (8,):
    step = jax.jit(steps.make_eval_step(config, model, 10))
    r = steps.evaluate(step, state.params, state.batch_stats,
                       input_pipeline.eval_iterator(config.data, batch,
                                                    process_index=jax.process_index(),
                                                    process_count=jax.process_count()),
                       m, 'softmax')
    out[f'count_{batch}'] = r['count']
    out[f'correct_{batch}'] = round(r['top1'] * r['count'])
  if m.devices.size == 1:
    out['nan_guard'] = _nan_guard(config, model, tx, schedule, m, state)
  if jax.process_index():
    return
  flat = {optim.path_str(p): np.asarray(v) for p, v in
          jax.tree_util.tree_leaves_with_path(jax.device_get(state.params))}
  np.savez(os.path.join(workdir, 'result.npz'), **flat)
  with open(os.path.join(workdir, 'result.json'), 'w') as f:
    json.dump(out, f)
  print(json.dumps(out))


def _nan_guard(config, model, tx, schedule, mesh, state):
  """A step whose loss is NaN returns the state it was given but for the optimizer moments (the
  step zeroes its update rather than select the whole state: steps.make_train_step), and the
  loop's check names it."""
  bad = config.copy_and_resolve_references()
  bad.loss.label_smoothing = float('nan')
  step = jax.jit(steps.make_train_step(bad, model, tx, schedule, 10, mesh))
  batch = next(input_pipeline.train_iterator(config.data, config.batch_size, seed=0))
  new_state, metrics = step(state, sharding.global_batch(batch, mesh))
  def kept(s):
    return jax.device_get(s.replace(opt_state=None))

  same = all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(kept(new_state)),
                                                  jax.tree.leaves(kept(state))))
  try:
    train._check_finite([(5, metrics['loss'], metrics['finite'])])  # pylint: disable=protected-access
    message = ''
  except train.NonFiniteLossError as e:
    message = str(e)
  return bool(np.isnan(metrics['loss']) and same and 'at step 5' in message)


if __name__ == '__main__':
  if len(sys.argv) > 3:
    jax.distributed.initialize(f'localhost:{sys.argv[5]}', int(sys.argv[4]), int(sys.argv[3]))
  main(sys.argv[1], tuple(int(x) for x in sys.argv[2].split(',')))
