"""The trainer: one linear loop, read top to bottom.

inputs checked (nothing written yet) -> mesh -> data -> model and optimizer -> abstract init
-> shardings -> restore (newest intact checkpoint) or jit init -> compile -> loop (step, progress
line, eval, checkpoints, preemption) -> final eval and save.

A run is never lost: checkpoints are asynchronous, every K steps, at the end and on SIGTERM or a
preemption notice (save, wait, return); a resumed run rewinds metrics.jsonl to its step and then
reproduces the interrupted run bit for bit (the data is a function of (seed, step)); a NaN or Inf
stops the run naming the step, with nothing non-finite saved.

Every config runs through this same code; the quickstart differs from the ImageNet recipes only in
its data source and sizes. Steps are ``jax.jit`` with explicit in/out shardings over one
('data', 'fsdp') mesh and a donated state; BatchNorm statistics are those of the global batch,
because the step is written for the global batch and GSPMD does the reductions.
"""

import json
import os
import signal
import threading
import time
from typing import Any, Optional

from absl import logging
import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from clu import metrics as clu_metrics
from clu import parameter_overview

from coatnet_jax import architecture
from coatnet_jax import batchnorm_stats
from coatnet_jax import checkpointing
from coatnet_jax import config_checks
from coatnet_jax import cost
from coatnet_jax import eval_metrics
from coatnet_jax import input_pipeline
from coatnet_jax import losses
from coatnet_jax import metrics as metrics_lib
from coatnet_jax import models
from coatnet_jax import optim
from coatnet_jax import pretrained
from coatnet_jax import sharding
from coatnet_jax import workdir_lock


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any
  batch_stats: Any
  opt_state: Any
  ema_params: Any  # None when EMA is off.
  rng: jax.Array  # Raw key data (uint32), so Orbax saves it like any array.


def dtype_of(name: str):
  return {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}[name]


def build_model(config, num_classes: int):
  m = config.model
  arch = architecture.of_model_config(m)  # The layout and switches, resolved.
  return models.get_model(arch.variant, num_classes, dtype=dtype_of(m.get('dtype', 'float32')),
                          drop_path_rate=m.get('drop_path_rate', 0.0),
                          remat=m.get('remat', 'none'), options=arch.options)


def total_steps(config, train_size: int) -> int:
  if config.get('total_steps'):
    return config.total_steps
  return max(int(config.num_epochs * train_size // config.batch_size), config.get('min_steps', 0))


def build_optimizer(config, train_size: int):
  """The schedule and optax transformation a config asks for (also used by config checks)."""
  steps_per_epoch = max(train_size // config.batch_size, 1)
  schedule = optim.make_schedule(config.optim, total_steps(config, train_size), steps_per_epoch)
  return schedule, optim.make_optimizer(config.optim, schedule)


def make_init_fn(config, model, tx):
  """A function of no arguments building the full train state; jitted with out_shardings."""
  size = config.data.image_size

  def init():
    params_key, dropout_key, train_key = jax.random.split(jax.random.key(config.seed), 3)
    dummy = jnp.zeros((1, size, size, 3), dtype_of(config.model.get('dtype', 'float32')))
    variables = model.init({'params': params_key, 'dropout': dropout_key}, dummy, train=False)
    params = variables['params']
    return TrainState(
        step=jnp.zeros((), jnp.int32), params=params,
        batch_stats=variables.get('batch_stats', {}), opt_state=tx.init(params),
        ema_params=params if config.ema.get('decay') else None,
        rng=jax.random.key_data(train_key))

  return init


def make_train_step(config, model, tx, schedule, num_classes: int, mesh, class_weights=None):
  """(state, batch) -> (state, metrics). A non-finite step leaves all but the optimizer moments
  untouched (see below).

  ``class_weights`` (one per class; ``losses.balanced_class_weights``) weight each example's loss
  by its label's weight; after Mixup/CutMix an example keeps the weight of its own label.
  """
  lc, accum = config.loss, config.get('accum_steps', 1)
  compute_dtype = dtype_of(config.model.get('dtype', 'float32'))
  weights = None if class_weights is None else jnp.asarray(class_weights, jnp.float32)

  def loss_fn(params, batch_stats, images, targets, example_weights, key):
    logits, new_vars = model.apply({'params': params, 'batch_stats': batch_stats}, images,
                                   train=True, mutable=['batch_stats'], rngs={'dropout': key})
    loss = losses.per_example_loss(logits, targets, lc.kind)
    if example_weights is not None:
      loss = loss * example_weights
    return loss.mean(), new_vars['batch_stats']

  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

  def train_step(state: TrainState, batch):
    key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
    mix_key, drop_key = jax.random.split(key)
    images = input_pipeline.normalize(batch['image'], compute_dtype)
    targets = losses.smooth_targets(batch['label'], num_classes, lc.get('label_smoothing', 0.0))
    images, targets = losses.mix(mix_key, images, targets, lc.get('mixup_alpha', 0.0),
                                 lc.get('cutmix_alpha', 0.0), lc.get('switch_prob', 0.5))
    example_weights = None if weights is None else weights[batch['label']]
    if accum == 1:
      (loss, batch_stats), grads = grad_fn(state.params, state.batch_stats, images, targets,
                                           example_weights, drop_key)
    else:
      # Micro-batch i takes rows i, i + accum, ...: every device contributes to every micro-batch.
      def split(x):
        x = x.reshape((x.shape[0] // accum, accum) + x.shape[1:]).swapaxes(0, 1)
        return jax.lax.with_sharding_constraint(
            x, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(None, sharding.AXES)))

      def body(carry, xs):
        grads_sum, loss_sum, batch_stats = carry
        (l, batch_stats), g = grad_fn(state.params, batch_stats, xs[0], xs[1], xs[3],
                                      jax.random.fold_in(drop_key, xs[2]))
        return (jax.tree.map(jnp.add, grads_sum, g), loss_sum + l, batch_stats), None

      zeros = jax.tree.map(jnp.zeros_like, state.params)
      (grads, loss, batch_stats), _ = jax.lax.scan(
          body, (zeros, jnp.zeros((), jnp.float32), state.batch_stats),
          (split(images), split(targets), jnp.arange(accum),
           None if example_weights is None else split(example_weights)))
      grads = jax.tree.map(lambda g: g / accum, grads)
      loss = loss / accum

    grad_norm = optax.tree.norm(grads)
    lr = schedule(state.step)
    # Finiteness from three scalars, never a scan of the state: with a finite loss, gradient
    # norm and learning rate, AdamW's update is finite. A non-finite step changes no parameter,
    # BatchNorm statistic, EMA or step count: its update is zeroed, a select inside the update's
    # own elementwise pass (a select between the whole old and new state, or a lax.cond over the
    # update, costs copies of the state: DEVELOPERS.md). Its optimizer moments may change or be
    # non-finite; the loop stops at the next check and checks every step before any save, so
    # nothing non-finite is saved.
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm) & jnp.isfinite(lr)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    updates = jax.tree.map(lambda u: jnp.where(finite, u, jnp.zeros_like(u)), updates)
    params = optax.apply_updates(state.params, updates)
    ema_params = state.ema_params
    if ema_params is not None:
      decay = optim.ema_decay(state.step, config.ema.decay, config.ema.get('warmup', True))
      # Decay 1 keeps the average exactly (1 * e + 0 * p, p finite): a scalar, not a select.
      ema_params = optim.ema_update(ema_params, params, jnp.where(finite, decay, 1.0))
    # The step counter and BatchNorm statistics are tiny: selected whole.
    batch_stats = jax.tree.map(lambda n, o: jnp.where(finite, n, o), batch_stats,
                               state.batch_stats)
    new_state = state.replace(step=jnp.where(finite, state.step + 1, state.step), params=params,
                              batch_stats=batch_stats, opt_state=opt_state, ema_params=ema_params)
    return new_state, {'loss': loss, 'grad_norm': grad_norm, 'lr': lr, 'finite': finite}

  return train_step


def abstract_batch(config, batch: int, num_classes: int, batch_sharding, with_mask=False):
  """Shapes of one global batch, for ahead-of-time compilation (the trainer and tools.fit)."""
  size = config.data.image_size
  label_shape, label_dtype = input_pipeline.label_spec(config.data, num_classes)
  b = {'image': jax.ShapeDtypeStruct((batch, size, size, 3), jnp.uint8, sharding=batch_sharding),
       'label': jax.ShapeDtypeStruct((batch,) + label_shape, label_dtype, sharding=batch_sharding)}
  if with_mask:
    b['mask'] = jax.ShapeDtypeStruct((batch,), jnp.int32, sharding=batch_sharding)
  return b


def jit_train_step(config, model, tx, schedule, num_classes: int, mesh, state_shardings,
                   class_weights=None):
  """The train step jitted over ``mesh`` with a donated, sharded state."""
  return jax.jit(make_train_step(config, model, tx, schedule, num_classes, mesh, class_weights),
                 in_shardings=(state_shardings, sharding.batch_sharding(mesh)),
                 out_shardings=(state_shardings, sharding.replicated(mesh)), donate_argnums=(0,))


@flax.struct.dataclass
class EvalMetrics(clu_metrics.Collection):
  """What evaluation accumulates: masked averages over the real (mask 1) examples."""
  loss: clu_metrics.Average.from_output('loss')
  correct1: clu_metrics.Average.from_output('correct1')
  correct5: clu_metrics.Average.from_output('correct5')


def make_eval_step(config, model, num_classes: int):
  """(params, batch_stats, batch) -> EvalMetrics (and sums) over the real (mask=1) examples.

  With ``config.classification_metrics`` (single-label data) also the (C, C) confusion counts and,
  for two classes, every example's positive-class probability under 'examples' (for ROC AUC).
  """
  kind = config.loss.kind
  per_class = config.get('classification_metrics', False)
  compute_dtype = dtype_of(config.model.get('dtype', 'float32'))

  def eval_step(params, batch_stats, batch):
    logits = model.apply({'params': params, 'batch_stats': batch_stats},
                         input_pipeline.normalize(batch['image'], compute_dtype), train=False)
    mask, labels = batch['mask'], batch['label']
    top1 = jnp.argmax(logits, axis=-1)
    if labels.ndim == 1:
      correct1 = top1 == labels
      top5 = jax.lax.top_k(logits, min(5, num_classes))[1]
      correct5 = jnp.any(top5 == labels[:, None], axis=-1)
    else:  # Multi-hot: precision@1 is whether the top class is one of the labels.
      correct1 = jnp.take_along_axis(labels, top1[:, None], axis=-1)[:, 0] > 0
      correct5 = correct1
    loss = losses.per_example_loss(logits, losses.smooth_targets(labels, num_classes, 0.0), kind)
    out = {'metrics': EvalMetrics.single_from_model_output(
        loss=loss, correct1=correct1.astype(jnp.float32), correct5=correct5.astype(jnp.float32),
        mask=mask > 0)}
    if per_class and labels.ndim == 1:
      out['confusion'] = eval_metrics.confusion_counts(labels, top1, mask, num_classes)
      if num_classes == 2:
        probs = jax.nn.softmax(logits) if kind == 'softmax' else jax.nn.sigmoid(logits)
        out['examples'] = {'score': probs[:, 1], 'label': labels, 'mask': mask}
    return out

  return eval_step


def evaluate(eval_fn, params, batch_stats, batches, mesh, kind: str, class_names=()) -> dict:
  """Runs ``eval_fn`` over every batch; exact counts because padding carries mask 0.

  Scalars only: with classification metrics on, the confusion matrix comes back as
  'confusion/<true>/<predicted>' counts (``eval_metrics.flatten_for_logging``).
  """
  accumulated, totals, examples = None, None, []
  for local in batches:
    out = eval_fn(params, batch_stats, sharding.global_batch(local, mesh))
    if 'examples' in out:  # Two-class tasks: small splits, so one transfer per batch is cheap.
      examples.append(jax.device_get(out.pop('examples')))
    metrics = out.pop('metrics')
    accumulated = metrics if accumulated is None else accumulated.merge(metrics)
    totals = out if totals is None else jax.tree.map(jnp.add, totals, out)
  totals = jax.device_get(totals or {})
  count = int(accumulated.loss.count)
  # Divided on the host in float64: top-1 is exactly correct / count.
  host = jax.tree.map(lambda x: np.asarray(x, np.float64), jax.device_get(accumulated))
  means = {k: float(v) if count else 0.0 for k, v in host.compute().items()}
  result = {'count': count, 'loss': means['loss']}
  if kind == 'softmax':
    result['top1'] = means['correct1']
    result['top5'] = means['correct5']
  else:
    result['prec@1'] = means['correct1']
  if 'confusion' in totals:
    per_class = eval_metrics.from_confusion(totals['confusion'])
    if examples:
      real = np.concatenate([e['mask'] for e in examples]) > 0
      per_class['roc_auc'] = eval_metrics.roc_auc(
          np.concatenate([e['score'] for e in examples])[real],
          np.concatenate([e['label'] for e in examples])[real])
    result.update(eval_metrics.flatten_for_logging(per_class, class_names))
  return result


def _model_macs(model, image_size) -> Optional[int]:
  """Counted MACs per image (for MFU), or None if counting fails."""
  try:
    return int(cost.model_macs(model, image_size, batch=1))
  except Exception as e:  # pylint: disable=broad-except
    logging.warning('Counting model MACs failed (%s); MFU is not reported.', e)
    return None


class NonFiniteLossError(FloatingPointError):
  pass


def _check_finite(pending):
  """Raises at the first non-finite step; ``pending`` is [(step, loss, finite flag or None)]."""
  pending = [p if len(p) == 3 else (p[0], p[1], None) for p in pending]
  values = jax.device_get([(l, f) for _, l, f in pending])
  for (step, _, _), (value, finite) in zip(pending, values):
    if not np.isfinite(value) or (finite is not None and not finite):
      what = f'Loss is {value}' if not np.isfinite(value) else 'The update is not finite'
      raise NonFiniteLossError(
          f'{what} at step {step}; stopping. The parameters were not updated by that '
          f'step and nothing non-finite was saved. Lower the learning rate, check the data, or '
          f'resume from the last checkpoint.')
  return [float(v) for v, _ in values]


def _clip(text: str, limit: int = 300) -> str:
  return text if len(text) <= limit else text[:limit] + ' ...'


class InputError(ValueError):
  """A bad config, model, dataset or workdir, found before anything is written; one line."""


def check_inputs(config, workdir: str):
  """Everything that can be checked before the workdir is touched; returns (info, num_classes).

  Every problem of the config (``config_checks``: values, data, devices, resume) is collected and
  raised at once as an ``InputError`` whose ``problems`` are one line each.
  """
  try:
    if jax.process_index() == 0:  # The lock is process 0's (the others of its run see it held).
      workdir_lock.check_free(workdir)
  except workdir_lock.WorkdirBusyError as e:
    raise InputError(str(e)) from e
  problems = config_checks.static_problems(config)
  try:
    architecture.of_model_config(config.model)
  except ValueError as e:
    problems.append(str(e))
  if config.loss.get('class_weights') not in ('', None, 'balanced'):
    problems.append(f'loss.class_weights={config.loss.class_weights!r}; valid: "balanced" or "".')
  try:
    info = input_pipeline.get_info(config.data)
  except Exception as e:  # pylint: disable=broad-except
    problems.insert(0, f'Dataset {config.data.name!r} (data_dir={config.data.get("data_dir")}): '
                    f'{_clip(" ".join(str(e).split()) or type(e).__name__)}')
    raise _input_error(problems) from e
  num_classes = config.get('num_classes') or info.num_classes
  steps = None
  if not problems:
    steps = total_steps(config, info.train_size)
  problems += config_checks.data_problems(config, info, num_classes, steps)
  problems += config_checks.device_problems(config, jax.device_count())
  if problems:
    raise _input_error(problems)
  try:
    build_model(config, num_classes)
  except (ValueError, TypeError) as e:
    raise InputError(str(e)) from e
  expected = checkpointing.make_metadata(config, num_classes, 0)
  try:
    checkpointing.check_workdir(workdir, expected, config.get('allow_partial_load', False))
  except checkpointing.CheckpointError as e:
    raise InputError(str(e)) from e
  resume_problems, _ = resume_changes(config, workdir, steps)
  if resume_problems:
    raise _input_error(resume_problems)
  init_path = config.get('init', {}).get('path')
  if init_path and checkpointing.latest_metadata(workdir) is None:  # Resuming never reads init.
    try:
      saved, _, _ = pretrained.read_metadata(init_path, config.init.get('step') or None)
      pretrained.check_compatible(saved, expected, f'init={init_path}')
    except pretrained.InitError as e:
      raise InputError(str(e)) from e
  return info, num_classes


def _input_error(problems) -> InputError:
  e = InputError(' '.join(problems))
  e.problems = list(problems)
  return e


def resume_changes(config, workdir: str, steps: int):
  """(problems, accepted changes) of resuming the workdir's newest checkpoint under ``config``."""
  saved = checkpointing.latest_metadata(workdir)
  if saved is None or not isinstance(saved.get('config'), dict):
    return [], {}
  return config_checks.resume_changes(
      saved['config'], json.loads(config.to_json_best_effort()), int(saved.get('step', 0)), steps,
      allow_all=bool(config.get('allow_resume_changes', False)))


def record_config_changes(workdir: str, step: int, changes: dict) -> None:
  """Appends the config fields a resume changed to ``config_history.jsonl`` (process 0)."""
  if not changes or jax.process_index():
    return
  logging.warning('Resuming at step %d with config changes: %s', step,
                  '; '.join(f'{k} {a!r} -> {b!r}' for k, (a, b) in changes.items()))
  with open(os.path.join(workdir, CONFIG_HISTORY), 'a') as f:
    f.write(json.dumps({'step': step, 'time': time.strftime('%Y-%m-%dT%H:%M:%S%z'),
                        'changes': changes}) + '\n')


CONFIG_HISTORY = 'config_history.jsonl'


class Preemption:
  """SIGTERM, Ctrl-C (SIGINT) and JAX's preemption sync point -> save, wait, exit 0.

  One process: a handler sets a flag the loop reads every step; a second Ctrl-C aborts at once
  (KeyboardInterrupt, the last checkpoint kept). Several processes: JAX's preemption service owns
  SIGTERM and ``reached_preemption`` makes every process agree on the step, so they all save the
  same one; Ctrl-C aborts there.
  """

  def __init__(self):
    self.signalled = None  # The name of the signal received, if any.
    self._previous = {}
    # Several processes would each save a different step on their own signal: there, Ctrl-C
    # keeps its default (abort) and SIGTERM goes to JAX's preemption service.
    if jax.process_count() == 1 and threading.current_thread() is threading.main_thread():
      for signum in (signal.SIGTERM, signal.SIGINT):
        self._previous[signum] = signal.signal(signum, self._handler)

  def _handler(self, signum, frame):  # pylint: disable=unused-argument
    if signum == signal.SIGINT:
      if self.signalled == 'SIGINT':
        raise KeyboardInterrupt('second Ctrl-C')
      logging.warning('Received Ctrl-C: saving at the end of this step, then exiting (press '
                      'Ctrl-C again to abort at once, losing the steps since the last '
                      'checkpoint).')
    else:
      logging.warning('Received SIGTERM: saving at the end of this step, then exiting.')
    self.signalled = signal.Signals(signum).name

  def reached(self, manager, step: int) -> bool:
    if jax.process_count() > 1:
      return bool(manager.reached_preemption(step))
    return bool(self.signalled)

  def close(self):
    for signum, previous in self._previous.items():
      signal.signal(signum, previous)
    self._previous = {}


def rewind_metrics(workdir: str, step: int) -> None:
  """Drops metrics.jsonl records after ``step`` (atomically), so a resumed run has no gap and
  no duplicate: the steps after the restored checkpoint are written again by the resumed run."""
  path = os.path.join(workdir, 'metrics.jsonl')
  if jax.process_index() or not os.path.exists(path):
    return
  keep, dropped = [], 0
  with open(path) as f:
    for line in f:
      try:
        record = json.loads(line)
      except ValueError:  # A line cut by kill -9.
        dropped += 1
        continue
      if record.get('step', 0) > step or (record.get('step') == step and 'compile_s' in record):
        dropped += 1
        continue
      keep.append(line if line.endswith('\n') else line + '\n')
  if dropped:
    tmp = path + '.tmp'
    with open(tmp, 'w') as f:
      f.writelines(keep)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
    logging.info('Resuming at step %d: dropped %d metrics.jsonl records after it.', step, dropped)


def write_config(config, workdir):
  if jax.process_index() == 0:
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, 'config.json'), 'w') as f:
      f.write(config.to_json_best_effort(indent=2, sort_keys=True))


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Trains and evaluates as ``config`` says; returns the final eval metrics.

  Stops early, with a checkpoint, on SIGTERM, Ctrl-C or a preemption notice; then the result is
  {}. The workdir is locked for the run (``workdir_lock``); nothing is written before every check
  of ``check_inputs`` has passed.
  """
  info, num_classes = check_inputs(config, workdir)  # Before anything is written.
  try:
    lock = workdir_lock.acquire(workdir, jax.process_index())
  except workdir_lock.WorkdirBusyError as e:
    raise InputError(str(e)) from e
  try:
    return _train_and_evaluate(config, workdir, info, num_classes)
  finally:
    if lock is not None:
      lock.release()


def _train_and_evaluate(config, workdir: str, info, num_classes: int) -> dict:
  pi, pc = jax.process_index(), jax.process_count()

  # Mesh: one ('data', 'fsdp') mesh over every device of every process.
  mesh = sharding.make_mesh(config.mesh)
  num_devices = mesh.devices.size
  logging.info('Mesh %s over %d %s devices, %d processes.', dict(mesh.shape), num_devices,
               jax.devices()[0].device_kind, pc)
  eval_batch = config.get('eval_batch_size') or config.batch_size  # Divisible: config_checks.

  # Data.
  steps = total_steps(config, info.train_size)
  logging.info('%s: %d train / %d eval examples, %d classes; %d steps of batch %d.',
               config.data.name, info.train_size, info.eval_size, num_classes, steps,
               config.batch_size)

  # Model and optimizer.
  model = build_model(config, num_classes)
  schedule, tx = build_optimizer(config, info.train_size)
  class_weights = None
  if config.loss.get('class_weights'):
    counts = input_pipeline.train_label_counts(config.data)
    class_weights = losses.balanced_class_weights(counts)
    logging.info('Class-balanced loss: weights %s for train counts %s.',
                 np.round(class_weights, 4).tolist(), counts.tolist())

  # Abstract init -> shardings -> init born sharded.
  init_fn = make_init_fn(config, model, tx)
  abstract_state = jax.eval_shape(init_fn)
  state_shardings = sharding.tree_shardings(abstract_state, mesh, config.sharding)
  sharding.log_shardings(abstract_state.params, state_shardings.params)
  num_params = sum(x.size for x in jax.tree.leaves(abstract_state.params))
  logging.info('Model %s: %.2fM parameters.\n%s', config.model.name, num_params / 1e6,
               parameter_overview.get_parameter_overview(abstract_state.params,
                                                         include_stats=False))

  t0 = time.perf_counter()
  expected = checkpointing.make_metadata(config, num_classes, 0)
  state, _ = checkpointing.restore_latest(
      workdir, abstract_state, state_shardings, expected,
      allow_partial=config.get('allow_partial_load', False), init_fn=init_fn)
  if state is None:
    state = jax.jit(init_fn, out_shardings=state_shardings)()
    if config.get('init', {}).get('path'):
      state = pretrained.warm_start(state, config, model, num_classes, state_shardings)
  start_step = int(jax.device_get(state.step))
  if start_step > steps:  # config_checks refuses this from the metadata; the arrays decide here.
    raise InputError(f'The restored step {start_step} is beyond the run\'s {steps} steps; raise '
                     f'total_steps (or num_epochs) to at least {start_step}.')
  best_metric = config.get('best_metric') or ('eval/top1' if config.loss.kind == 'softmax'
                                              else 'eval/prec@1')
  manager = checkpointing.make_manager(
      workdir, config.get('keep_checkpoints', 3), best_metric=best_metric,
      best_mode=config.get('best_mode', 'max'),
      async_save=config.get('async_checkpointing', True))
  # Written only now: a workdir whose checkpoints all fail to restore is left as it was.
  record_config_changes(workdir, start_step, resume_changes(config, workdir, steps)[1])
  write_config(config, workdir)
  rewind_metrics(workdir, start_step)
  logging.info('Train state ready at step %d in %.1f s (%s).', start_step,
               time.perf_counter() - t0, 'restored' if start_step else 'initialised')

  # Steps: compiled ahead of time so the compile time is reported once and apart from step time.
  batch_sharding = sharding.batch_sharding(mesh)
  rep = sharding.replicated(mesh)
  train_step = jit_train_step(config, model, tx, schedule, num_classes, mesh, state_shardings,
                              class_weights)
  eval_step = jax.jit(make_eval_step(config, model, num_classes),
                      in_shardings=(state_shardings.params, state_shardings.batch_stats,
                                    batch_sharding), out_shardings=rep)
  size = config.data.image_size

  t0 = time.perf_counter()
  train_step = train_step.lower(
      state, abstract_batch(config, config.batch_size, num_classes, batch_sharding)).compile()
  eval_step = eval_step.lower(state.params, state.batch_stats, abstract_batch(
      config, eval_batch, num_classes, batch_sharding, with_mask=True)).compile()
  compile_s = time.perf_counter() - t0
  logging.info('Compiled the train and eval steps in %.1f s.', compile_s)
  sharding.barrier('coatnet_compiled')

  writer = metrics_lib.MetricWriter(workdir, tensorboard=config.get('tensorboard', True))
  writer.write(start_step, {'compile_s': compile_s, 'data/skipped_images': info.skipped_images})
  device_kind = jax.devices()[0].device_kind
  throughput = metrics_lib.Throughput(
      config.batch_size, num_devices, steps,
      metrics_lib.train_flops_per_image(_model_macs(model, size)),
      metrics_lib.peak_flops(device_kind))

  bn_stats, recalibrated = None, []  # recalibrated: the steps whose statistics were recomputed.
  if config.get('batchnorm_batches') and jax.tree.leaves(state.batch_stats):
    bn_stats = batchnorm_stats.Recalibrator(
        config, build_model(batchnorm_stats.recalibration_config(config), num_classes), mesh,
        state_shardings, pi, pc)

  def recalibrate(step):
    nonlocal state
    if bn_stats is not None and step not in recalibrated[-1:]:
      state = state.replace(batch_stats=bn_stats(state.params, state.batch_stats))
      recalibrated.append(step)

  def run_eval(step):
    recalibrate(step)
    results = {}
    weights = [('', state.params)]
    if state.ema_params is not None:
      weights.append(('ema_', state.ema_params))
    for prefix, params in weights:
      batches = input_pipeline.eval_iterator(config.data, eval_batch, process_index=pi,
                                             process_count=pc)
      r = evaluate(eval_step, params, state.batch_stats, batches, mesh, config.loss.kind,
                   info.class_names)
      results.update({f'eval/{prefix}{k}': v for k, v in r.items()})
    if results['eval/count'] != info.eval_size:
      raise RuntimeError(f'Evaluated {results["eval/count"]} examples; the split has '
                         f'{info.eval_size}.')
    logging.info('Eval at step %d: %s', step,
                 ', '.join(f'{k[5:]} {v:.4f}' if isinstance(v, float) else f'{k[5:]} {v}'
                           for k, v in results.items() if '/confusion/' not in k))
    confusion = {k[len('eval/confusion/'):]: int(v) for k, v in results.items()
                 if k.startswith('eval/confusion/')}
    if confusion:
      logging.info('Confusion matrix (true/predicted: count) at step %d: %s', step, confusion)
    writer.write(step, results)
    return results

  saving = []  # The step of the save under way, if any.

  def finish_save():
    """Waits for the save under way; a failure of it (disk full, ...) stops the run, one line."""
    try:
      checkpointing.wait(manager, config.checkpoint_timeout_s)
    except checkpointing.CheckpointError as e:
      raise checkpointing.CheckpointError(
          f'Saving the checkpoint of step {saving[-1] if saving else "?"} failed; the newest '
          f'complete one is step {checkpointing.latest_complete_step(workdir)}. {e}') from e

  def save(step, pending, metrics=None):
    _check_finite(pending)  # Nothing non-finite is ever saved.
    t = time.perf_counter()
    finish_save()
    if metrics is not None:
      metrics = {k: v for k, v in metrics.items() if k == best_metric}
    try:
      checkpointing.save(manager, step, state,
                         checkpointing.make_metadata(config, num_classes, step, info.class_names),
                         metrics or None)
    except Exception as e:  # pylint: disable=broad-except
      raise checkpointing.CheckpointError(
          f'Saving the checkpoint of step {step} failed; the newest complete one is step '
          f'{checkpointing.latest_complete_step(workdir)}. {checkpointing.one_line(e)}') from e
    saving.append(step)
    return time.perf_counter() - t

  # The loop.
  train_iter = input_pipeline.train_iterator(config.data, config.batch_size, seed=config.seed,
                                             process_index=pi, process_count=pc,
                                             start_step=start_step)
  log_every = config.get('log_every_steps', 100)
  profile_steps, profile_start = config.get('profile_steps', 0), start_step + 3
  pending = []  # (step, loss, finite) since the last check: they stay on device until a report.
  preemption = Preemption()
  throughput.start(start_step)
  logging.info('Training from step %d to %d.', start_step, steps)
  try:
    for step in range(start_step + 1, steps + 1):
      if profile_steps and step == profile_start and pi == 0:
        jax.profiler.start_trace(os.path.join(workdir, 'profile'))
      state, m = train_step(state, sharding.global_batch(next(train_iter), mesh))
      pending.append((step, m['loss'], m['finite']))
      if profile_steps and step == profile_start + profile_steps and pi == 0:
        jax.block_until_ready(m['loss'])
        jax.profiler.stop_trace()
        logging.info('Wrote a profiler trace of %d steps to %s/profile.', profile_steps, workdir)

      if step % log_every == 0 or step == steps:
        window = _check_finite(pending)
        pending = []
        m = jax.device_get(m)
        report = {'loss': float(np.mean(window)), 'lr': float(m['lr']),
                  'grad_norm': float(m['grad_norm'])}
        report.update(throughput.report(step))
        logging.info('%s', metrics_lib.progress_line(step, steps, report))
        writer.write(step, {f'train/{k}': v for k, v in report.items()})

      t = time.perf_counter()
      excluded, results = 0.0, None
      if config.get('eval_every_steps') and step % config.eval_every_steps == 0 and step != steps:
        results = run_eval(step)
        excluded = time.perf_counter() - t
      if config.get('checkpoint_every_steps') and step % config.checkpoint_every_steps == 0:
        recalibrate(step)
        excluded = time.perf_counter() - t + save(step, pending, results)
      throughput.exclude(excluded)
      if step != steps and preemption.reached(manager, step):
        t = time.perf_counter()
        if manager.latest_step() != step:
          save(step, pending)
        finish_save()
        logging.warning('Preempted: saved step %d in %.1f s; exiting. Rerun the same command to '
                        'resume.', step, time.perf_counter() - t)
        preemption.close()
        manager.close()
        writer.close()
        return {}
  except BaseException:
    # Let a save already under way (of a good state) finish before the error propagates.
    try:
      manager.wait_until_finished()
    except Exception:  # pylint: disable=broad-except
      pass
    preemption.close()
    raise

  results = run_eval(steps)
  if manager.latest_step() != steps:
    save(steps, pending, results)
  finish_save()
  preemption.close()
  manager.close()
  writer.close()
  return results

