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

import contextlib
import dataclasses
import os
import time
from typing import Any, Optional

from absl import logging
import jax
import ml_collections
import numpy as np
from clu import parameter_overview

from coatnet_jax import batchnorm_stats
from coatnet_jax import checkpointing
from coatnet_jax import config_checks
from coatnet_jax import errors
from coatnet_jax import input_pipeline
from coatnet_jax import losses
from coatnet_jax import metrics as metrics_lib
from coatnet_jax import preemption as preemption_lib
from coatnet_jax import pretrained
from coatnet_jax import sharding
from coatnet_jax import steps as steps_lib
from coatnet_jax import workdir_lock
from coatnet_jax.data import source as data_source


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Trains and evaluates as ``config`` says; returns the final eval metrics.

  Stops early, with a checkpoint, on SIGTERM, Ctrl-C or a preemption notice; then the result is
  {}. The workdir is locked for the run (``workdir_lock``); nothing is written before every check
  of ``config_checks.check_inputs`` has passed.
  """
  info, num_classes = config_checks.check_inputs(config, workdir)  # Before anything is written.
  # Whatever the run holds (lock, checkpoint manager, metric writer, signal handlers) is let go
  # here, once, in reverse order, whether the run ends, is preempted or fails.
  with contextlib.ExitStack() as teardown:
    _lock(workdir, teardown)

    # Mesh: one ('data', 'fsdp') mesh over every device of every process.
    mesh = sharding.make_mesh(config.mesh)
    logging.info('Mesh %s over %d %s devices, %d processes.', dict(mesh.shape), mesh.devices.size,
                 jax.devices()[0].device_kind, jax.process_count())

    # Data.
    steps = steps_lib.total_steps(config, info.train_size)
    logging.info('%s: %d train / %d eval examples, %d classes; %d steps of batch %d.',
                 config.data.name, info.train_size, info.eval_size, num_classes, steps,
                 config.batch_size)

    # Model and optimizer.
    model = steps_lib.build_model(config, num_classes)
    schedule, tx = steps_lib.build_optimizer(config, info.train_size)
    class_weights = _class_weights(config)

    # Abstract init -> shardings -> restore, or init born sharded.
    init_fn = steps_lib.make_init_fn(config, model, tx)
    abstract_state, state_shardings = _state_shardings(config, init_fn, mesh)
    state, start_step = _restore_or_init(config, workdir, init_fn, abstract_state,
                                         state_shardings, model, num_classes, steps)
    manager = checkpointing.make_manager(
        workdir, config.keep_checkpoints, best_metric=_best_metric(config),
        best_mode=config.best_mode, async_save=config.async_checkpointing)
    teardown.push(_closing(manager))
    # Written only now: a workdir whose checkpoints all fail to restore is left as it was.
    metrics_lib.record_config_changes(
        workdir, start_step, config_checks.resume_changes(config, workdir, steps)[1])
    metrics_lib.write_config(config, workdir)
    metrics_lib.rewind_metrics(workdir, start_step)

    # Steps: compiled ahead of time so the compile time is reported once and apart from step time.
    train_step = steps_lib.jit_train_step(config, model, tx, schedule, num_classes, mesh,
                                          state_shardings, class_weights)
    train_step, eval_step, compile_s = _compile(config, train_step, model, num_classes, mesh,
                                                state_shardings, state)
    writer = metrics_lib.MetricWriter(workdir, tensorboard=config.tensorboard)
    teardown.callback(writer.close)
    writer.write(start_step, {'compile_s': compile_s, 'data/skipped_images': info.skipped_images})

    run = _Run(config, workdir, info, num_classes, mesh, steps, state, manager, writer, eval_step,
               _recalibrator(config, num_classes, mesh, state_shardings, state))
    throughput = metrics_lib.Throughput(
        config.batch_size, mesh.devices.size, steps,
        metrics_lib.train_flops_per_image(metrics_lib.model_macs(model, config.data.image_size)),
        metrics_lib.peak_flops(jax.devices()[0].device_kind))
    preemption = preemption_lib.Preemption()
    teardown.callback(preemption.close)
    return run.loop(train_step, start_step, throughput, preemption)


def _lock(workdir: str, teardown: contextlib.ExitStack) -> None:
  """Takes the workdir's lock (process 0) until ``teardown``; a live holder is a user error."""
  lock = workdir_lock.acquire(workdir, jax.process_index())
  if lock is not None:
    teardown.callback(lock.release)


def _closing(manager):
  """The checkpoint manager's exit: closed after a clean end; after an error, a save already under
  way (of a good state) is let finish before the error propagates."""

  def close(exc_type, exc, tb):  # pylint: disable=unused-argument
    if exc_type is None:
      manager.close()
    else:
      try:
        manager.wait_until_finished()
      except Exception:  # pylint: disable=broad-except
        pass
    return False

  return close


def _class_weights(config) -> Optional[np.ndarray]:
  """One loss weight per class (``loss.class_weights='balanced'``), or None."""
  if not config.loss.class_weights:
    return None
  counts = input_pipeline.train_label_counts(config.data)
  weights = losses.balanced_class_weights(counts)
  logging.info('Class-balanced loss: weights %s for train counts %s.',
               np.round(weights, 4).tolist(), counts.tolist())
  return weights


def _state_shardings(config, init_fn, mesh):
  """(abstract state, its shardings), from shapes alone (``jax.eval_shape``: nothing allocated)."""
  abstract_state = jax.eval_shape(init_fn)
  state_shardings = sharding.tree_shardings(abstract_state, mesh, config.sharding)
  sharding.log_shardings(abstract_state.params, state_shardings.params)
  num_params = sum(x.size for x in jax.tree.leaves(abstract_state.params))
  logging.info('Model %s: %.2fM parameters.\n%s', config.model.name, num_params / 1e6,
               parameter_overview.get_parameter_overview(abstract_state.params,
                                                         include_stats=False))
  return abstract_state, state_shardings


def _restore_or_init(config, workdir, init_fn, abstract_state, state_shardings, model,
                     num_classes, steps):
  """(state, its step): the newest intact checkpoint of ``workdir``, else a fresh state
  (warm-started from ``config.init.path`` when set), born sharded."""
  t0 = time.perf_counter()
  expected = checkpointing.make_metadata(config, num_classes, 0)
  state, _ = checkpointing.restore_latest(
      workdir, abstract_state, state_shardings, expected,
      allow_partial=config.allow_partial_load, init_fn=init_fn)
  if state is None:
    state = jax.jit(init_fn, out_shardings=state_shardings)()
    if config.init.path:
      state = pretrained.warm_start(state, config, model, num_classes, state_shardings)
  start_step = int(jax.device_get(state.step))
  if start_step > steps:  # config_checks refuses this from the metadata; the arrays decide here.
    raise errors.UserError(f'The restored step {start_step} is beyond the run\'s {steps} steps; '
                           f'raise total_steps (or num_epochs) to at least {start_step}.')
  logging.info('Train state ready at step %d in %.1f s (%s).', start_step,
               time.perf_counter() - t0, 'restored' if start_step else 'initialised')
  return state, start_step


def _best_metric(config) -> str:
  return config.best_metric or ('eval/top1' if config.loss.kind == 'softmax' else 'eval/prec@1')


def _eval_batch(config) -> int:
  return config.eval_batch_size or config.batch_size  # Divisible: config_checks.


def _compile(config, train_step, model, num_classes, mesh, state_shardings, state):
  """(compiled train step, compiled eval step, seconds): lowered for the global batch shapes."""
  batch_sharding = sharding.batch_sharding(mesh)
  eval_step = jax.jit(steps_lib.make_eval_step(config, model, num_classes),
                      in_shardings=(state_shardings.params, state_shardings.batch_stats,
                                    batch_sharding), out_shardings=sharding.replicated(mesh))
  t0 = time.perf_counter()
  train_step = train_step.lower(state, steps_lib.abstract_batch(
      config, config.batch_size, num_classes, batch_sharding)).compile()
  eval_step = eval_step.lower(state.params, state.batch_stats, steps_lib.abstract_batch(
      config, _eval_batch(config), num_classes, batch_sharding, with_mask=True)).compile()
  compile_s = time.perf_counter() - t0
  logging.info('Compiled the train and eval steps in %.1f s.', compile_s)
  sharding.barrier('coatnet_compiled')
  return train_step, eval_step, compile_s


def _recalibrator(config, num_classes, mesh, state_shardings, state):
  """``batchnorm_stats.Recalibrator`` when the config asks for it and the model has BatchNorm."""
  if not config.batchnorm_batches or not jax.tree.leaves(state.batch_stats):
    return None
  return batchnorm_stats.Recalibrator(
      config, steps_lib.build_model(batchnorm_stats.recalibration_config(config), num_classes),
      mesh, state_shardings, jax.process_index(), jax.process_count())


@dataclasses.dataclass
class _Run:
  """What the loop, its evaluations and its saves share: the state and where it goes."""
  config: ml_collections.ConfigDict
  workdir: str
  info: data_source.DatasetInfo
  num_classes: int
  mesh: jax.sharding.Mesh
  steps: int  # The last step of the run.
  state: Any  # steps.TrainState, replaced by every step.
  manager: Any  # checkpointing's Orbax CheckpointManager.
  writer: metrics_lib.MetricWriter
  eval_step: Any  # Compiled.
  bn_stats: Optional[batchnorm_stats.Recalibrator]
  recalibrated: list = dataclasses.field(default_factory=list)  # Steps with recomputed BN stats.
  saving: Optional[int] = None  # The step of the save under way, if any.

  def loop(self, train_step, start_step: int, throughput, preemption) -> dict:
    """Steps from ``start_step`` to the end, or to a preemption (then {})."""
    config, steps, pi = self.config, self.steps, jax.process_index()
    train_iter = input_pipeline.train_iterator(config.data, config.batch_size, seed=config.seed,
                                               process_index=pi, process_count=jax.process_count(),
                                               start_step=start_step)
    profile_steps, profile_start = config.profile_steps, start_step + 3
    pending = []  # (step, loss, finite) since the last check: they stay on device until a report.
    throughput.start(start_step)
    logging.info('Training from step %d to %d.', start_step, steps)
    for step in range(start_step + 1, steps + 1):
      if profile_steps and step == profile_start and pi == 0:
        jax.profiler.start_trace(os.path.join(self.workdir, 'profile'))
      self.state, m = train_step(self.state, sharding.global_batch(next(train_iter), self.mesh))
      pending.append((step, m['loss'], m['finite']))
      if profile_steps and step == profile_start + profile_steps and pi == 0:
        jax.block_until_ready(m['loss'])
        jax.profiler.stop_trace()
        logging.info('Wrote a profiler trace of %d steps to %s/profile.', profile_steps,
                     self.workdir)

      if step % config.log_every_steps == 0 or step == steps:
        self.report(step, pending, m, throughput)
        pending = []

      t = time.perf_counter()
      excluded, results = 0.0, None
      if config.eval_every_steps and step % config.eval_every_steps == 0 and step != steps:
        results = self.evaluate(step)
        excluded = time.perf_counter() - t
      if config.checkpoint_every_steps and step % config.checkpoint_every_steps == 0:
        self.recalibrate(step)
        excluded = time.perf_counter() - t + self.save(step, pending, results)
      throughput.exclude(excluded)
      if step != steps and preemption.reached(self.manager, step):
        t = time.perf_counter()
        if self.manager.latest_step() != step:
          self.save(step, pending)
        self.finish_save()
        logging.warning('Preempted: saved step %d in %.1f s; exiting. Rerun the same command to '
                        'resume.', step, time.perf_counter() - t)
        return {}

    results = self.evaluate(steps)
    if self.manager.latest_step() != steps:
      self.save(steps, pending, results)
    self.finish_save()
    return results

  def report(self, step: int, pending: list, m: dict, throughput) -> None:
    """The progress line and train/ metrics; stops the run at a non-finite step."""
    window = _check_finite(pending)
    m = jax.device_get(m)
    report = {'loss': float(np.mean(window)), 'lr': float(m['lr']),
              'grad_norm': float(m['grad_norm'])}
    report.update(throughput.report(step))
    logging.info('%s', metrics_lib.progress_line(step, self.steps, report))
    self.writer.write(step, {f'train/{k}': v for k, v in report.items()})

  def recalibrate(self, step: int) -> None:
    """BatchNorm population statistics for this step's parameters, once per step."""
    if self.bn_stats is not None and step not in self.recalibrated[-1:]:
      self.state = self.state.replace(
          batch_stats=self.bn_stats(self.state.params, self.state.batch_stats))
      self.recalibrated.append(step)

  def evaluate(self, step: int) -> dict:
    """Exact eval of the parameters (and the EMA's) on the whole eval split; logged, written."""
    self.recalibrate(step)
    state, results = self.state, {}
    weights = [('', state.params)]
    if state.ema_params is not None:
      weights.append(('ema_', state.ema_params))
    for prefix, params in weights:
      batches = input_pipeline.eval_iterator(self.config.data, _eval_batch(self.config),
                                             process_index=jax.process_index(),
                                             process_count=jax.process_count())
      r = steps_lib.evaluate(self.eval_step, params, state.batch_stats, batches, self.mesh,
                             self.config.loss.kind, self.info.class_names)
      results.update({f'eval/{prefix}{k}': v for k, v in r.items()})
    if results['eval/count'] != self.info.eval_size:
      raise RuntimeError(f'Evaluated {results["eval/count"]} examples; the split has '
                         f'{self.info.eval_size}.')
    logging.info('Eval at step %d: %s', step,
                 ', '.join(f'{k[5:]} {v:.4f}' if isinstance(v, float) else f'{k[5:]} {v}'
                           for k, v in results.items() if '/confusion/' not in k))
    confusion = {k[len('eval/confusion/'):]: int(v) for k, v in results.items()
                 if k.startswith('eval/confusion/')}
    if confusion:
      logging.info('Confusion matrix (true/predicted: count) at step %d: %s', step, confusion)
    self.writer.write(step, results)
    return results

  def save(self, step: int, pending: list, metrics: Optional[dict] = None) -> float:
    """Starts saving the state at ``step`` (after the previous save); returns the seconds spent."""
    _check_finite(pending)  # Nothing non-finite is ever saved.
    t = time.perf_counter()
    self.finish_save()
    if metrics is not None:
      metrics = {k: v for k, v in metrics.items() if k == _best_metric(self.config)}
    metadata = checkpointing.make_metadata(self.config, self.num_classes, step,
                                           self.info.class_names)
    try:
      checkpointing.save(self.manager, step, self.state, metadata, metrics or None)
    except Exception as e:  # pylint: disable=broad-except
      raise self._save_failed(step, errors.describe(e)) from e
    self.saving = step
    return time.perf_counter() - t

  def finish_save(self) -> None:
    """Waits for the save under way; a failure of it (disk full, ...) stops the run, one line."""
    try:
      checkpointing.wait(self.manager, self.config.checkpoint_timeout_s)
    except checkpointing.CheckpointError as e:
      raise self._save_failed('?' if self.saving is None else self.saving, e) from e

  def _save_failed(self, step, detail) -> checkpointing.CheckpointError:
    return checkpointing.CheckpointError(
        f'Saving the checkpoint of step {step} failed; the newest complete one is step '
        f'{checkpointing.latest_complete_step(self.workdir)}. {detail}')


class NonFiniteLossError(FloatingPointError):
  """A step's loss or update was NaN or Inf: the run stops there, naming the step."""


def _check_finite(pending):
  """Raises at the first non-finite step; ``pending`` is [(step, loss, finite flag)], the train
  step's outputs since the last check, still on the device."""
  values = jax.device_get([(l, f) for _, l, f in pending])
  for (step, _, _), (value, finite) in zip(pending, values):
    if not np.isfinite(value) or not finite:
      what = f'Loss is {value}' if not np.isfinite(value) else 'The update is not finite'
      raise NonFiniteLossError(
          f'{what} at step {step}; stopping. The parameters were not updated by that '
          f'step and nothing non-finite was saved. Lower the learning rate, check the data, or '
          f'resume from the last checkpoint.')
  return [float(v) for v, _ in values]
