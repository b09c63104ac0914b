"""Orbax checkpoints of the whole train state in ``workdir/checkpoints``: save, resume, keep N.

Restoring goes straight into the shardings of the abstract state, so a resumed run is born sharded
exactly like a fresh one. Preemption and fault handling are a later issue.
"""

import os

from absl import logging
import jax
import orbax.checkpoint as ocp


def make_manager(workdir: str, max_to_keep: int = 3) -> ocp.CheckpointManager:
  options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True)
  return ocp.CheckpointManager(os.path.abspath(os.path.join(workdir, 'checkpoints')),
                               options=options)


def save(manager: ocp.CheckpointManager, step: int, state) -> None:
  manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state)), force=True)


def restore_latest(manager: ocp.CheckpointManager, abstract_state, shardings):
  """The latest saved state placed on ``shardings``, or None when the workdir has none."""
  step = manager.latest_step()
  if step is None:
    return None
  target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                        abstract_state, shardings)
  logging.info('Restoring the train state from step %d.', step)
  restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target)))
  return restored['state']
