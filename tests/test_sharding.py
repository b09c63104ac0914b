"""Mesh sizes with -1 auto-fill and the parameter placement rules (on one CPU device)."""

import jax
import ml_collections
import pytest
from jax.sharding import PartitionSpec as P

from coatnet_jax import sharding


def test_mesh_auto_fill_and_errors():
  n = jax.device_count()
  mesh = sharding.make_mesh(ml_collections.ConfigDict({'data': 1, 'fsdp': -1}))
  assert dict(mesh.shape) == {'data': 1, 'fsdp': n}
  with pytest.raises(ValueError, match='At most one'):
    sharding.make_mesh(ml_collections.ConfigDict({'data': -1, 'fsdp': -1}))
  with pytest.raises(ValueError):
    sharding.make_mesh(ml_collections.ConfigDict({'data': n + 1, 'fsdp': 1}))


def test_leaf_spec_rules():
  spec = sharding.leaf_spec
  # Largest dimension divisible by the fsdp size is sharded.
  assert spec('a/kernel', (3, 3, 64, 128), 4, min_size=1) == P(None, None, None, 'fsdp')
  assert spec('a/kernel', (64, 130), 4, min_size=1) == P('fsdp', None)  # 130 % 4 != 0.
  assert spec('a/kernel', (6, 7), 4, min_size=1) == P()  # Nothing divisible: replicated.
  assert spec('a/kernel', (64, 128), 4, min_size=10**6) == P()  # Too small: replicated.
  assert spec('a/kernel', (64, 128), 1, min_size=1) == P()  # No fsdp axis to use.
  assert spec('opt/mu/a/relative_bias', (64, 128), 4, 1, [('relative_bias$', ())]) == P()
  assert spec('x/w', (64, 128), 4, 1, [('x/', (None, 'fsdp'))]) == P(None, 'fsdp')
  assert spec('step', (), 4, min_size=0) == P()
