r"""Evaluates a checkpoint on a split, exactly (every example once), at its own or another size.

  python -m coatnet_jax.evaluate --workdir DIR [--res 384] [--split validation] [--data_dir D]
      [--dtype float32|bfloat16]

The config is the one saved with the checkpoint (model, data, eval protocol), so the numbers are
those the run itself would report; ``--res`` resizes the relative-bias tables (bilinear) and the
images, ``--split``/``--data_dir`` point at other data, ``--weights`` picks the EMA or raw
parameters (default: EMA when the run kept them). Prints one ``key value`` line per metric and,
last, the same as one JSON object.
"""

import json

from coatnet_jax import cli  # pylint: disable=g-bad-import-order  (first: quiet start-up)
from absl import flags
from absl import logging
import jax

from coatnet_jax import errors
from coatnet_jax import input_pipeline
from coatnet_jax import models
from coatnet_jax import pretrained
from coatnet_jax import sharding
from coatnet_jax import steps

_WORKDIR = flags.DEFINE_string('workdir', None, 'A run\'s workdir (or an import_timm --out).')
_STEP = flags.DEFINE_integer('step', 0, 'Checkpoint step; 0: the newest complete one.')
_RES = flags.DEFINE_integer('res', 0, 'Evaluate at this resolution; 0: the run\'s own.')
_SPLIT = flags.DEFINE_string('split', None, 'Eval split; default: the run\'s eval split.')
_DATASET = flags.DEFINE_string('dataset', None, 'data.name; default: the run\'s dataset.')
_DATA_DIR = flags.DEFINE_string('data_dir', None, 'data.data_dir; default: the run\'s.')
_BATCH = flags.DEFINE_integer('batch_size', 0, 'Global eval batch; 0: the run\'s.')
_WEIGHTS = flags.DEFINE_enum('weights', 'auto', ['auto', 'ema', 'params'],
                             'auto: the EMA parameters when the run kept them.')
_DTYPE = flags.DEFINE_enum('dtype', None, ['float32', 'bfloat16'],
                           'Compute dtype; default: the run\'s (model.dtype).')
flags.mark_flags_as_required(['workdir'])


def eval_config(pre: pretrained.Pretrained, res=0, split=None, dataset=None, data_dir=None,
                batch_size=0, dtype=None):
  """The source run's config with the evaluation overrides applied."""
  config = pre.config
  if dtype:
    config.model.dtype = dtype
  if res:
    config.data.image_size = res
  if dataset:
    config.data.name = dataset
  if split:
    config.data.eval_split = split
  if data_dir:
    config.data.data_dir = data_dir
  if batch_size:
    config.eval_batch_size = batch_size
  return config


def evaluate(pre: pretrained.Pretrained, config) -> dict:
  """Exact metrics of ``pre`` on ``config.data``'s eval split over every local device."""
  num_classes = pre.num_classes
  model = steps.build_model(config, num_classes)
  variables = pretrained.adapt(pre, model, config.data.image_size, num_classes)
  # The BatchNorm-folded network (models/fold.py): the same metrics with fewer passes.
  variables, model = models.fold_batchnorm(model, variables), models.folded_model(model)
  mesh = sharding.make_mesh({'data': -1, 'fsdp': 1})
  batch = config.eval_batch_size or config.batch_size
  batch = -(-batch // mesh.devices.size) * mesh.devices.size
  rep = sharding.replicated(mesh)
  eval_step = jax.jit(steps.make_eval_step(config, model, num_classes),
                      in_shardings=(rep, rep, sharding.batch_sharding(mesh)), out_shardings=rep)
  params = jax.device_put(variables['params'], rep)
  batch_stats = jax.device_put(variables.get('batch_stats', {}), rep)
  info = input_pipeline.get_info(config.data)
  batches = input_pipeline.eval_iterator(config.data, batch, process_index=jax.process_index(),
                                         process_count=jax.process_count())
  results = steps.evaluate(eval_step, params, batch_stats, batches, mesh, config.loss.kind,
                           info.class_names)  # Confusion counts by class name, as in training.
  if results['count'] != info.eval_size:
    raise RuntimeError(f'Evaluated {results["count"]} examples; the split has {info.eval_size}.')
  return results


def main(argv):
  if len(argv) > 1:
    raise errors.UserError(f'unexpected arguments: {" ".join(argv[1:])}')
  pre = pretrained.read(_WORKDIR.value, _STEP.value or None, _WEIGHTS.value != 'params')
  if _WEIGHTS.value == 'ema' and pre.weights != 'ema':
    raise pretrained.InitError(f'{pre.path} kept no EMA parameters; use --weights=params.')
  config = eval_config(pre, _RES.value, _SPLIT.value, _DATASET.value, _DATA_DIR.value,
                       _BATCH.value, _DTYPE.value)
  results = evaluate(pre, config)
  results = {'step': pre.step, 'weights': pre.weights, 'res': config.data.image_size,
             'split': config.data.eval_split, **results}
  logging.info('Evaluated %s: %s', pre.path, results)
  if jax.process_index() == 0:
    for k, v in results.items():
      print(f'{k} {v:.6g}' if isinstance(v, float) else f'{k} {v}')
    print(json.dumps(results))


if __name__ == '__main__':
  cli.run(main, user_errors=(OSError, ValueError))
