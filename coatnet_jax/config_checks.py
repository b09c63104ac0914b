"""Every check of a config that can be made before the workdir is touched, in one place.

``check_inputs`` (the trainer's first call) runs ``missing_fields`` (the config's shape against
the base config), ``static_problems`` (the config alone), ``data_problems`` (with the dataset's
info), ``device_problems`` (with the device count) and ``resume_changes`` (with the config saved in
the newest checkpoint), and raises every problem at once as one ``errors.UserError``; ``main``
prints each as its own ``error:`` line and exits 1 with nothing written. A check here must be
cheap (no model init, no compile) and must name the field, the value and what to do.
"""

import json
import math
from typing import Optional

import jax
import ml_collections

from coatnet_jax import architecture
from coatnet_jax import checkpointing
from coatnet_jax import errors
from coatnet_jax import input_pipeline
from coatnet_jax import pretrained
from coatnet_jax import steps as steps_lib
from coatnet_jax import workdir_lock

# The values the trainer understands; anything else is refused before a byte is written.
DTYPES = ('float32', 'bfloat16')
LOSS_KINDS = ('softmax', 'sigmoid')
SCHEDULES = ('cosine', 'linear', 'constant')
MESH_AXES = ('data', 'fsdp')

# What a resume may change (dotted config fields, or prefixes ending in '.'): how the run is
# watched, saved, placed and where its data lies, never what it computes. total_steps and
# num_epochs may only grow (checked apart). Everything else (model, batch size, seed, optimizer,
# schedule, loss, data stream) is refused unless --config.allow_resume_changes=True.
RESUME_MAY_CHANGE = (
    'total_steps', 'num_epochs', 'log_every_steps', 'eval_every_steps', 'checkpoint_every_steps',
    'keep_checkpoints', 'best_metric', 'best_mode', 'eval_batch_size', 'classification_metrics',
    'tensorboard', 'profile_steps', 'compilation_cache_dir', 'async_checkpointing',
    'checkpoint_timeout_s',
    'allow_resume_changes', 'allow_partial_load', 'data.data_dir', 'data.eval_split',
    'mesh.', 'sharding.', 'init.')  # init is never read on a resume.


def _int(value) -> bool:
  return isinstance(value, int) and not isinstance(value, bool)


def _number(value) -> bool:
  return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def static_problems(config) -> list:
  """Problems visible in the config alone."""
  out = []

  def positive_int(name, value, minimum=1):
    if not _int(value) or value < minimum:
      out.append(f'{name}={value!r} must be an integer >= {minimum}.')
      return False
    return True

  batch_ok = positive_int('batch_size', config.batch_size)
  accum = config.accum_steps
  if positive_int('accum_steps', accum) and batch_ok and config.batch_size % accum:
    out.append(f'accum_steps={accum} does not divide batch_size={config.batch_size}; pick a '
               f'batch size that is a multiple of it.')
  if config.eval_batch_size is not None and config.eval_batch_size != 0:
    positive_int('eval_batch_size', config.eval_batch_size)
  positive_int('data.image_size', config.data.image_size)
  positive_int('log_every_steps', config.log_every_steps)
  positive_int('keep_checkpoints', config.keep_checkpoints)
  for name in ('eval_every_steps', 'checkpoint_every_steps', 'total_steps', 'profile_steps'):
    positive_int(name, config[name], minimum=0)
  if not config.total_steps and (not _number(config.num_epochs) or config.num_epochs <= 0):
    out.append(f'num_epochs={config.num_epochs!r} must be > 0 when total_steps is 0.')
  dtype = config.model.dtype
  if dtype not in DTYPES:
    out.append(f'model.dtype={dtype!r} is not supported; valid: {", ".join(DTYPES)}.')
  kind = config.loss.kind
  if kind not in LOSS_KINDS:
    out.append(f'loss.kind={kind!r} is not supported; valid: {", ".join(LOSS_KINDS)}.')
  o = config.optim
  if o.schedule not in SCHEDULES:
    out.append(f'optim.schedule={o.schedule!r} is not supported; valid: '
               f'{", ".join(SCHEDULES)}.')
  for name in ('lr', 'min_lr', 'weight_decay', 'warmup_steps', 'warmup_epochs', 'clip_norm'):
    value = o[name]
    if value is not None and (not _number(value) or value < 0):
      out.append(f'optim.{name}={value!r} must be a finite number >= 0.')
  smoothing = config.loss.label_smoothing
  if not _number(smoothing) or not 0 <= smoothing < 1:
    out.append(f'loss.label_smoothing={smoothing!r} must be in [0, 1).')
  decay = config.ema.decay
  if not _number(decay) or not 0 <= decay < 1:
    out.append(f'ema.decay={decay!r} must be in [0, 1) (0: no EMA).')
  crop = config.data.crop_fraction
  if crop is not None and (not _number(crop) or crop <= 0):
    out.append(f'data.crop_fraction={crop!r} must be > 0 (or None: no crop).')
  sizes = [config.mesh[a] for a in MESH_AXES]
  for axis, size in zip(MESH_AXES, sizes):
    if not _int(size) or (size != -1 and size < 1):
      out.append(f'mesh.{axis}={size!r} must be a positive integer or -1 (all remaining '
                 f'devices).')
  if sizes.count(-1) > 1:
    out.append('mesh.data and mesh.fsdp are both -1; at most one axis may be -1.')
  return out


def _mesh_sizes(config) -> Optional[list]:
  """The configured axis sizes when each is valid (static_problems reports the others)."""
  sizes = [config.mesh[a] for a in MESH_AXES]
  if not all(_int(s) and (s == -1 or s >= 1) for s in sizes) or sizes.count(-1) > 1:
    return None
  return sizes


def mesh_shape(config, num_devices: int) -> Optional[dict]:
  """{'data': n, 'fsdp': m} for ``num_devices``, or None when the config's mesh cannot fit."""
  sizes = _mesh_sizes(config)
  if sizes is None:
    return None
  known = math.prod(s for s in sizes if s != -1)
  if -1 in sizes:
    if num_devices % known:
      return None
    sizes[sizes.index(-1)] = num_devices // known
  return dict(zip(MESH_AXES, sizes)) if math.prod(sizes) == num_devices else None


def device_problems(config, num_devices: int) -> list:
  """The mesh fits the devices, and every batch splits evenly over them."""
  out = []
  mesh = config.mesh
  if _mesh_sizes(config) is not None and mesh_shape(config, num_devices) is None:
    out.append(f'mesh data={mesh.data}, fsdp={mesh.fsdp} does not fit the '
               f'{num_devices} devices present; set --config.mesh.data and --config.mesh.fsdp '
               f'so that their product is {num_devices} (one of them may be -1).')
  batch, accum = config.batch_size, config.accum_steps
  if _int(batch) and batch > 0 and _int(accum) and accum > 0 and not batch % accum:
    if (batch // accum) % num_devices:
      what = f'batch_size={batch}' + (f' / accum_steps={accum}' if accum > 1 else '')
      out.append(f'{what} = {batch // accum} is not divisible by the {num_devices} devices; use '
                 f'a multiple of {num_devices * accum}.')
  eval_batch = config.eval_batch_size or batch
  if _int(eval_batch) and eval_batch > 0 and eval_batch % num_devices:
    out.append(f'eval_batch_size={eval_batch} is not divisible by the {num_devices} devices; '
               f'use a multiple of {num_devices}.')
  return out


def data_problems(config, info, num_classes: int, steps: Optional[int]) -> list:
  """Against the dataset: enough classes, a train split that holds a batch, a step to run."""
  out = []
  wanted = config.num_classes
  if wanted is not None and (not _int(wanted) or wanted < info.num_classes):
    out.append(f'num_classes={wanted!r} is below the {info.num_classes} labels of '
               f'{config.data.name!r}; leave it unset (None) to take the dataset\'s.')
  if num_classes is not None and _int(num_classes) and num_classes < 2 and (
      config.loss.kind == 'softmax'):
    out.append(f'{config.data.name!r} has {num_classes} class: a classifier needs at least 2.')
  batch = config.batch_size
  if _int(batch) and batch > 0 and batch > info.train_size:
    out.append(f'batch_size={batch} is larger than the {info.train_size} examples of the train '
               f'split; use a batch of at most {info.train_size}.')
  elif steps is not None and steps < 1:
    out.append(f'num_epochs={config.num_epochs} of {info.train_size} examples at batch '
               f'{batch} makes {steps} steps; raise num_epochs or set total_steps.')
  if info.eval_size < 1:
    out.append(f'The eval split {config.data.eval_split!r} is empty.')
  return out


def _flatten(tree, prefix='') -> dict:
  out = {}
  for key, value in tree.items():
    if isinstance(value, dict):
      out.update(_flatten(value, f'{prefix}{key}.'))
    else:
      out[f'{prefix}{key}'] = value
  return out


def _may_change(field: str) -> bool:
  return any(field == f or (f.endswith('.') and field.startswith(f)) for f in RESUME_MAY_CHANGE)


def compare_configs(saved: dict, current: dict, restored_step: int, steps: int,
                    allow_all: bool = False):
  """(problems, accepted) for resuming a run saved with config ``saved`` (JSON) under ``current``.

  ``accepted`` maps each changed field to [old, new]. Fields the saved config lacks (added to the
  code since) are not compared. ``steps`` is the new run length; it may never fall below the
  restored step, whatever the flags, since a checkpoint labelled below its content would follow.
  """
  old, new = _flatten(saved), _flatten(current)
  accepted, refused = {}, []
  for field in sorted(set(old) & set(new)):
    a, b = old[field], new[field]
    if a == b or (isinstance(a, list) and isinstance(b, (list, tuple)) and list(b) == a):
      continue
    if _may_change(field) or allow_all:
      accepted[field] = [a, b]
    else:
      refused.append(f'{field} {a!r} -> {b!r}')
  problems = []
  if refused:
    problems.append(f'The workdir holds a run saved at step {restored_step} with another config: '
                    f'{"; ".join(refused)}. A resume may change only logging, evaluation, '
                    f'checkpointing, mesh and data_dir fields and lengthen the run; use another '
                    f'workdir, or set --config.allow_resume_changes=True to resume anyway.')
  if steps < restored_step:
    problems.append(f'The run would end at step {steps}, below step {restored_step} already '
                    f'saved in the workdir; raise total_steps (or num_epochs) to at least '
                    f'{restored_step}, or use another workdir.')
  return problems, accepted


def missing_fields(config) -> list:
  """One problem per field of the base config that ``config`` lacks: code reads ``config.x``
  and never supplies a default of its own, so a config must carry every field."""
  from configs import common  # pylint: disable=g-import-not-at-top  (configs imports models)
  out = []

  def walk(base, have, prefix):
    for key in base.keys():
      if key not in have:
        out.append(f'config field {prefix}{key} is missing; a config must start from '
                   f'configs/common.py get_base_config() (or a recipe built on it).')
      elif isinstance(base[key], ml_collections.ConfigDict) and isinstance(
          have[key], ml_collections.ConfigDict):
        walk(base[key], have[key], f'{prefix}{key}.')

  walk(common.get_base_config(), config, '')
  return out


def check_inputs(config, workdir: str):
  """Everything that can be checked before the workdir is touched; returns (info, num_classes).

  Every problem of the config (values, data, devices, resume) is collected and raised at once as
  an ``errors.UserError`` whose ``problems`` are one line each.
  """
  problems = missing_fields(config)
  if problems:  # Every other check reads the fields.
    raise errors.UserError(*problems)
  if jax.process_index() == 0:  # The lock is process 0's (the others of its run see it held).
    workdir_lock.check_free(workdir)
  problems = static_problems(config)
  try:
    architecture.of_model_config(config.model)
  except ValueError as e:
    problems.append(str(e))
  if config.loss.class_weights not in ('', None, 'balanced'):
    problems.append(f'loss.class_weights={config.loss.class_weights!r}; valid: "balanced" or "".')
  try:
    info = input_pipeline.get_info(config.data)
  except Exception as e:  # pylint: disable=broad-except
    problems.insert(0, f'Dataset {config.data.name!r} (data_dir={config.data.data_dir}): '
                    f'{errors.one_line(e, limit=300) or type(e).__name__}')
    raise errors.UserError(*problems) from e
  num_classes = config.num_classes or info.num_classes
  steps = None
  if not problems:
    steps = steps_lib.total_steps(config, info.train_size)
  problems += data_problems(config, info, num_classes, steps)
  problems += device_problems(config, jax.device_count())
  if problems:
    raise errors.UserError(*problems)
  _check_model_and_workdir(config, workdir, num_classes, steps)
  return info, num_classes


def _check_model_and_workdir(config, workdir: str, num_classes: int, steps: int) -> None:
  """The model builds, and fits the workdir's checkpoints (resume) or ``init.path`` (warm start)."""
  try:
    steps_lib.build_model(config, num_classes)
  except (ValueError, TypeError) as e:
    raise errors.UserError(str(e)) from e
  expected = checkpointing.make_metadata(config, num_classes, 0)
  try:
    checkpointing.check_workdir(workdir, expected, config.allow_partial_load)
  except checkpointing.CheckpointError as e:
    raise errors.UserError(str(e)) from e
  resume_problems, _ = resume_changes(config, workdir, steps)
  if resume_problems:
    raise errors.UserError(*resume_problems)
  init_path = config.init.path
  if init_path and checkpointing.latest_metadata(workdir) is None:  # Resuming never reads init.
    saved, _, _ = pretrained.read_metadata(init_path, config.init.step or None)
    pretrained.check_compatible(saved, expected, f'init={init_path}')


def resume_changes(config, workdir: str, steps: int):
  """(problems, accepted changes) of resuming the workdir's newest checkpoint under ``config``."""
  saved = checkpointing.latest_metadata(workdir)
  if saved is None or not isinstance(saved.get('config'), dict):
    return [], {}
  return compare_configs(saved['config'], json.loads(config.to_json_best_effort()),
                         int(saved.get('step', 0)), steps, allow_all=config.allow_resume_changes)
