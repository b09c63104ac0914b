"""The fast paths of the model against the straightforward forms they replace.

- attention through ``jax.nn.dot_product_attention`` (``blocks.attend``) against an explicit
  einsum-bias-softmax-einsum, values and gradients;
- the reshape pools against Flax's ``max_pool``/``avg_pool`` with 'SAME' padding (the code before),
  values and gradients, even and odd sizes;
- the BatchNorm-folded inference model against the unfolded one;
- rematerialisation: the same parameter tree and the same gradients for every policy.
Float32 tolerances are tight (rounding only); bfloat16 ones are stated per test.
"""

import functools

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from coatnet_jax import convert
from coatnet_jax import models
from coatnet_jax.models import blocks

F32, BF16 = jnp.float32, jnp.bfloat16


def reference_attention(q, k, v, bias):
  """The form before: scale q, float32 logits + bias, float32 softmax, probs in v's dtype."""
  q = q * jnp.asarray(q.shape[-1] ** -0.5, q.dtype)
  logits = jnp.einsum('bqhd,bkhd->bhqk', q, k, preferred_element_type=F32) + bias[None]
  probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
  return jnp.einsum('bhqk,bkhd->bqhd', probs, v)


def qkv_bias(seed, dtype, batch=2, tokens=15, heads=3, head_size=8):
  rng = np.random.default_rng(seed)
  q, k, v = (jnp.asarray(rng.standard_normal((batch, tokens, heads, head_size)), dtype)
             for _ in range(3))
  return q, k, v, jnp.asarray(rng.standard_normal((heads, tokens, tokens)), F32)


def _grads(fn, q, k, v, bias):
  cotangent = jnp.asarray(np.random.default_rng(9).standard_normal(q.shape), F32)
  loss = lambda *a: jnp.sum(fn(*a).astype(F32) * cotangent)
  return jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3)))(q, k, v, bias)


def ours(implementation):
  """blocks.attend takes q pre-scaled (QKVProjection folds the scale into its kernel)."""
  return lambda q, k, v, bias: blocks.attend(
      q * jnp.asarray(q.shape[-1] ** -0.5, q.dtype), k, v, bias, implementation)


def library(q, k, v, bias):
  """jax.nn.dot_product_attention (its XLA form: the only one on the CPU)."""
  return jax.nn.dot_product_attention(q, k, v, bias=bias[None], implementation='xla')


FORMS = {'attend_xla': ours('xla'), 'attend_auto': ours(blocks.attention_implementation(
    15, 8, BF16, train=True)), 'dot_product_attention': library}


@pytest.mark.parametrize('form', sorted(FORMS))
@pytest.mark.parametrize('dtype,tol', [(F32, 1e-5), (BF16, 3e-2)])
def test_attention_matches_explicit_attention_values_and_gradients(form, dtype, tol):
  """bf16: q, k, v and the output are bf16 (8 bits of mantissa), so 3e-2 of the values' scale.

  On a GPU 'attend_auto' is cuDNN's fused kernel (15 tokens, inference and training: 'xla' for
  the odd count in training); on the CPU every form is XLA's.
  """
  fn = FORMS[form]
  q, k, v, bias = qkv_bias(0, dtype)
  got = jax.jit(fn)(q, k, v, bias)
  want = reference_attention(q, k, v, bias)
  assert got.dtype == dtype and got.shape == q.shape
  np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32),
                             rtol=tol, atol=tol)
  for g, w in zip(_grads(fn, q, k, v, bias), _grads(reference_attention, q, k, v, bias)):
    scale = float(jnp.max(jnp.abs(w.astype(F32))))
    np.testing.assert_allclose(np.asarray(g, np.float32) / scale, np.asarray(w, np.float32) / scale,
                               rtol=tol, atol=tol)


@pytest.mark.parametrize('height,width', [(3, 5), (4, 4), (7, 7)])
def test_relative_bias_gather_matches_brute_force(height, width):
  rng = np.random.default_rng(1)
  table = rng.standard_normal((2, 2 * height - 1, 2 * width - 1)).astype(np.float32)
  got = np.asarray(blocks.relative_bias(jnp.asarray(table), height, width))
  n = height * width
  want = np.zeros((2, n, n), np.float32)
  for q in range(n):
    for k in range(n):
      want[:, q, k] = table[:, q // width - k // width + height - 1,
                            q % width - k % width + width - 1]
  np.testing.assert_array_equal(got, want)


def test_qkv_projection_has_dense_generals_parameters_and_values():
  """Same names, shapes and initial values as nn.DenseGeneral((3, heads, d)): checkpoints made
  before restore, and the output is DenseGeneral's with the q/k/v axis moved first and q scaled
  by head_size ** -0.5."""
  x = jnp.asarray(np.random.default_rng(2).standard_normal((2, 6, 16)), F32)
  proj = blocks.QKVProjection(heads=2, head_size=8, dtype=F32)
  dense = nn.DenseGeneral((3, 2, 8), kernel_init=blocks.default_init)
  p_ours = proj.init(jax.random.key(3), x)
  p_dense = dense.init(jax.random.key(3), x)
  assert jax.tree.map(jnp.shape, p_ours) == jax.tree.map(jnp.shape, p_dense)
  np.testing.assert_array_equal(p_ours['params']['kernel'], p_dense['params']['kernel'])
  p = {'params': {'kernel': p_dense['params']['kernel'],
                  'bias': jnp.asarray(np.random.default_rng(4).standard_normal((3, 2, 8)), F32)}}
  want = jnp.moveaxis(dense.apply(p, x), 2, 0)
  np.testing.assert_allclose(proj.apply(p, x), want.at[0].multiply(8 ** -0.5), rtol=1e-6,
                             atol=1e-6)


def test_attention_implementation_rule():
  """cuDNN where its rules allow; XLA on CPU, for float32, and for 49 tokens (S4 at 224) in
  training, where cuDNN refuses the bias gradient."""
  pick = blocks.attention_implementation
  assert pick(196, 32, BF16, True) == 'xla'  # This test runs on the CPU.
  with_gpu = functools.partial(pick, backend='gpu')
  assert with_gpu(196, 32, BF16, True) == 'cudnn'
  assert with_gpu(49, 32, BF16, False) == 'cudnn'
  assert with_gpu(49, 32, BF16, True) == 'xla'
  assert with_gpu(196, 32, F32, True) == 'xla'
  assert with_gpu(196, 12, BF16, True) == 'xla'


def flax_pool(x, kind):
  """The pooling before this change."""
  if kind == 'max':
    return nn.max_pool(x, (2, 2), strides=(2, 2), padding='SAME')
  return nn.avg_pool(x, (2, 2), strides=(2, 2), padding='SAME', count_include_pad=False)


@pytest.mark.parametrize('kind', ['max', 'avg'])
@pytest.mark.parametrize('height,width', [(8, 6), (7, 7), (5, 8)])
@pytest.mark.parametrize('dtype', [F32, BF16])
def test_pool_matches_flax_pooling_values_and_gradients(kind, height, width, dtype):
  """Exact for max (a selection); avg within rounding (f32 1e-6, bf16 one ulp, 1e-2).

  Flax's avg_pool returns float32 for bfloat16 input (it divides by float32 counts), which made
  the bf16 model run float32 after every pool of timm's form; ours keeps the input's dtype.
  """
  # Distinct integers (exact in bf16 below 256): no ties, where the max gradients differ by
  # design (split evenly among tied entries here, given to one by reduce_window).
  shape = (2, height, width, 3)
  x = jnp.asarray(np.random.default_rng(5).permutation(np.prod(shape)).reshape(shape) - 100.0,
                  dtype)
  got, want = blocks.pool2x2(x, kind), flax_pool(x, kind)
  assert got.dtype == dtype and got.shape == want.shape
  tol = 0 if kind == 'max' else (1e-6 if dtype == F32 else 1e-2)  # Relative.
  np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32),
                             rtol=tol, atol=tol * 100)
  cot = jnp.asarray(np.random.default_rng(6).standard_normal(want.shape), dtype)
  g_got = jax.grad(lambda x: jnp.sum((blocks.pool2x2(x, kind) * cot).astype(F32)))(x)
  g_want = jax.grad(lambda x: jnp.sum((flax_pool(x, kind) * cot).astype(F32)))(x)
  np.testing.assert_allclose(np.asarray(g_got, np.float32), np.asarray(g_want, np.float32),
                             rtol=tol, atol=tol)


def test_max_pool_gradient_is_elementwise():
  """No scatter in the backward pass (reduce_window's gradient is select_and_scatter)."""
  x = jnp.zeros((2, 8, 8, 4), F32)
  jaxpr = jax.make_jaxpr(jax.grad(lambda x: jnp.sum(blocks.pool2x2(x, 'max'))))(x)
  names = {e.primitive.name for e in jaxpr.jaxpr.eqns}
  assert not any('scatter' in n or 'select_and' in n for n in names), names


def random_variables(shapes, seed):
  """Realistic-scale variables: kernels ~ 1/sqrt(fan_in), BN statistics far from (0, 1)."""
  rng = np.random.default_rng(seed)

  def draw(path, s):
    name, n = path[-1].key, rng.standard_normal(s.shape)
    if name == 'mean':
      return jnp.asarray(0.5 * n, s.dtype)
    if name == 'var':
      return jnp.asarray(0.5 + np.abs(n), s.dtype)
    if name == 'kernel':
      return jnp.asarray(n / np.sqrt(max(int(np.prod(s.shape[:-1])), 1)), s.dtype)
    if name == 'scale':
      return jnp.asarray(1.0 + 0.3 * n, s.dtype)
    return jnp.asarray(0.2 * n, s.dtype)

  return jax.tree_util.tree_map_with_path(draw, shapes)


# Layouts: the paper's and timm's paper-config form (every BatchNorm folds); timm's rw CoAtNet
# with BatchNorm transformers (an activation after pre_norm and squeeze-excitation before
# depthwise_norm keep those two, and the transformer BatchNorms stay); timm's rmlp nano layout.
LAYOUTS = {
    'paper': ('coatnet_pico', lambda: models.Options()),
    'timm': ('coatnet_pico', lambda: models.TIMM_OPTIONS),
    'bn_0_rw': ('coatnet_pico_rw', lambda: convert.TIMM_MODELS['coatnet_bn_0_rw_224'].options),
    'rmlp_nano_rw': ('coatnet_pico_rw',
                     lambda: convert.TIMM_MODELS['coatnet_rmlp_nano_rw_224'].options),
}


@pytest.mark.parametrize('form,dtype,tol', [('paper', F32, 1e-5), ('timm', F32, 1e-5),
                                            ('bn_0_rw', F32, 1e-5), ('rmlp_nano_rw', F32, 1e-5),
                                            ('paper', BF16, 3e-2)])
def test_folded_batchnorm_matches_unfolded_model(form, dtype, tol):
  """Relative to the largest logit. float32: rounding only (measured 6e-7). bfloat16: folded
  kernels are rounded to bf16 once instead of activations being normalised in bf16; measured
  0.007, less than the bf16 model's own distance from float32 (0.016), so 3e-2."""
  variant, options = LAYOUTS[form][0], LAYOUTS[form][1]()
  model = models.get_model(variant, 10, dtype=dtype, options=options)
  x = jnp.asarray(np.random.default_rng(7).uniform(-1, 1, (2, 32, 32, 3)), F32)
  shapes = jax.eval_shape(lambda x: model.init(jax.random.key(0), x), x)
  variables = random_variables(shapes, seed=8)
  folded = models.fold_batchnorm(model, variables)
  kept_mbconv = {'pre_norm', 'expand_norm', 'depthwise_norm'} - set(
      blocks.foldable_mbconv_norms(options))
  kept = {path[-2] for path in flax.traverse_util.flatten_dict(folded.get('batch_stats', {}))}
  batch_transformers = options.transformer_norm == 'batch'  # and the rw head's norm with them
  want_kept = kept_mbconv | ({'attn_norm', 'ffn_norm'} if batch_transformers else set()) | (
      {'head_norm'} if batch_transformers and options.head_norm == 'spatial' else set())
  assert kept == want_kept, (kept, want_kept)
  flat = flax.traverse_util.flatten_dict(folded['params'])
  folded_names = {'stem_norm', 'pre_norm', 'expand_norm', 'depthwise_norm'} - kept_mbconv
  assert not any(folded_names & set(path) for path in flat), 'a BatchNorm was left unfolded'
  want = jax.jit(functools.partial(model.apply, train=False))(variables, x)
  got = jax.jit(functools.partial(models.folded_model(model).apply, train=False))(folded, x)
  scale = float(jnp.max(jnp.abs(want)))
  np.testing.assert_allclose(np.asarray(got) / scale, np.asarray(want) / scale, rtol=tol, atol=tol)


def test_remat_policies_keep_parameters_and_gradients():
  """Same tree (checkpoints are interchangeable) and the same gradients, float32."""
  x = jnp.asarray(np.random.default_rng(10).uniform(-1, 1, (2, 32, 32, 3)), F32)
  base = models.get_model('coatnet_pico', 10)
  shapes = jax.eval_shape(lambda x: base.init(jax.random.key(0), x), x)
  variables = random_variables(shapes, seed=11)

  def grads(model):
    assert jax.tree.structure(jax.eval_shape(
        lambda x: model.init(jax.random.key(0), x), x)) == jax.tree.structure(shapes)

    def loss(params):
      logits, _ = model.apply({**variables, 'params': params}, x, train=True,
                              mutable=['batch_stats'])
      return jnp.sum(logits ** 2)

    return jax.jit(jax.grad(loss))(variables['params'])

  want = grads(base)
  for policy in ('block', 'dots'):
    got = grads(models.get_model('coatnet_pico', 10, remat=policy))
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), got, want)
  with pytest.raises(ValueError, match='remat'):
    models.get_model('coatnet_pico', 10, remat='everything')
