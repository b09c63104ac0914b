"""Which model a config or checkpoint names, and the two strictnesses of the check (no tracing)."""

import dataclasses

import pytest

from configs import common
from configs import quickstart
from coatnet_jax import architecture
from coatnet_jax import checkpointing
from coatnet_jax import models


def _written_out(name, like):
  """A config whose layout ``name`` is the table's ``like`` written out as data."""
  c = quickstart.get_config()
  c.model.extra_variants[name] = dataclasses.asdict(models.VARIANTS[like])
  c.model.name = name
  return c


def test_a_written_out_layout_is_the_tables_model_and_leaves_the_table_alone():
  table = dict(models.VARIANTS)
  c = _written_out('my_pico', 'coatnet_pico')
  arch = architecture.of_model_config(c.model)
  assert arch.variant == models.VARIANTS['coatnet_pico'] and arch.name == 'my_pico'
  # The same parameter tree: the id follows the layout, not the name.
  assert architecture.architecture_id(c, 10) == architecture.architecture_id(
      quickstart.get_config(), 10)
  # Through a checkpoint's JSON (tuples as lists) it is the same model again.
  meta = checkpointing.make_metadata(c, 10, 0)
  assert architecture.of_metadata(meta) == arch
  assert models.VARIANTS == table


def test_bad_layouts_and_names_are_one_clear_line():
  c = _written_out('coatnet_0', 'coatnet_pico')
  with pytest.raises(ValueError, match='another name'):
    architecture.of_model_config(c.model)
  c = _written_out('mine', 'coatnet_pico')
  c.model.extra_variants.mine.stages = ((('X', 8, 1),),)
  with pytest.raises(ValueError, match=r"model\.extra_variants\.mine: .*'C' or 'T'"):
    architecture.of_model_config(c.model)
  c.model.extra_variants.mine = {'stem_width': 8, 'head_size': 8}
  with pytest.raises(ValueError, match='stages required'):
    architecture.of_model_config(c.model)
  c.model.name = 'coatnet_99'
  with pytest.raises(ValueError, match='coatnet_99'):
    architecture.of_model_config(c.model)


def test_resume_is_strict_and_fine_tuning_lenient():
  base = quickstart.get_config()
  saved = checkpointing.make_metadata(base, 10, 100)
  same = checkpointing.make_metadata(quickstart.get_config(), 10, 0)
  other_head = checkpointing.make_metadata(quickstart.get_config(), 3, 0)
  momentum = quickstart.get_config()
  momentum.model.switches.bn_momentum = 0.99
  other_momentum = checkpointing.make_metadata(momentum, 10, 0)
  pool = quickstart.get_config()
  pool.model.switches.pool = 'avg'
  other_pool = checkpointing.make_metadata(pool, 10, 0)
  wider = _written_out('mine', 'coatnet_pico')
  wider.model.extra_variants.mine.head_size = 8
  other_layout = checkpointing.make_metadata(wider, 10, 0)

  assert architecture.refusal(saved, same, 'w') is None
  for expected in (other_head, other_momentum, other_pool, other_layout):
    assert 'allow_partial_load' in architecture.refusal(saved, expected, 'w')
  for expected in (same, other_head, other_momentum):
    assert architecture.refusal(saved, expected, 'w', fine_tune=True) is None
  assert "'pool': ('max', 'avg')" in architecture.refusal(saved, other_pool, 'w', fine_tune=True)
  assert "builds 'mine'" in architecture.refusal(saved, other_layout, 'w', fine_tune=True)


def test_switches_of_an_older_saved_config_read_at_their_defaults():
  """A run saved before a switch (or extra_variants) existed names the model with the defaults."""
  c = common.get_base_config()
  c.model.name = 'coatnet_pico'
  meta = {'model': 'coatnet_pico', 'config': {'model': {'name': 'coatnet_pico'}}}
  assert architecture.of_metadata(meta) == architecture.of_model_config(c.model)
