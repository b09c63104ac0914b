"""Schedules against closed forms; the weight-decay mask and AdamW's decay against brute force."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from configs import common
from coatnet_jax import models, optim


def _cfg(**kw):
  c = common.get_base_config().optim
  c.update(dict(lr=1e-3, min_lr=1e-5, schedule='cosine', warmup_steps=100, warmup_epochs=0.0,
                weight_decay=0.05, clip_norm=1.0))
  c.update(kw)
  return c


def test_warmup_then_cosine_matches_formula():
  total, warm = 1000, 100
  s = optim.make_schedule(_cfg(), total)
  for t in (0, 1, 50, 99):
    assert math.isclose(float(s(t)), 1e-3 * t / warm, rel_tol=1e-5, abs_tol=1e-12)
  for t in (100, 300, 550, 999, 1000):
    frac = (t - warm) / (total - warm)
    want = 1e-5 + (1e-3 - 1e-5) * 0.5 * (1 + math.cos(math.pi * frac))
    assert math.isclose(float(s(t)), want, rel_tol=1e-5), t


def test_linear_decay_and_warmup_in_epochs():
  s = optim.make_schedule(_cfg(schedule='linear', warmup_epochs=2.0), 1000, steps_per_epoch=50)
  assert math.isclose(float(s(50)), 0.5e-3, rel_tol=1e-5)  # Warm-up is 2 x 50 = 100 steps.
  for t in (100, 400, 1000):
    want = 1e-3 + (1e-5 - 1e-3) * (t - 100) / 900
    assert math.isclose(float(s(t)), want, rel_tol=1e-5), t


def test_constant_and_no_warmup():
  s = optim.make_schedule(_cfg(schedule='constant', warmup_steps=0), 10)
  assert [float(s(t)) for t in (0, 5, 10)] == pytest.approx([1e-3] * 3)
  with pytest.raises(ValueError):
    optim.make_schedule(_cfg(schedule='step'), 10)


def _pico_params():
  model = models.get_model('coatnet_pico', 10)
  return jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))['params'])


def test_weight_decay_mask_on_real_model():
  params = _pico_params()
  mask = optim.weight_decay_mask(params, common.get_base_config().optim.no_decay)
  names = {optim.path_str(p): m for p, m in jax.tree_util.tree_leaves_with_path(mask)}
  for path, decayed in names.items():
    leaf = path.split('/')[-1]
    parent = path.split('/')[-2]
    no_decay = (leaf == 'bias' or leaf == 'relative_bias'
                or (parent.endswith('_norm') and leaf in ('scale', 'bias')))
    assert decayed == (not no_decay), path
  assert any(p.endswith('relative_bias') and not m for p, m in names.items())
  assert any(p.endswith('_norm/scale') and not m for p, m in names.items())
  assert any(p.endswith('kernel') and m for p, m in names.items())


def test_adamw_decays_only_masked_params():
  params = {'block': {'kernel': jnp.ones((3,)), 'bias': jnp.ones((3,))},
            'attn_norm': {'scale': jnp.ones((3,))}, 'relative_bias': jnp.ones((3,))}
  cfg = _cfg(schedule='constant', warmup_steps=0, lr=0.1, weight_decay=0.5)
  tx = optim.make_optimizer(cfg, optim.make_schedule(cfg, 10))
  zeros = jax.tree.map(jnp.zeros_like, params)
  updates, _ = tx.update(zeros, tx.init(params), params)
  new = optax.apply_updates(params, updates)
  np.testing.assert_allclose(new['block']['kernel'], 1 - 0.1 * 0.5)  # p - lr * wd * p.
  for unchanged in (new['block']['bias'], new['attn_norm']['scale'], new['relative_bias']):
    np.testing.assert_allclose(unchanged, 1.0)


def test_clipping_bounds_the_update_norm():
  cfg = _cfg(schedule='constant', warmup_steps=0, lr=1.0, weight_decay=0.0, clip_norm=1.0)
  tx = optax.chain(optax.clip_by_global_norm(cfg.clip_norm))
  g = {'w': jnp.full((4,), 10.0)}
  clipped, _ = tx.update(g, tx.init(g))
  assert math.isclose(float(optax.tree.norm(clipped)), 1.0, rel_tol=1e-6)
  assert len(optim.make_optimizer(cfg, lambda s: 1.0)) == 2  # clip, then AdamW.


def test_ema_decay_warmup_and_update():
  assert math.isclose(float(optim.ema_decay(0, 0.9999)), 0.1, rel_tol=1e-6)
  assert math.isclose(float(optim.ema_decay(90, 0.9999)), 91 / 100, rel_tol=1e-6)
  assert math.isclose(float(optim.ema_decay(10**7, 0.9999)), 0.9999, rel_tol=1e-6)
  assert float(optim.ema_decay(0, 0.9, warmup=False)) == pytest.approx(0.9)
  out = optim.ema_update({'a': jnp.array(1.0)}, {'a': jnp.array(3.0)}, 0.75)
  assert float(out['a']) == pytest.approx(1.5)
