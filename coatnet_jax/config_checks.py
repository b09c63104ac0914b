"""Every check of a config that can be made before the workdir is touched, in one place.

``train.check_inputs`` calls ``static_problems`` (the config alone), ``data_problems`` (with the
dataset's info), ``device_problems`` (with the device count) and ``resume_changes`` (with the
config saved in the newest checkpoint), and raises every problem at once; ``main`` prints each as
its own ``error:`` line and exits 1 with nothing written. A check here must be cheap (no model
init, no compile) and must name the field, the value and what to do.
"""

import math
from typing import Optional

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
  get = config.get

  def positive_int(name, value, minimum=1):
    if not _int(value) or value < minimum:
      out.append(f'{name}={value!r} must be an integer >= {minimum}.')
      return False
    return True

  batch_ok = positive_int('batch_size', get('batch_size'))
  accum = get('accum_steps', 1)
  if positive_int('accum_steps', accum) and batch_ok and config.batch_size % accum:
    out.append(f'accum_steps={accum} does not divide batch_size={config.batch_size}; pick a '
               f'batch size that is a multiple of it.')
  if get('eval_batch_size') is not None and get('eval_batch_size') != 0:
    positive_int('eval_batch_size', get('eval_batch_size'))
  positive_int('data.image_size', config.data.get('image_size'))
  positive_int('log_every_steps', get('log_every_steps', 100))
  positive_int('keep_checkpoints', get('keep_checkpoints', 3))
  for name in ('eval_every_steps', 'checkpoint_every_steps', 'total_steps', 'profile_steps'):
    positive_int(name, get(name, 0), minimum=0)
  if not get('total_steps') and (not _number(get('num_epochs')) or get('num_epochs') <= 0):
    out.append(f'num_epochs={get("num_epochs")!r} must be > 0 when total_steps is 0.')
  dtype = config.model.get('dtype', 'float32')
  if dtype not in DTYPES:
    out.append(f'model.dtype={dtype!r} is not supported; valid: {", ".join(DTYPES)}.')
  kind = config.loss.get('kind')
  if kind not in LOSS_KINDS:
    out.append(f'loss.kind={kind!r} is not supported; valid: {", ".join(LOSS_KINDS)}.')
  o = config.optim
  if o.get('schedule') not in SCHEDULES:
    out.append(f'optim.schedule={o.get("schedule")!r} is not supported; valid: '
               f'{", ".join(SCHEDULES)}.')
  for name in ('lr', 'min_lr', 'weight_decay', 'warmup_steps', 'warmup_epochs', 'clip_norm'):
    value = o.get(name, 0)
    if value is not None and (not _number(value) or value < 0):
      out.append(f'optim.{name}={value!r} must be a finite number >= 0.')
  smoothing = config.loss.get('label_smoothing', 0.0)
  if not _number(smoothing) or not 0 <= smoothing < 1:
    out.append(f'loss.label_smoothing={smoothing!r} must be in [0, 1).')
  decay = config.get('ema', {}).get('decay', 0.0)
  if not _number(decay) or not 0 <= decay < 1:
    out.append(f'ema.decay={decay!r} must be in [0, 1) (0: no EMA).')
  crop = config.data.get('crop_fraction')
  if crop is not None and (not _number(crop) or crop <= 0):
    out.append(f'data.crop_fraction={crop!r} must be > 0 (or None: no crop).')
  mesh = config.get('mesh', {})
  sizes = [mesh.get(a, -1) for a in MESH_AXES]
  for axis, size in zip(MESH_AXES, sizes):
    if not _int(size) or (size != -1 and size < 1):
      out.append(f'mesh.{axis}={size!r} must be a positive integer or -1 (all remaining '
                 f'devices).')
  if sizes.count(-1) > 1:
    out.append('mesh.data and mesh.fsdp are both -1; at most one axis may be -1.')
  return out


def _mesh_sizes(config) -> Optional[list]:
  """The configured axis sizes when each is valid (static_problems reports the others)."""
  sizes = [config.get('mesh', {}).get(a, -1) for a in MESH_AXES]
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
  mesh = config.get('mesh', {})
  if _mesh_sizes(config) is not None and mesh_shape(config, num_devices) is None:
    out.append(f'mesh data={mesh.get("data")}, fsdp={mesh.get("fsdp")} does not fit the '
               f'{num_devices} devices present; set --config.mesh.data and --config.mesh.fsdp '
               f'so that their product is {num_devices} (one of them may be -1).')
  batch, accum = config.get('batch_size'), config.get('accum_steps', 1)
  if _int(batch) and batch > 0 and _int(accum) and accum > 0 and not batch % accum:
    if (batch // accum) % num_devices:
      what = f'batch_size={batch}' + (f' / accum_steps={accum}' if accum > 1 else '')
      out.append(f'{what} = {batch // accum} is not divisible by the {num_devices} devices; use '
                 f'a multiple of {num_devices * accum}.')
  eval_batch = config.get('eval_batch_size') or batch
  if _int(eval_batch) and eval_batch > 0 and eval_batch % num_devices:
    out.append(f'eval_batch_size={eval_batch} is not divisible by the {num_devices} devices; '
               f'use a multiple of {num_devices}.')
  return out


def data_problems(config, info, num_classes: int, steps: Optional[int]) -> list:
  """Against the dataset: enough classes, a train split that holds a batch, a step to run."""
  out = []
  wanted = config.get('num_classes')
  if wanted is not None and (not _int(wanted) or wanted < info.num_classes):
    out.append(f'num_classes={wanted!r} is below the {info.num_classes} labels of '
               f'{config.data.name!r}; leave it unset (None) to take the dataset\'s.')
  if num_classes is not None and _int(num_classes) and num_classes < 2 and (
      config.loss.get('kind') == 'softmax'):
    out.append(f'{config.data.name!r} has {num_classes} class: a classifier needs at least 2.')
  batch = config.get('batch_size')
  if _int(batch) and batch > 0 and batch > info.train_size:
    out.append(f'batch_size={batch} is larger than the {info.train_size} examples of the train '
               f'split; use a batch of at most {info.train_size}.')
  elif steps is not None and steps < 1:
    out.append(f'num_epochs={config.get("num_epochs")} of {info.train_size} examples at batch '
               f'{batch} makes {steps} steps; raise num_epochs or set total_steps.')
  if info.eval_size < 1:
    out.append(f'The eval split {config.data.get("eval_split")!r} is empty.')
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


def resume_changes(saved: dict, current: dict, restored_step: int, steps: int,
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
