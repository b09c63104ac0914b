"""Label smoothing, the two losses and Mixup / CutMix against direct formulas."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from coatnet_jax import losses


def test_label_smoothing():
  t = losses.smooth_targets(jnp.array([2, 0]), 4, 0.1)
  np.testing.assert_allclose(t[0], [0.025, 0.025, 0.925, 0.025], rtol=1e-6)
  np.testing.assert_allclose(t.sum(-1), 1.0, rtol=1e-6)


def test_losses_match_formulas():
  logits = jnp.array([[1.0, -2.0, 0.5]])
  targets = jnp.array([[0.0, 1.0, 0.0]])
  softmax = -np.log(np.exp(-2.0) / np.exp(np.array([1.0, -2.0, 0.5])).sum())
  assert float(losses.per_example_loss(logits, targets, 'softmax')[0]) == pytest.approx(softmax,
                                                                                      rel=1e-5)
  sig = lambda x: 1 / (1 + np.exp(-x))
  want = -(np.log(1 - sig(1.0)) + np.log(sig(-2.0)) + np.log(1 - sig(0.5)))
  assert float(losses.per_example_loss(logits, targets, 'sigmoid')[0]) == pytest.approx(want,
                                                                                      rel=1e-5)


def _batch():
  x = jax.random.uniform(jax.random.key(0), (6, 8, 8, 3))
  y = losses.smooth_targets(jnp.arange(6) % 3, 3, 0.0)
  return x, y


def test_mixup_mixes_images_and_targets_with_one_weight():
  x, y = _batch()
  mx, my = losses.mix(jax.random.key(1), x, y, mixup_alpha=0.8, cutmix_alpha=0.0)
  lam = float(my[0, 0])  # Example 0 (class 0) is mixed with example 5 (class 2).
  np.testing.assert_allclose(mx, lam * x + (1 - lam) * x[::-1], atol=1e-6)
  np.testing.assert_allclose(my, lam * y + (1 - lam) * y[::-1], atol=1e-6)


def test_cutmix_targets_match_pasted_area():
  x, y = _batch()
  for seed in range(5):
    mx, my = losses.mix(jax.random.key(seed), x, y, mixup_alpha=0.0, cutmix_alpha=1.0)
    from_other = np.mean(np.isclose(mx[0], x[5]) & ~np.isclose(x[0], x[5]))
    np.testing.assert_allclose(1 - float(my[0, 0]), from_other, atol=1e-6)


def test_no_mixing_is_identity():
  x, y = _batch()
  mx, my = losses.mix(jax.random.key(0), x, y, 0.0, 0.0)
  assert mx is x and my is y


def test_balanced_class_weights_match_sklearn():
  from sklearn.utils.class_weight import compute_class_weight  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  for counts in ([30, 10], [5, 0, 12, 1], rng.integers(1, 50, 7)):
    counts = np.asarray(counts)
    y = np.repeat(np.arange(len(counts)), counts)
    present = np.flatnonzero(counts)
    want = np.zeros(len(counts))
    want[present] = compute_class_weight('balanced', classes=present, y=y)
    np.testing.assert_allclose(losses.balanced_class_weights(counts), want, rtol=1e-12)
  with pytest.raises(ValueError, match='every class count is 0'):
    losses.balanced_class_weights([0, 0])
