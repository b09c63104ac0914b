"""Pre-trained weights in: another run's (or an imported model's) parameters, fitted to this run.

``config.init.path`` names a workdir of any earlier run (pre-training, or
``tools.import_timm --out``), its ``checkpoints`` directory, or one step directory of it. Only the
model is read: ``params`` (or the EMA parameters, when the source kept them and
``config.init.use_ema``) and ``batch_stats``; never its optimizer, step or data position, because a
fine-tune starts its own schedule at step 0 (paper Sec. 4.1).

Fitting (``adapt``), as the paper's fine-tuning at 384 and 512 does: every relative-bias table is
resized to the new resolution by bilinear interpolation (``models.resize_variables``), and the
classifier is kept when the class count is the same, else replaced by a zero-initialised one (for
example 21,841 -> 1,000). Every other leaf must match in path and shape: the source must be the same
variant with the same architecture switches, which is checked before anything is written.

The same reader serves ``evaluate``, ``tools.export`` and ``predict``, which take a workdir too.
"""

import dataclasses
import os
from typing import Any, Optional

from absl import logging
import flax
import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp

from coatnet_jax import architecture
from coatnet_jax import checkpointing
from coatnet_jax import errors
from coatnet_jax import models

HEAD = 'classifier'  # The one module whose shape follows the class count.


class InitError(errors.UserError):
  """A pre-trained source that cannot serve this run; the message is one line."""


@dataclasses.dataclass
class Pretrained:
  variables: dict  # {'params': ..., 'batch_stats': ...} of numpy arrays.
  metadata: dict  # The source checkpoint's metadata (model, architecture, classes, config, ...).
  step: int
  path: str  # The step directory read.
  weights: str  # 'ema' or 'params': which parameters were read.

  @property
  def num_classes(self) -> int:
    return int(self.metadata['num_classes'])

  @property
  def config(self) -> ml_collections.ConfigDict:
    """The source run's config as saved (plain values), over the base config's defaults."""
    from configs import common  # pylint: disable=g-import-not-at-top  (configs imports models)
    return common.with_defaults(self.metadata.get('config') or {})


def locate(path: str, step: Optional[int] = None) -> tuple[str, int]:
  """(workdir, step) of the checkpoint ``path`` names: the newest intact step unless ``step``."""
  path = os.path.abspath(path.rstrip('/'))
  base = os.path.basename(path)
  if base.isdigit() and os.path.basename(os.path.dirname(path)) == checkpointing.CHECKPOINTS:
    workdir, step = os.path.dirname(os.path.dirname(path)), step or int(base)
  elif base == checkpointing.CHECKPOINTS:
    workdir = os.path.dirname(path)
  else:
    workdir = path
  if not os.path.isdir(checkpointing.checkpoint_dir(workdir)):
    raise InitError(f'{path} holds no checkpoints (no {checkpointing.CHECKPOINTS}/ directory); '
                    f'give the workdir of a finished run or the --out directory of '
                    f'python -m coatnet_jax.tools.import_timm.')
  if not step:
    step = checkpointing.latest_complete_step(workdir)
    if step is None:
      raise InitError(f'{checkpointing.checkpoint_dir(workdir)} holds no complete checkpoint.')
  step_dir = os.path.join(checkpointing.checkpoint_dir(workdir), str(step))
  if not os.path.isdir(step_dir):
    raise InitError(f'{workdir} has no checkpoint of step {step}.')
  return workdir, int(step)


def read_metadata(path: str, step: Optional[int] = None) -> tuple[dict, str, int]:
  """(metadata, workdir, step) without reading any array."""
  workdir, step = locate(path, step)
  try:
    return checkpointing.read_metadata(workdir, step), workdir, step
  except (OSError, ValueError) as e:
    raise InitError(f'Unreadable metadata of step {step} in {workdir}: '
                    f'{errors.describe(e)}') from e


def read(path: str, step: Optional[int] = None, use_ema: bool = True) -> Pretrained:
  """The model variables of a checkpoint, as numpy arrays on the host (every process reads)."""
  metadata, workdir, step = read_metadata(path, step)
  state_dir = os.path.join(checkpointing.checkpoint_dir(workdir), str(step), 'state')
  checkpointer = ocp.Checkpointer(ocp.PyTreeCheckpointHandler())
  try:
    saved = checkpointer.metadata(state_dir).item_metadata.tree
  except Exception as e:  # pylint: disable=broad-except
    raise InitError(f'Unreadable checkpoint {state_dir}: {errors.describe(e)}') from e
  is_leaf = lambda x: hasattr(x, 'shape')  # pylint: disable=unnecessary-lambda-assignment
  weights = 'ema' if use_ema and _has_arrays(saved.get('ema_params')) else 'params'
  key = 'ema_params' if weights == 'ema' else 'params'
  item = jax.tree.map(lambda m: np.zeros(m.shape, m.dtype),
                      {key: saved[key], 'batch_stats': saved.get('batch_stats') or {}},
                      is_leaf=is_leaf)
  restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), item)
  try:
    out = checkpointer.restore(state_dir, args=ocp.args.PyTreeRestore(
        item=item, restore_args=restore_args, partial_restore=True))
  except Exception as e:  # pylint: disable=broad-except
    raise InitError(f'Reading {state_dir} failed: {errors.describe(e)}') from e
  variables = {'params': out[key], 'batch_stats': out.get('batch_stats') or {}}
  return Pretrained(variables, metadata, step, os.path.dirname(state_dir), weights)


def timm_architecture(path: Optional[str], variant: str) -> tuple[str, dict]:
  """(model name, switches) a config's ``:timm`` builds: those saved in ``path`` (an
  ``import_timm --out``), so any timm model fits; without a path, ``variant`` with the switches of
  timm's paper-config models."""
  if not path:
    return variant, dataclasses.asdict(models.TIMM_OPTIONS)
  metadata, _, _ = read_metadata(path)
  saved = architecture.of_metadata(metadata)
  return saved.name, dataclasses.asdict(saved.options)


def _has_arrays(tree) -> bool:
  return bool(jax.tree.leaves(tree, is_leaf=lambda x: hasattr(x, 'shape')))


def check_compatible(metadata: dict, expected: dict, where: str) -> None:
  """Refuses (one line) a source that cannot be fitted to the run whose checkpoint metadata would
  be ``expected`` (``checkpointing.make_metadata``): another layout or other switches; the class
  count and image size may differ (``architecture.refusal``, lenient)."""
  problem = architecture.refusal(metadata, expected, where, fine_tune=True)
  if problem:
    raise InitError(problem)


def adapt(pre: Pretrained, model, image_size, num_classes: int) -> dict:
  """``pre.variables`` fitted to ``model`` at ``image_size``: tables resized, head kept or new."""
  params = flax.traverse_util.flatten_dict(pre.variables['params'])
  if num_classes != pre.num_classes:
    kernel = params[(HEAD, 'kernel')]
    params[(HEAD, 'kernel')] = np.zeros((kernel.shape[0], num_classes), kernel.dtype)
    params[(HEAD, 'bias')] = np.zeros((num_classes,), params[(HEAD, 'bias')].dtype)
    logging.info('New zero-initialised head: %d -> %d classes.', pre.num_classes, num_classes)
  variables = {'params': flax.traverse_util.unflatten_dict(params),
               'batch_stats': pre.variables['batch_stats']}
  try:
    out = models.resize_variables(model, variables, image_size)
  except ValueError as e:
    raise InitError(f'The checkpoint in {pre.path} does not fit this model: {e}') from e
  resized = sum(a.shape != b.shape for a, b in zip(
      jax.tree.leaves(variables['params']), jax.tree.leaves(out['params'])))
  if resized:
    logging.info('Resized %d relative-bias tables to %s px (bilinear).', resized, image_size)
  return out


def warm_start(state: Any, config, model, num_classes: int, shardings: Any):
  """A fresh train state whose model (and EMA) comes from ``config.init.path``."""
  init = config.init
  pre = read(init.path, init.step or None, init.use_ema)
  check_compatible(pre.metadata, checkpointing.make_metadata(config, num_classes, 0), init.path)
  variables = adapt(pre, model, config.data.image_size, num_classes)
  params = _put(variables['params'], state.params, shardings.params)
  batch_stats = _put(variables['batch_stats'], state.batch_stats, shardings.batch_stats)
  ema = None
  if state.ema_params is not None:
    ema = _put(variables['params'], state.ema_params, shardings.ema_params)
  logging.info('Fine-tuning from %s (step %d, %s weights, %d classes).', pre.path, pre.step,
               pre.weights, pre.num_classes)
  return state.replace(params=params, batch_stats=batch_stats, ema_params=ema)


def _put(values, like, shardings):
  """``values`` (numpy) placed like ``like`` (same tree, dtypes and shardings)."""
  try:
    return jax.tree.map(lambda v, l, s: jax.device_put(np.asarray(v, l.dtype), s),
                        values, like, shardings)
  except ValueError as e:
    raise InitError(f'The pre-trained variables do not match this model: {e}') from e
