"""Orbax checkpoints in ``workdir/checkpoints``: a run is never lost.

Each step directory holds two items: ``state`` (step, params, batch_stats, optimizer state, EMA,
rng: the whole ``TrainState``) and ``metadata`` (JSON: the resolved config, the model name, an
architecture id and the data position). Nothing is ever unpickled: arrays come back through
TensorStore, metadata through JSON.

* Saves are asynchronous; the manager keeps the latest ``keep`` checkpoints and, when an eval
  metric is named, the best one by that metric as well.
* Resume walks the steps from the newest down and takes the first intact one: a step directory
  without its commit marker or with missing or truncated files is moved to
  ``workdir/damaged_checkpoints/`` (never deleted) and the fallback is logged. A step whose
  metadata is unreadable is restored from its arrays when they fit the config's model. When no
  step restores, nothing is moved and the run stops in one line: it never restarts from scratch.
* A checkpoint of another architecture is refused with one line unless the config allows a
  partial load, which takes the leaves whose paths and shapes match and reports the rest.

Restoring goes straight into the shardings of the abstract state, whatever the device count of
the run that saved it, so a resumed run is born sharded exactly like a fresh one.
"""

import json
import os
import shutil
import threading
import time
from typing import Optional

from absl import logging
import jax
import numpy as np
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as ocm

from coatnet_jax import architecture
from coatnet_jax import errors
from coatnet_jax import optim
from coatnet_jax import sharding

CHECKPOINTS = 'checkpoints'
DAMAGED = 'damaged_checkpoints'
# Files Orbax writes last (commit markers) or needs first; a step without one is not intact.
_REQUIRED = ('commit_success.txt', '_CHECKPOINT_METADATA', 'state/_METADATA',
             'state/manifest.ocdbt', 'state/commit_success.txt', 'metadata/metadata')


class CheckpointError(errors.UserError):
  """A checkpoint problem the user must act on; its message is one line."""


class ArchitectureMismatchError(CheckpointError):
  pass


def checkpoint_dir(workdir: str) -> str:
  return os.path.abspath(os.path.join(workdir, CHECKPOINTS))


def make_metadata(config, num_classes: int, step: int, class_names=()) -> dict:
  meta = {'model': config.model.name,
          'architecture': architecture.architecture_id(config, num_classes),
          'num_classes': int(num_classes), 'step': int(step),
          'data_position': int(step),  # The input pipelines are pure functions of (seed, step).
          'config': json.loads(config.to_json_best_effort())}
  if class_names:  # The dataset's names of labels 0..N-1 (class folders), for predictions.
    meta['class_names'] = [str(n) for n in class_names]
  return meta


def make_manager(workdir: str, keep: int, *, async_save: bool, best_metric: Optional[str] = None,
                 best_mode: str = 'max') -> ocp.CheckpointManager:
  """Keeps the latest ``keep`` steps, plus, when ``best_metric`` is named, the best by it (from
  ``save(metrics=)``, ``best_mode`` 'max' or 'min'); a run passes its config's fields."""
  policies = [ocm.preservation_policy.LatestN(n=keep)]
  if best_metric:
    policies.append(ocm.preservation_policy.BestN(
        get_metric_fn=lambda m: m[best_metric], reverse=(best_mode == 'min'), n=1,
        keep_checkpoints_without_metrics=False))
  options = ocp.CheckpointManagerOptions(
      create=True, enable_async_checkpointing=async_save, cleanup_tmp_directories=True,
      preservation_policy=ocm.preservation_policy.AnyPreservationPolicy(policies))
  return ocp.CheckpointManager(checkpoint_dir(workdir), options=options,
                               item_handlers=_handlers())


def _handlers():
  return {'state': ocp.StandardCheckpointHandler(), 'metadata': ocp.JsonCheckpointHandler()}


def save_variables(workdir: str, config, variables: dict, num_classes: int,
                   class_names=()) -> None:
  """Writes a model-only checkpoint (step 0: params, batch_stats; no optimizer) that
  ``config.init.path``, ``evaluate``, ``tools.export`` and ``predict`` accept."""
  manager = make_manager(workdir, keep=1, async_save=False)
  state = {'step': np.zeros((), np.int32), 'params': variables['params'],
           'batch_stats': variables.get('batch_stats') or {}}
  save(manager, 0, state, make_metadata(config, num_classes, 0, class_names))
  wait(manager, config.checkpoint_timeout_s)
  manager.close()


def save(manager: ocp.CheckpointManager, step: int, state, metadata: dict,
         metrics: Optional[dict] = None) -> None:
  """Starts an asynchronous save; the next save or ``wait_until_finished`` waits for it."""
  manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                             metadata=ocp.args.JsonSave(metadata)),
               metrics=metrics, force=True)


def wait(manager: ocp.CheckpointManager, timeout_s: float) -> None:
  """Waits for the pending save; an error in it (disk full, ...) is raised here, one line.

  A save that neither finishes nor fails within ``timeout_s`` (``config.checkpoint_timeout_s``)
  is reported as failed: Orbax can hang when a background write fails at an unlucky moment (seen
  with a full disk).
  """
  failed = []

  def run():
    try:
      manager.wait_until_finished()
    except Exception as e:  # pylint: disable=broad-except
      failed.append(e)

  waiter = threading.Thread(target=run, daemon=True, name='coatnet_checkpoint_wait')
  waiter.start()
  waiter.join(timeout_s)
  if waiter.is_alive():
    raise CheckpointError(f'The checkpoint save did not finish within {timeout_s:.0f} s (a hung '
                          f'or failed write; check free disk space and the log above).')
  if failed:
    raise CheckpointError(errors.describe(failed[0])) from failed[0]


def latest_complete_step(workdir: str) -> Optional[int]:
  """The newest step directory with all its files and commit markers (no restore attempted)."""
  for step in _steps_on_disk(workdir):
    if not _missing_files(os.path.join(checkpoint_dir(workdir), str(step))):
      return step
  return None


def _steps_on_disk(workdir: str) -> list[int]:
  d = checkpoint_dir(workdir)
  if not os.path.isdir(d):
    return []
  return sorted((int(n) for n in os.listdir(d) if n.isdigit()), reverse=True)


def _missing_files(step_dir: str) -> list[str]:
  return [f for f in _REQUIRED if not os.path.exists(os.path.join(step_dir, f))]


def read_metadata(workdir: str, step: int) -> dict:
  with open(os.path.join(checkpoint_dir(workdir), str(step), 'metadata', 'metadata')) as f:
    return json.load(f)


def latest_metadata(workdir: str) -> Optional[dict]:
  """Metadata of the newest step with a readable metadata item; None without checkpoints."""
  for step in _steps_on_disk(workdir):
    try:
      return read_metadata(workdir, step)
    except (OSError, ValueError):
      continue
  return None


def _check_resume(saved: dict, expected: dict, allow_partial: bool, where: str) -> bool:
  """Whether a resume from ``saved`` loads partially: a checkpoint of another architecture is
  refused in one line unless partial loads are on."""
  problem = architecture.refusal(saved, expected, where)
  if problem is None:
    return False
  if not allow_partial:
    raise ArchitectureMismatchError(problem)
  logging.warning('Partial load: %s', problem)
  return True


def _set_aside(workdir: str, step: int, why: str) -> None:
  """Moves a damaged step out of Orbax's sight (process 0); nothing is deleted."""
  logging.warning('Checkpoint step %d in %s is damaged (%s); falling back to an older one. '
                  'It is kept in %s/%s.', step, workdir, why, DAMAGED, step)
  if jax.process_index() == 0:
    dest = os.path.join(workdir, DAMAGED, str(step))
    if os.path.exists(dest):
      dest += f'.{int(time.time())}'
    os.makedirs(os.path.dirname(dest), exist_ok=True)
    shutil.move(os.path.join(checkpoint_dir(workdir), str(step)), dest)


def restore_latest(workdir: str, abstract_state, shardings, expected: Optional[dict] = None,
                   allow_partial: bool = False, init_fn=None):
  """(state, metadata) of the newest intact checkpoint on ``shardings``, or (None, None).

  Damaged steps are set aside with a warning. ``expected`` (``make_metadata``) is compared with
  the saved metadata. With ``allow_partial`` and another architecture, ``init_fn()`` builds a
  fresh state whose leaves are replaced by the saved ones of the same path and shape.
  """
  target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                        abstract_state, shardings)
  damaged = []
  for step in _steps_on_disk(workdir):
    step_dir = os.path.join(checkpoint_dir(workdir), str(step))
    missing = _missing_files(step_dir)
    if missing:
      damaged.append((step, f'missing {", ".join(missing)}'))
      continue
    try:
      saved = read_metadata(workdir, step)
    except (OSError, ValueError) as e:
      # The arrays may still be whole: they are tried below against this config's shapes.
      logging.warning('Checkpoint step %d in %s has unreadable metadata (%s); trying its arrays '
                      'against this config\'s model.', step, workdir, errors.describe(e))
      saved = None
    partial = False
    if expected is not None and saved is not None:
      partial = _check_resume(saved, expected, allow_partial, workdir)
    # A read-only manager: nothing on disk changes while we probe.
    reader = ocp.CheckpointManager(checkpoint_dir(workdir), options=ocp.CheckpointManagerOptions(
        read_only=True, enable_async_checkpointing=False), item_handlers=_handlers())
    try:
      if partial:  # Errors here are not damage: they propagate, nothing is set aside.
        state = _partial_restore(reader, step, init_fn, shardings)
      else:
        try:
          state = reader.restore(step, args=ocp.args.Composite(
              state=ocp.args.StandardRestore(target)))['state']
          jax.block_until_ready(state)
        except Exception as e:  # pylint: disable=broad-except
          damaged.append((step, f'restore failed: {errors.describe(e)}'))
          continue
    finally:
      reader.close()
    for s, why in damaged:
      _set_aside(workdir, s, why)
    sharding.barrier('coatnet_checkpoint_fallback')
    logging.info('Restored step %d from %s%s%s.', step, checkpoint_dir(workdir),
                 f' after skipping damaged step(s) {[s for s, _ in damaged]}' if damaged else '',
                 '' if saved is not None else ' (its arrays; its metadata is unreadable)')
    return state, saved
  if damaged:  # A run that had checkpoints never starts again from scratch on its own.
    raise CheckpointError(
        f'No checkpoint in {checkpoint_dir(workdir)} can be restored ('
        f'{"; ".join(f"step {s}: {why}" for s, why in damaged)[:600]}); nothing was moved or '
        f'deleted. Repair them, or move {checkpoint_dir(workdir)} away to start from scratch.')
  return None, None


def _partial_restore(reader, step, init_fn, shardings):
  """Leaves of the fresh state replaced by saved leaves with the same path and shape."""
  if init_fn is None:
    raise CheckpointError('A partial load needs the init function of the new state.')
  meta = reader.item_metadata(step)['state']
  saved_shapes = {optim.path_str(p): tuple(m.shape) for p, m in
                  jax.tree_util.tree_flatten_with_path(
                      meta, is_leaf=lambda x: hasattr(x, 'shape'))[0]}
  first = jax.tree.leaves(shardings)[0]
  rep = (jax.sharding.NamedSharding(first.mesh, jax.sharding.PartitionSpec())
         if hasattr(first, 'mesh') else first)
  saved_target = jax.tree.map(
      lambda m: jax.ShapeDtypeStruct(tuple(m.shape), m.dtype, sharding=rep), meta,
      is_leaf=lambda x: hasattr(x, 'shape'))
  saved = reader.restore(step, args=ocp.args.Composite(
      state=ocp.args.StandardRestore(saved_target)))['state']
  saved_flat = {optim.path_str(p): v for p, v in jax.tree_util.tree_flatten_with_path(saved)[0]}
  fresh = jax.jit(init_fn, out_shardings=shardings)()
  loaded, skipped = [], []

  def pick(path, leaf, sharding):
    key = optim.path_str(path)
    if key in saved_flat and saved_shapes.get(key) == tuple(leaf.shape):
      loaded.append(key)
      return jax.device_put(np.asarray(saved_flat[key]).astype(leaf.dtype), sharding)
    skipped.append(key)
    return leaf

  state = jax.tree_util.tree_map_with_path(pick, fresh, shardings)
  logging.warning('Partial load of step %d: %d leaves loaded, %d kept fresh: %s', step,
                  len(loaded), len(skipped), skipped[:20])
  return state


def check_workdir(workdir: str, expected: dict, allow_partial: bool) -> None:
  """Before anything is written: the workdir is writable and holds no other model's checkpoints."""
  probe = os.path.abspath(workdir)
  while not os.path.exists(probe):
    parent = os.path.dirname(probe)
    if parent == probe:
      break
    probe = parent
  if not os.path.isdir(probe):
    raise CheckpointError(f'Workdir {workdir}: {probe} is not a directory.')
  # os.access says yes to root on a read-only mount; try a real write and remove it again.
  test_file = os.path.join(probe, f'.coatnet_write_test.{os.getpid()}')
  try:
    with open(test_file, 'w') as f:
      f.write('x')
    os.remove(test_file)
  except OSError as e:
    raise CheckpointError(f'Workdir {workdir} is not writable ({probe}: '
                          f'{e.strerror or e}).') from e
  saved = latest_metadata(workdir)
  if saved is not None:
    _check_resume(saved, expected, allow_partial, f'Workdir {workdir}')
