"""MAC and parameter counting (coatnet_jax.cost).

Each hand-built case states its count worked out from the formula with explicit numbers. Where there
is no padding, a second, independent count comes from running the op on all-ones inputs: every
output element then equals the number of products summed into it, so the sum of the output is the
number of multiply-adds.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from coatnet_jax import cost
from coatnet_jax.models import PAPER_GMACS, PAPER_PARAMS, get_model


def _ones_count(fn, *shapes):
  """Brute force: the number of products summed into the outputs of a linear op on all-ones."""
  return int(np.sum(fn(*(jnp.ones(s) for s in shapes))))


def _conv(dims, stride=1, padding='VALID', groups=1, batch_groups=1):
  return lambda x, w: lax.conv_general_dilated(
      x, w, (stride, stride), padding, dimension_numbers=dims, feature_group_count=groups,
      batch_group_count=batch_groups)


def _check(fn, shapes, by_hand, brute_force=True):
  args = [jax.ShapeDtypeStruct(s, jnp.float32) for s in shapes]
  assert cost.count_macs(fn, *args) == by_hand
  if brute_force:
    assert _ones_count(fn, *shapes) == by_hand


def test_dense():
  _check(lambda x, w: x @ w, [(4, 5), (5, 7)], 4 * 5 * 7)  # 140


def test_batched_einsum():
  # Batch b=2, h=3; lhs free q=4; rhs free k=6; contracting d=5.
  fn = lambda q, k: jnp.einsum('bqhd,bkhd->bhqk', q, k)
  _check(fn, [(2, 4, 3, 5), (2, 6, 3, 5)], 2 * 3 * 4 * 6 * 5)  # 720


def test_strided_conv_nhwc():
  nhwc = ('NHWC', 'HWIO', 'NHWC')
  # VALID, stride 2: 9x9 -> 4x4; 2 images x 4x4 x 8 channels out, each 3x3 x 3 products.
  _check(_conv(nhwc, stride=2), [(2, 9, 9, 3), (3, 3, 3, 8)], 2 * 4 * 4 * 8 * 3 * 3 * 3)  # 6912
  # SAME, stride 2: 9x9 -> 5x5; padded taps count too, so no all-ones check here.
  _check(_conv(nhwc, stride=2, padding='SAME'), [(2, 9, 9, 3), (3, 3, 3, 8)],
         2 * 5 * 5 * 8 * 3 * 3 * 3, brute_force=False)  # 10800


def test_depthwise_and_grouped_conv():
  nhwc = ('NHWC', 'HWIO', 'NHWC')
  # Depthwise: 6 groups of 1 channel; 8x8 -> 6x6 x 6 channels, each 3x3 x 1 products.
  _check(_conv(nhwc, groups=6), [(1, 8, 8, 6), (3, 3, 1, 6)], 6 * 6 * 6 * 3 * 3 * 1)  # 1944
  # Two groups of 3 input channels, 4 outputs: 7x7 -> 5x5 x 4, each 3x3 x 3 products.
  _check(_conv(nhwc, groups=2), [(1, 7, 7, 6), (3, 3, 3, 4)], 5 * 5 * 4 * 3 * 3 * 3)  # 2700


def test_batch_group_conv():
  # 4 images in 2 batch groups -> 2 output images; each output element sums all 3 channels x 3x3.
  fn = _conv(('NHWC', 'HWIO', 'NHWC'), batch_groups=2)
  _check(fn, [(4, 5, 5, 3), (3, 3, 3, 6)], 2 * 3 * 3 * 6 * 3 * 3 * 3)  # 2916


def test_conv_nchw():
  # NCHW/OIHW: 2 images, 3 -> 4 channels, 5x5 kernel: 10x12 -> 6x8.
  fn = _conv(('NCHW', 'OIHW', 'NCHW'))
  _check(fn, [(2, 3, 10, 12), (4, 3, 5, 5)], 2 * 4 * 6 * 8 * 5 * 5 * 3)  # 23040


def test_nested_jit_remat_custom_vjp():
  @jax.custom_vjp
  def dense(x, w):
    return x @ w
  dense.defvjp(lambda x, w: (x @ w, (x, w)), lambda r, g: (g @ r[1].T, r[0].T @ g))

  inner = jax.jit(lambda x, w: jax.checkpoint(dense)(x, w))
  fn = jax.jit(lambda x, w: inner(x, w) + jax.jit(jnp.matmul)(x, w))
  _check(fn, [(4, 5), (5, 7)], 2 * 4 * 5 * 7)  # 280


def test_scan_counts_every_step():
  def fn(h, w):
    return lax.scan(lambda c, _: (jnp.tanh(c @ w), None), h, None, length=6)[0]
  args = [jax.ShapeDtypeStruct(s, jnp.float32) for s in [(3, 4), (4, 4)]]
  assert cost.count_macs(fn, *args) == 6 * 3 * 4 * 4  # 288


def test_cond_counts_costlier_branch():
  def fn(p, x, w):
    return lax.cond(p, lambda: (x @ w) @ w.T @ w, lambda: x @ w)
  args = [jax.ShapeDtypeStruct((), jnp.bool_)] + [
      jax.ShapeDtypeStruct(s, jnp.float32) for s in [(4, 5), (5, 7)]]
  assert cost.count_macs(fn, *args) == 3 * 4 * 5 * 7  # 420


def test_coatnet_0_params_match_paper():
  params = cost.param_count(get_model('coatnet_0', 1000))
  assert params == pytest.approx(PAPER_PARAMS['coatnet_0'], rel=0.02)


def test_coatnet_0_gmacs_match_paper():
  macs = cost.model_macs(get_model('coatnet_0', 1000), 224)
  assert macs / 1e9 == pytest.approx(PAPER_GMACS['coatnet_0'][224], rel=0.03)


def test_model_macs_scale_with_batch():
  model = get_model('coatnet_pico', 10)
  assert cost.model_macs(model, 64, batch=3) == 3 * cost.model_macs(model, 64)
