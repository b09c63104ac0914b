"""Unit tests of coatnet_jax.checkpointing and the trainer's metrics rewind, in-process, tiny trees."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import quickstart
from coatnet_jax import architecture
from coatnet_jax import checkpointing
from coatnet_jax import metrics


def _meta(arch, model='m', classes=10, step=0):
  return {'model': model, 'architecture': arch, 'num_classes': classes, 'step': step,
          'data_position': step, 'config': {}}


def _shardings(tree):
  s = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  return jax.tree.map(lambda _: s, tree)


def _save(workdir, step, state, meta, metrics=None, keep=3, best=None):
  manager = checkpointing.make_manager(workdir, keep, async_save=True, best_metric=best)
  checkpointing.save(manager, step, state, meta, metrics)
  checkpointing.wait(manager, 600.0)
  manager.close()


def test_architecture_id_tracks_variant_switches_and_classes():
  c = quickstart.get_config()
  a = architecture.architecture_id(c, 10)
  assert a == architecture.architecture_id(quickstart.get_config(), 10)
  assert a != architecture.architecture_id(c, 11)
  c.model.switches.bn_momentum = 0.99
  assert a != architecture.architecture_id(c, 10)
  d = quickstart.get_config()
  d.model.name = 'coatnet_0'
  assert a != architecture.architecture_id(d, 10)
  e = quickstart.get_config()
  e.model.switches.pool = 'max'  # The default, spelled out: the same model, the same id.
  assert a == architecture.architecture_id(e, 10)
  meta = checkpointing.make_metadata(c, 10, 7)
  assert meta['data_position'] == 7 and meta['config']['model']['name'] == 'coatnet_pico'


def test_other_architecture_is_refused_unless_partial_load(tmp_path):
  workdir = str(tmp_path)
  saved = {'step': jnp.array(5), 'params': {'body': jnp.full((4,), 2.0),
                                            'head': jnp.ones((3, 10))}}
  _save(workdir, 5, saved, _meta('a', classes=10, step=5))
  fresh = lambda: {'step': jnp.array(0), 'params': {'body': jnp.zeros((4,)),  # pylint: disable=g-long-lambda
                                                    'head': jnp.zeros((3, 7))}}
  abstract = jax.eval_shape(fresh)
  with pytest.raises(checkpointing.ArchitectureMismatchError) as e:
    checkpointing.restore_latest(workdir, abstract, _shardings(abstract), _meta('b', classes=7))
  assert '\n' not in str(e.value) and 'allow_partial_load' in str(e.value)
  with pytest.raises(checkpointing.ArchitectureMismatchError):
    checkpointing.check_workdir(workdir, _meta('b', classes=7), allow_partial=False)
  state, meta = checkpointing.restore_latest(workdir, abstract, _shardings(abstract),
                                             _meta('b', classes=7), allow_partial=True,
                                             init_fn=fresh)
  assert meta['architecture'] == 'a'
  np.testing.assert_array_equal(state['params']['body'], 2.0)  # Same path and shape: loaded.
  np.testing.assert_array_equal(state['params']['head'], np.zeros((3, 7)))  # Changed: fresh.
  assert int(state['step']) == 5


def test_same_architecture_restores_exactly(tmp_path):
  workdir = str(tmp_path)
  saved = {'step': jnp.array(3), 'x': jax.random.normal(jax.random.key(0), (5, 3))}
  _save(workdir, 3, saved, _meta('a', step=3))
  abstract = jax.eval_shape(lambda: saved)
  state, meta = checkpointing.restore_latest(workdir, abstract, _shardings(abstract), _meta('a'))
  assert meta['step'] == 3 and np.array_equal(state['x'], saved['x'])
  checkpointing.check_workdir(workdir, _meta('a'), allow_partial=False)


def test_keeps_latest_n_and_the_best(tmp_path):
  workdir = str(tmp_path)
  manager = checkpointing.make_manager(workdir, keep=2, async_save=True, best_metric='eval/top1')
  top1 = {1: 0.1, 2: 0.9, 3: 0.2, 4: None, 5: 0.4, 6: None}
  for step, value in top1.items():
    metrics = None if value is None else {'eval/top1': value}
    checkpointing.save(manager, step, {'x': jnp.full((2,), step)}, _meta('a', step=step), metrics)
  checkpointing.wait(manager, 600.0)
  assert sorted(manager.all_steps()) == [2, 5, 6]
  manager.close()


def test_rewind_metrics_drops_records_after_the_restored_step(tmp_path):
  path = tmp_path / 'metrics.jsonl'
  rows = [{'step': 0, 'compile_s': 1.0}] + [{'step': s, 'train/loss': s} for s in range(1, 9)]
  rows.append({'step': 4, 'compile_s': 0.5})  # A restart at 4 ...
  rows += [{'step': s, 'train/loss': s} for s in (5, 6)]
  path.write_text(''.join(json.dumps(r) + '\n' for r in rows) + '{"step": 7, "train/lo')  # kill -9
  metrics.rewind_metrics(str(tmp_path), 4)
  kept = [json.loads(l) for l in path.read_text().splitlines()]
  assert [r['step'] for r in kept] == [0, 1, 2, 3, 4]
  assert not os.path.exists(str(path) + '.tmp')


def test_check_workdir_creates_nothing(tmp_path):
  workdir = str(tmp_path / 'a' / 'b')
  checkpointing.check_workdir(workdir, _meta('a'), allow_partial=False)
  assert os.listdir(tmp_path) == []
