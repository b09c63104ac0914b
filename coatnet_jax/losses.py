"""Targets and losses of the recipes: label smoothing, softmax / sigmoid, Mixup / CutMix on device.

Mixup and CutMix run inside the jitted step from the step's rng, so they cost no host time and are
the same on any number of devices (the batch is mixed with itself reversed, across devices).
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax


def smooth_targets(labels, num_classes: int, smoothing: float):
  """One-hot targets (or multi-hot, when ``labels`` is already (B, C)) with label smoothing."""
  if labels.ndim == 1:
    targets = jax.nn.one_hot(labels, num_classes, dtype=jnp.float32)
  else:
    targets = labels.astype(jnp.float32)
  return targets * (1.0 - smoothing) + smoothing / num_classes


def per_example_loss(logits, targets, kind: str):
  """Cross-entropy per example; ``kind`` is 'softmax' or 'sigmoid' (summed over classes)."""
  logits = logits.astype(jnp.float32)
  if kind == 'softmax':
    return optax.softmax_cross_entropy(logits, targets)
  if kind == 'sigmoid':
    return optax.sigmoid_binary_cross_entropy(logits, targets).sum(axis=-1)
  raise ValueError(f'Unknown loss {kind!r}: softmax or sigmoid.')


def balanced_class_weights(counts) -> np.ndarray:
  """Per-class loss weights n_samples / (n_classes * count_c) from per-class example counts, as
  scikit-learn's ``compute_class_weight('balanced')``: the weighted mean over the training set
  stays 1, so learning rates need no change. Classes with no examples get weight 0 and are not
  counted in n_classes (scikit-learn on the classes present)."""
  counts = np.asarray(counts, np.float64)
  present = counts > 0
  if not present.any():
    raise ValueError('Class-balanced weights need examples: every class count is 0.')
  return np.where(present, counts.sum() / (present.sum() * np.where(present, counts, 1.0)), 0.0)


def _cutmix_box_mask(rng, height, width, lam):
  """A (H, W) mask, 1 inside a box of area ~(1 - lam) placed uniformly at random (CutMix paper)."""
  ratio = jnp.sqrt(1.0 - lam)
  cut_h, cut_w = (ratio * height).astype(jnp.int32), (ratio * width).astype(jnp.int32)
  ky, kx = jax.random.split(rng)
  cy = jax.random.randint(ky, (), 0, height)
  cx = jax.random.randint(kx, (), 0, width)
  y0, y1 = jnp.clip(cy - cut_h // 2, 0, height), jnp.clip(cy + cut_h // 2, 0, height)
  x0, x1 = jnp.clip(cx - cut_w // 2, 0, width), jnp.clip(cx + cut_w // 2, 0, width)
  ys, xs = jnp.arange(height)[:, None], jnp.arange(width)[None, :]
  return ((ys >= y0) & (ys < y1) & (xs >= x0) & (xs < x1)).astype(jnp.float32)


def mix(rng, images, targets, mixup_alpha: float, cutmix_alpha: float, switch_prob: float = 0.5):
  """Mixup or CutMix of a batch with its reverse, one draw per batch (timm's default mode).

  With both alphas > 0 CutMix is chosen with probability ``switch_prob``. Returns mixed images and
  targets; the CutMix weight is the box's actual area, so targets match pixels.
  """
  if not mixup_alpha and not cutmix_alpha:
    return images, targets
  k_choice, k_mixup, k_cutmix, k_box = jax.random.split(rng, 4)
  other_images, other_targets = images[::-1], targets[::-1]
  dtype = images.dtype
  images = images.astype(jnp.float32)
  other_images = other_images.astype(jnp.float32)

  def do_mixup():
    lam = jax.random.beta(k_mixup, mixup_alpha, mixup_alpha)
    return lam * images + (1 - lam) * other_images, lam

  def do_cutmix():
    lam = jax.random.beta(k_cutmix, cutmix_alpha, cutmix_alpha)
    box = _cutmix_box_mask(k_box, images.shape[1], images.shape[2], lam)[None, :, :, None]
    return box * other_images + (1 - box) * images, 1.0 - box.mean()

  if mixup_alpha and cutmix_alpha:
    use_cutmix = jax.random.uniform(k_choice) < switch_prob
    mixed, lam = jax.lax.cond(use_cutmix, do_cutmix, do_mixup)
  elif cutmix_alpha:
    mixed, lam = do_cutmix()
  else:
    mixed, lam = do_mixup()
  return mixed.astype(dtype), lam * targets + (1 - lam) * other_targets
