"""One device mesh ('data', 'fsdp') and the rules that place parameters and batches on it.

Parameters (and the optimizer and EMA states that mirror them) are sharded over 'fsdp' on their
largest divisible dimension when they hold at least ``min_size`` elements, replicated otherwise;
regex rules on parameter paths override that. The batch is split over both axes, so with
``fsdp=-1`` this is ZeRO-3-style data parallelism, and with ``fsdp=1`` plain data parallelism.
"""

import math
import re

from absl import logging
import jax
from jax.sharding import NamedSharding, PartitionSpec as P
import numpy as np

from coatnet_jax import optim

AXES = ('data', 'fsdp')
BATCH_SPEC = P(AXES)


def make_mesh(config, devices=None) -> jax.sharding.Mesh:
  """The mesh from ``config`` = {'data': n, 'fsdp': m} (``config.mesh`` or a plain dict); one -1
  is filled from the device count."""
  devices = devices if devices is not None else jax.devices()
  sizes = [int(config[a]) for a in AXES]
  if sizes.count(-1) > 1:
    raise ValueError(f'At most one mesh axis may be -1; got {dict(zip(AXES, sizes))}.')
  known = math.prod(s for s in sizes if s != -1)
  if -1 in sizes:
    if len(devices) % known:
      raise ValueError(f'{len(devices)} devices do not divide into mesh {dict(zip(AXES, sizes))}.')
    sizes[sizes.index(-1)] = len(devices) // known
  if math.prod(sizes) != len(devices):
    raise ValueError(f'Mesh {dict(zip(AXES, sizes))} needs {math.prod(sizes)} devices; '
                     f'{len(devices)} are present.')
  return jax.make_mesh(tuple(sizes), AXES, devices=devices,
                       axis_types=(jax.sharding.AxisType.Auto,) * len(AXES))


def leaf_spec(path: str, shape, fsdp_size: int, min_size: int, rules=()) -> P:
  """PartitionSpec of one array: the first matching rule, else fsdp on its largest divisible dim."""
  for pattern, spec in rules:
    if re.search(pattern, path):
      return P(*spec) if spec else P()
  if fsdp_size == 1 or not shape or np.prod(shape) < min_size:
    return P()
  for dim in sorted(range(len(shape)), key=lambda d: -shape[d]):
    if shape[dim] % fsdp_size == 0:
      spec = [None] * len(shape)
      spec[dim] = 'fsdp'
      return P(*spec)
  return P()


def tree_shardings(abstract_tree, mesh, config):
  """NamedShardings for every array of a (train-state) tree; ``config`` is ``config.sharding``."""
  rules = [(r[0], tuple(r[1])) for r in config.rules]
  min_size = config.min_size
  fsdp_size = mesh.shape['fsdp']

  def one(path, leaf):
    spec = leaf_spec(optim.path_str(path), getattr(leaf, 'shape', ()), fsdp_size, min_size, rules)
    return NamedSharding(mesh, spec)

  return jax.tree_util.tree_map_with_path(one, abstract_tree)


def log_shardings(abstract_params, shardings):
  sharded = [(optim.path_str(p), s.spec) for (p, _), s in zip(
      jax.tree_util.tree_leaves_with_path(abstract_params), jax.tree.leaves(shardings))
             if any(x is not None for x in s.spec)]
  logging.info('%d parameter arrays sharded over fsdp, the rest replicated. First few: %s',
               len(sharded), sharded[:5])


def batch_sharding(mesh) -> NamedSharding:
  return NamedSharding(mesh, BATCH_SPEC)


def replicated(mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def global_batch(local_batch: dict, mesh) -> dict:
  """Process-local numpy arrays -> one global jax.Array per key, split over ('data', 'fsdp')."""
  sharding = batch_sharding(mesh)
  return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in local_batch.items()}


def barrier(name: str, timeout_s: int = 3600) -> None:
  """Every process waits here, on the coordination service (not a collective): a collective must
  not start while another process still compiles or reads, since Gloo (CPU) gives up on its peers
  after 30 s. jax has no public API for this barrier; its own serialization uses it."""
  from jax._src import distributed  # pylint: disable=g-import-not-at-top
  if jax.process_count() > 1 and distributed.global_state.client is not None:
    distributed.global_state.client.wait_at_barrier(name, timeout_in_ms=timeout_s * 1000)
