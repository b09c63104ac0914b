"""Tests of ``coatnet_jax.models`` aimed at the known traps of CoAtNet implementations.

Every check compares against something independent of the code under test: brute-force loops, a
numpy re-implementation, an explicit formula, PyTorch's resize, or the paper's tables. Everything
that is executed uses ``coatnet_pico`` or a single block; the full-size variants are only traced
(``jax.eval_shape`` / ``jax.make_jaxpr``), never compiled. Parameters are drawn at a realistic
scale (kernels ~ N(0, 1/fan_in), bias tables ~ N(0, 1)) rather than the tiny N(0, 0.02) init, so
that a wrong bias index, pool or dtype changes outputs by far more than the tolerances.
"""

import functools
import math

import flax
import flax.linen as nn
import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest

from coatnet_jax import models
from coatnet_jax.models import blocks
from coatnet_jax.models.blocks import (DropPath, MBConvBlock, Options, RelativeAttention,
                                       TransformerBlock)
from coatnet_jax.models.relpos import relative_index
from coatnet_jax.models.coatnet import drop_path_rates
from coatnet_jax.models.resize import resize_table, resize_variables

NUM_CLASSES = 10
F32 = jnp.float32

# Paper Table 3 (CoAtNet-0 and -2): widths of S0..S4, depths of S1..S4; head size 32.
PAPER_LAYOUT = {
    'coatnet_0': dict(widths=(64, 96, 192, 384, 768), depths=(2, 3, 5, 2), head_size=32),
    'coatnet_2': dict(widths=(128, 128, 256, 512, 1024), depths=(2, 6, 14, 2), head_size=32),
}
# coatnet_pico (variants.py): S3 = 2 transformer blocks of width 64, S4 = 1 of width 128, head 16.
PICO_TABLE_HEADS = {('stage3_block0',): 4, ('stage3_block1',): 4, ('stage4_block0',): 8}


# ------------------------------------------------------------------------------------------------
# Helpers (pure numpy references and cached traces/compiles, shared between tests to save time).
# ------------------------------------------------------------------------------------------------

def flat(tree):
  return flax.traverse_util.flatten_dict(dict(tree))


def random_variables(shapes, seed=0):
  """Concrete variables of realistic scale for a tree of ShapeDtypeStructs."""
  rng = np.random.default_rng(seed)
  out = {}
  for collection, tree in shapes.items():
    new = {}
    for path, s in flat(tree).items():
      name, n = path[-1], rng.standard_normal(s.shape)
      if collection == 'batch_stats':
        value = 0.1 * n if name == 'mean' else 1.0 + 0.2 * np.abs(n)
      elif name == 'kernel':
        fan_in = s.shape[0] if path[-2:-1] == ('qkv',) else int(np.prod(s.shape[:-1]))
        value = n / np.sqrt(fan_in)
      elif name == 'scale':
        value = 1.0 + 0.1 * n
      elif name == 'bias':
        value = 0.1 * n
      elif name == 'relative_bias':
        value = n
      else:
        raise AssertionError(f'unexpected variable {path}')
      new[path] = jnp.asarray(value, s.dtype)
    out[collection] = flax.traverse_util.unflatten_dict(new)
  return out


@functools.cache
def variable_shapes(model, height, width):
  images = jax.ShapeDtypeStruct((1, height, width, 3), F32)
  return jax.eval_shape(lambda x: model.init(jax.random.key(0), x), images)


@functools.cache
def pico_variables(height, width, seed=0):
  return random_variables(variable_shapes(pico(), height, width), seed)


@functools.cache
def pico(dtype=F32, drop_path_rate=0.0, **switches):
  return models.get_model('coatnet_pico', NUM_CLASSES, dtype=dtype, drop_path_rate=drop_path_rate,
                          **switches)


@functools.cache
def forward(model, train):
  """One jitted forward per (model, mode), reused across tests so each compiles once."""
  def f(variables, images, rng):
    if train:
      logits, _ = model.apply(variables, images, train=True, rngs={'dropout': rng},
                              mutable=['batch_stats'])
      return logits
    return model.apply(variables, images, train=False, rngs={'dropout': rng})
  return jax.jit(f)


def images(shape, seed=0):
  return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), F32)


def count_params(tree):
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


def brute_force_bias(table, height, width):
  """bias[h, q, k] = table[h, i - i' + H - 1, j - j' + W - 1] with explicit loops."""
  heads, n = table.shape[0], height * width
  bias = np.zeros((heads, n, n), np.float64)
  for h in range(heads):
    for i in range(height):
      for j in range(width):
        for i2 in range(height):
          for j2 in range(width):
            bias[h, i * width + j, i2 * width + j2] = table[h, i - i2 + height - 1,
                                                            j - j2 + width - 1]
  return bias


def np_softmax(x):
  e = np.exp(x - x.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


def np_relative_attention(x, p, head_size):
  """Full relative self-attention in float64 numpy (params in the module's tree layout)."""
  x = np.asarray(x, np.float64)
  batch, height, width, _ = x.shape
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), p)
  tokens = x.reshape(batch, height * width, -1)
  qkv = np.einsum('bnc,cthd->bnthd', tokens, p['qkv']['kernel']) + p['qkv']['bias']
  q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
  logits = np.einsum('bqhd,bkhd->bhqk', q, k) / math.sqrt(head_size)
  logits = logits + brute_force_bias(p['relative_bias'], height, width)[None]
  out = np.einsum('bhqk,bkhd->bqhd', np_softmax(logits), v)
  out = np.einsum('bqhd,hdf->bqf', out, p['out']['kernel']) + p['out']['bias']
  return out.reshape(batch, height, width, -1)


def np_pool2x2(x, kind):
  """2x2 stride-2 pool; a trailing odd row/column forms a window of its own (ceil)."""
  batch, height, width, channels = x.shape
  out = np.zeros((batch, -(-height // 2), -(-width // 2), channels))
  for i in range(out.shape[1]):
    for j in range(out.shape[2]):
      window = x[:, 2 * i:2 * i + 2, 2 * j:2 * j + 2, :]
      out[:, i, j] = window.max(axis=(1, 2)) if kind == 'max' else window.mean(axis=(1, 2))
  return out


def np_layer_norm(x, p, eps):
  mean = x.mean(-1, keepdims=True)
  var = ((x - mean) ** 2).mean(-1, keepdims=True)
  return (x - mean) / np.sqrt(var + eps) * np.asarray(p['scale']) + np.asarray(p['bias'])


def np_gelu_tanh(x):
  return 0.5 * x * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x ** 3)))


def np_dense(x, p):
  return x @ np.asarray(p['kernel'], np.float64) + np.asarray(p['bias'], np.float64)


def np_bilinear_1d_matrix(n_in, n_out):
  """Interpolation matrix of a half-pixel-centre linear resize (clamped at the borders)."""
  m = np.zeros((n_out, n_in))
  for o in range(n_out):
    src = max((o + 0.5) * n_in / n_out - 0.5, 0.0)
    i0 = min(int(math.floor(src)), n_in - 1)
    i1 = min(i0 + 1, n_in - 1)
    frac = src - i0
    m[o, i0] += 1.0 - frac
    m[o, i1] += frac
  return m


def np_bilinear(table, height, width):
  table = np.asarray(table, np.float64)
  rows = np_bilinear_1d_matrix(table.shape[1], height)
  cols = np_bilinear_1d_matrix(table.shape[2], width)
  return np.einsum('oh,chw,pw->cop', rows, table, cols)


def torch_bilinear(table, height, width):
  import torch  # pylint: disable=g-import-not-at-top
  t = torch.from_numpy(np.asarray(table, np.float64))[None]
  out = torch.nn.functional.interpolate(t, size=(height, width), mode='bilinear',
                                        align_corners=False)
  return out[0].numpy()


def jaxpr_eqns(jaxpr):
  """All equations of a (closed) jaxpr, recursing into sub-jaxprs (pjit, custom_jvp, ...)."""
  jaxpr = getattr(jaxpr, 'jaxpr', jaxpr)
  for eqn in jaxpr.eqns:
    yield eqn
    for value in eqn.params.values():
      for sub in (value if isinstance(value, (tuple, list)) else (value,)):
        if isinstance(sub, (jax.extend.core.Jaxpr, jax.extend.core.ClosedJaxpr)):
          yield from jaxpr_eqns(sub)


# ------------------------------------------------------------------------------------------------
# 1. Relative-bias indexing and relative attention.
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize('height,width', [(3, 5), (5, 3), (4, 4), (1, 3)])
def test_relative_index_matches_brute_force(height, width):
  rows, cols = relative_index(height, width)
  n = height * width
  assert rows.shape == cols.shape == (n, n)
  for i in range(height):
    for j in range(width):
      for i2 in range(height):
        for j2 in range(width):
          q, k = i * width + j, i2 * width + j2
          assert rows[q, k] == i - i2 + height - 1, (i, j, i2, j2)
          assert cols[q, k] == j - j2 + width - 1, (i, j, i2, j2)
  # Every entry of the (2H-1)x(2W-1) table is reached (so every entry can learn).
  assert len(set(zip(rows.ravel().tolist(), cols.ravel().tolist()))) == (
      (2 * height - 1) * (2 * width - 1))


def test_relative_bias_softmax_matches_brute_force_on_nonsquare_grid():
  """With q = k = 0 the attention rows are softmax(bias row); read them out through v = identity."""
  height, width, heads, head_size = 3, 5, 2, 16
  n, features = height * width, heads * head_size
  module = RelativeAttention(features, head_size, F32)
  x = jnp.zeros((1, height, width, features), F32)
  shapes = jax.eval_shape(module.init, jax.random.key(0), x)['params']
  assert shapes['qkv']['kernel'].shape == (features, 3, heads, head_size)
  assert shapes['out']['kernel'].shape == (heads, head_size, features)
  assert shapes['relative_bias'].shape == (heads, 2 * height - 1, 2 * width - 1)

  table = np.random.default_rng(1).standard_normal((heads, 2 * height - 1, 2 * width - 1))
  qkv_kernel = np.zeros((features, 3, heads, head_size), np.float32)
  out_kernel = np.zeros((heads, head_size, features), np.float32)
  for h in range(heads):
    for d in range(head_size):
      qkv_kernel[h * head_size + d, 2, h, d] = 1.0  # v = x, q = k = 0
      out_kernel[h, d, h * head_size + d] = 1.0
  params = {'qkv': {'kernel': qkv_kernel, 'bias': np.zeros((3, heads, head_size), np.float32)},
            'out': {'kernel': out_kernel, 'bias': np.zeros((features,), np.float32)},
            'relative_bias': table.astype(np.float32)}
  # Token k carries a one-hot on channel h * head_size + k of every head, so that output channel
  # h * head_size + k of query q is exactly the attention probability p[h, q, k].
  x = np.zeros((1, height, width, features), np.float32)
  for k in range(n):
    for h in range(heads):
      x[0, k // width, k % width, h * head_size + k] = 1.0
  y = np.asarray(jax.jit(module.apply)({'params': params}, x)).reshape(n, heads, head_size)
  probs = y[:, :, :n].transpose(1, 0, 2)  # (heads, q, k)

  expected = np_softmax(brute_force_bias(table, height, width))
  np.testing.assert_allclose(probs, expected, rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(y[:, :, n:], 0.0)


@pytest.mark.parametrize('height,width', [(3, 5), (4, 2)])
def test_relative_attention_matches_numpy_reference(height, width):
  in_channels, features, head_size = 24, 32, 8
  module = RelativeAttention(features, head_size, F32)
  x = images((2, height, width, in_channels), seed=2)
  shapes = jax.eval_shape(module.init, jax.random.key(0), x)
  params = random_variables(shapes, seed=3)['params']
  got = jax.jit(module.apply)({'params': params}, x)
  want = np_relative_attention(x, params, head_size)
  assert got.dtype == F32 and got.shape == (2, height, width, features)
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-4, atol=1e-4)


# ------------------------------------------------------------------------------------------------
# 2. Gradients reach every relative-bias table; one table per head.
# ------------------------------------------------------------------------------------------------

def test_gradients_reach_every_relative_bias_table():
  model = pico()
  # 64x96 input: S3 is 4x6 and S4 2x3 (at 32 px S4 would be 1x1, where the bias cannot matter).
  variables = pico_variables(64, 96)
  x = images((2, 64, 96, 3), seed=4)
  weights = images((2, NUM_CLASSES), seed=5)

  params = flat(variables['params'])
  table_paths = [path for path in params if path[-1] == 'relative_bias']
  assert {path[:-2] for path in table_paths} == set(PICO_TABLE_HEADS)

  # Differentiate w.r.t. the tables only: the backward pass then stops at S3 and compiles faster.
  def loss(tables):
    p = flax.traverse_util.unflatten_dict({**params, **dict(zip(table_paths, tables))})
    logits = model.apply({**variables, 'params': p}, x, train=False)
    return jnp.sum(logits * weights)

  grads = jax.jit(jax.grad(loss))([params[path] for path in table_paths])
  tables = {path[:-2]: g for path, g in zip(table_paths, grads)}
  for block, g in tables.items():
    g = np.asarray(g)
    h, w = (4, 6) if block[0].startswith('stage3') else (2, 3)
    assert g.shape == (PICO_TABLE_HEADS[block], 2 * h - 1, 2 * w - 1), block
    assert np.all(np.isfinite(g)), block
    assert np.count_nonzero(g) == g.size, f'{block}: some table entries get no gradient'
    for a in range(g.shape[0]):
      for b in range(a + 1, g.shape[0]):
        assert not np.allclose(g[a], g[b]), f'{block}: heads {a} and {b} share a gradient'


# ------------------------------------------------------------------------------------------------
# 3. Output stride 32, per-stage shapes, table shapes for the real feature maps.
# ------------------------------------------------------------------------------------------------

# Hand-derived (2h-1, 2w-1) of S3 (input/16) and S4 (input/32) tables.
EXPECTED_TABLES = {
    (224, 224): ((27, 27), (13, 13)),
    (384, 384): ((47, 47), (23, 23)),
    (512, 512): ((63, 63), (31, 31)),
    (256, 320): ((31, 39), (15, 19)),
}


@pytest.mark.parametrize('size', list(EXPECTED_TABLES))
@pytest.mark.parametrize('name', ['coatnet_0', 'coatnet_2'])
def test_stage_shapes_and_table_shapes(name, size):
  layout = PAPER_LAYOUT[name]
  model = models.get_model(name, 1000)
  height, width = size
  shapes = variable_shapes(model, height, width)
  x = jax.ShapeDtypeStruct((2, height, width, 3), F32)
  logits, state = jax.eval_shape(
      lambda v, x: model.apply(v, x, mutable=['intermediates']), shapes, x)
  assert logits.shape == (2, 1000) and logits.dtype == F32

  stages = state['intermediates']
  assert sorted(stages) == [f'stage{k}' for k in range(5)]
  for k in range(5):
    (out,) = stages[f'stage{k}']
    stride = 2 ** (k + 1)
    assert out.shape == (2, height // stride, width // stride, layout['widths'][k]), (k, out.shape)
  assert stages['stage4'][0].shape[1:3] == (height // 32, width // 32)

  tables = {p[0]: s.shape for p, s in flat(shapes['params']).items() if p[-1] == 'relative_bias'}
  expected = {}
  for s, table_hw in zip((3, 4), EXPECTED_TABLES[size]):
    stride = 2 ** (s + 1)
    derived = (2 * (height // stride) - 1, 2 * (width // stride) - 1)
    assert derived == table_hw
    for b in range(layout['depths'][s - 1]):
      expected[f'stage{s}_block{b}'] = (layout['widths'][s] // layout['head_size'],) + table_hw
  assert tables == expected


# ------------------------------------------------------------------------------------------------
# 4. Down-sampling: both branches of a strided block are pooled.
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize('pool,height,width', [('max', 6, 10), ('max', 5, 7), ('avg', 6, 10),
                                               ('avg', 5, 7)])
def test_strided_transformer_block_matches_numpy(pool, height, width):
  """out = x1 + FFN(LN(x1)), x1 = Proj(Pool(x)) + Attn(Pool(LN(x))) (paper eq. 4)."""
  in_channels, features, head_size = 16, 32, 8
  options = Options(pool=pool)
  block = TransformerBlock(features=features, stride=2, head_size=head_size, drop_path=0.0,
                           options=options, dtype=F32)
  x = images((2, height, width, in_channels), seed=6)
  shapes = jax.eval_shape(functools.partial(block.init, train=False), jax.random.key(0), x)
  params = random_variables(shapes, seed=7)['params']
  got = np.asarray(jax.jit(functools.partial(block.apply, train=False))({'params': params}, x))

  xn = np.asarray(x, np.float64)
  shortcut = np_dense(np_pool2x2(xn, pool), params['shortcut_proj'])
  y = np_pool2x2(np_layer_norm(xn, params['attn_norm'], options.ln_epsilon), pool)
  x1 = shortcut + np_relative_attention(y, params['attention'], head_size)
  y = np_layer_norm(x1, params['ffn_norm'], options.ln_epsilon)
  want = x1 + np_dense(np_gelu_tanh(np_dense(y, params['ffn_in'])), params['ffn_out'])

  assert got.shape == (2, -(-height // 2), -(-width // 2), features)
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize('pool', ['max', 'avg'])
def test_strided_mbconv_shortcut_is_pooled(pool):
  """With the residual branch zeroed, a strided MBConv (no width change) returns Pool(x)."""
  block = MBConvBlock(features=8, stride=2, drop_path=0.0, options=Options(pool=pool), dtype=F32)
  x = images((2, 6, 10, 8), seed=8)
  shapes = jax.eval_shape(functools.partial(block.init, train=False), jax.random.key(0), x)
  variables = random_variables(shapes, seed=9)
  assert 'shortcut_proj' not in variables['params']
  variables['params']['project_conv'] = jax.tree.map(jnp.zeros_like,
                                                     variables['params']['project_conv'])
  got = jax.jit(functools.partial(block.apply, train=False))(variables, x)
  np.testing.assert_allclose(np.asarray(got), np_pool2x2(np.asarray(x), pool), rtol=1e-6,
                             atol=1e-6)


# ------------------------------------------------------------------------------------------------
# 5. Stochastic depth.
# ------------------------------------------------------------------------------------------------

def test_drop_path_is_off_at_eval():
  variables = pico_variables(32, 32)
  x = images((2, 32, 32, 3), seed=10)
  with_rate = forward(pico(drop_path_rate=0.5), False)
  a = with_rate(variables, x, jax.random.key(1))
  b = with_rate(variables, x, jax.random.key(2))
  reference = forward(pico(), False)(variables, x, jax.random.key(1))
  np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  np.testing.assert_allclose(np.asarray(a), np.asarray(reference), rtol=1e-6, atol=1e-6)


def test_drop_path_is_on_in_training_with_per_example_masks():
  variables = pico_variables(64, 96)
  # The same image four times: only per-example drop masks can make the rows differ.
  x = jnp.repeat(images((1, 64, 96, 3), seed=11), 4, axis=0)
  train = forward(pico(drop_path_rate=0.5), True)
  a = np.asarray(train(variables, x, jax.random.key(1)))
  b = np.asarray(train(variables, x, jax.random.key(2)))
  assert np.all(np.isfinite(a)) and np.all(np.isfinite(b))
  assert np.max(np.abs(a - b)) > 1e-3, 'different dropout rngs gave the same training output'
  spread = np.max(np.abs(a - a[:1]), axis=1)
  assert np.max(spread) > 1e-3, 'identical examples were dropped identically (per-batch mask?)'


def test_drop_path_statistics():
  rate, n = 0.3, 20000
  x = jnp.ones((n, 2, 3, 4), F32)
  module = DropPath(rate)
  y = np.asarray(module.apply({}, x, train=True, rngs={'dropout': jax.random.key(0)}))
  per_example = y.reshape(n, -1)
  # Whole examples are dropped or kept, never single elements.
  np.testing.assert_array_equal(per_example, per_example[:, :1].repeat(per_example.shape[1], 1))
  dropped = per_example[:, 0] == 0.0
  assert abs(dropped.mean() - rate) < 0.02  # binomial std is 0.0032
  np.testing.assert_allclose(per_example[~dropped], 1.0 / (1.0 - rate), rtol=1e-6)
  assert abs(y.mean() - 1.0) < 0.03  # unbiased in expectation
  other = np.asarray(module.apply({}, x, train=True, rngs={'dropout': jax.random.key(1)}))
  assert not np.array_equal(other, y)
  np.testing.assert_array_equal(np.asarray(module.apply({}, x, train=False)), np.asarray(x))


@pytest.mark.parametrize('num_blocks', [1, 2, 5, 12])
def test_drop_path_rates_formula(num_blocks):
  want = [0.0] if num_blocks == 1 else [0.3 * i / (num_blocks - 1) for i in range(num_blocks)]
  np.testing.assert_allclose(drop_path_rates(0.3, num_blocks), want, rtol=0, atol=1e-12)


def test_blocks_receive_drop_path_rates_in_order():
  """Trace CoAtNet-0's init and record each block's and each DropPath's rate, in call order."""
  model = models.get_model('coatnet_0', 1000, drop_path_rate=0.3)
  block_calls, drop_calls = [], []

  def record(next_fun, args, kwargs, context):
    module = context.module
    if context.method_name == '__call__':
      if isinstance(module, (MBConvBlock, TransformerBlock)):
        block_calls.append((module.name, type(module).__name__, module.drop_path))
      elif isinstance(module, DropPath):
        drop_calls.append((module.scope.path[0], module.rate))
    return next_fun(*args, **kwargs)

  with nn.intercept_methods(record):
    jax.eval_shape(lambda x: model.init(jax.random.key(0), x),
                   jax.ShapeDtypeStruct((1, 224, 224, 3), F32))

  depths, kinds = PAPER_LAYOUT['coatnet_0']['depths'], ('MBConvBlock',) * 2 + (
      'TransformerBlock',) * 2
  names = [(f'stage{s}_block{b}', kinds[s - 1]) for s in range(1, 5) for b in range(depths[s - 1])]
  n = len(names)
  assert n == 12
  assert [c[:2] for c in block_calls] == names
  np.testing.assert_allclose([c[2] for c in block_calls], [0.3 * i / (n - 1) for i in range(n)],
                             atol=1e-12)
  rate_of = {name: rate for name, _, rate in block_calls}
  # One DropPath per MBConv, two per transformer block (attention, FFN), each at its block's rate.
  assert len(drop_calls) == 5 + 2 * 7
  for block, rate in drop_calls:
    assert rate == rate_of[block], block


# ------------------------------------------------------------------------------------------------
# 6. Parameter counts against the paper.
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize('name', ['coatnet_0', 'coatnet_1', 'coatnet_2', 'coatnet_3', 'coatnet_4',
                                  'coatnet_5', 'coatnet_7'])
def test_param_count_matches_paper(name):
  paper = {'coatnet_0': 25e6, 'coatnet_1': 42e6, 'coatnet_2': 75e6, 'coatnet_3': 168e6,
           'coatnet_4': 275e6, 'coatnet_5': 688e6, 'coatnet_7': 2.44e9}[name]  # Tables 3, 11
  assert models.PAPER_PARAMS[name] == paper
  count = count_params(variable_shapes(models.get_model(name, 1000), 224, 224)['params'])
  assert abs(count / paper - 1) < 0.02, f'{name}: {count:,} vs paper {paper:,.0f}'


def test_param_count_coatnet_6_known_discrepancy():
  # The paper reports 1.47B for CoAtNet-6, but its own layout (Table 11/12: S3 = 8 MBConv at 768
  # then 42 transformer blocks at 1536, S4 = 2 at 2048, head size 128) gives ~1.348B here, the same
  # way CoAtNet-7's layout gives the paper's 2.44B. Pin the measured value so a change shows up.
  count = count_params(variable_shapes(models.get_model('coatnet_6', 1000), 224, 224)['params'])
  assert abs(count / 1.3484e9 - 1) < 0.005, f'{count:,}'
  assert count / models.PAPER_PARAMS['coatnet_6'] < 0.95


# ------------------------------------------------------------------------------------------------
# 7. Resizing the variables to another resolution.
# ------------------------------------------------------------------------------------------------

def test_resize_to_same_size_is_identity():
  variables = pico_variables(32, 32)
  out = resize_variables(pico(), variables, 32)
  assert sorted(out) == sorted(variables)
  for collection in variables:
    a, b = flat(variables[collection]), flat(out[collection])
    assert a.keys() == b.keys()
    for path in a:
      assert b[path].dtype == a[path].dtype, path
      assert np.array_equal(np.asarray(b[path]), np.asarray(a[path])), path


@pytest.mark.parametrize('target,expected', [
    ((64, 64), {'stage3': (4, 7, 7), 'stage4': (8, 3, 3)}),
    ((64, 96), {'stage3': (4, 7, 11), 'stage4': (8, 3, 5)}),
])
def test_resize_tables_to_new_size_and_apply(target, expected):
  variables = pico_variables(32, 32)  # S3 2x2 -> (4, 3, 3) tables; S4 1x1 -> (8, 1, 1)
  out = resize_variables(pico(), variables, target)
  before, after = flat(variables['params']), flat(out['params'])
  assert before.keys() == after.keys()
  for path, old in before.items():
    new = after[path]
    if path[-1] != 'relative_bias':
      assert new.dtype == old.dtype and np.array_equal(np.asarray(new), np.asarray(old)), path
      continue
    want_shape = expected[path[0].split('_')[0]]
    assert new.shape == want_shape and new.dtype == F32, path
    np.testing.assert_allclose(np.asarray(new), torch_bilinear(old, *want_shape[1:]), rtol=1e-5,
                               atol=1e-6)
    np.testing.assert_allclose(np.asarray(new), np_bilinear(old, *want_shape[1:]), rtol=1e-5,
                               atol=1e-6)
  for path, value in flat(variables['batch_stats']).items():
    assert np.array_equal(np.asarray(flat(out['batch_stats'])[path]), np.asarray(value))

  # The resized tree is accepted at the new size (the table-shape check runs at trace time). Only
  # the non-square case is executed, to share its compile with test_nonsquare_input_train_and_eval.
  x = images((4,) + target + (3,), seed=12)
  shape = jax.eval_shape(lambda v, x: pico().apply(v, x), out, x)
  assert shape.shape == (4, NUM_CLASSES) and shape.dtype == F32
  if target == (64, 96):
    logits = forward(pico(), False)(out, x, jax.random.key(0))
    assert np.all(np.isfinite(np.asarray(logits)))


@pytest.mark.parametrize('src,dst', [((13, 13), (27, 27)), ((7, 7), (13, 21)), ((3, 3), (7, 11)),
                                     ((27, 27), (13, 13)), ((9, 15), (5, 7))])
def test_resize_table_is_half_pixel_bilinear(src, dst):
  table = np.random.default_rng(13).standard_normal((3,) + src).astype(np.float32)
  got = np.asarray(resize_table(jnp.asarray(table), *dst))
  assert got.shape == (3,) + dst and got.dtype == np.float32
  np.testing.assert_allclose(got, torch_bilinear(table, *dst), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(got, np_bilinear(table, *dst), rtol=1e-5, atol=1e-5)


def test_wrong_size_raises_pointing_to_resize_variables():
  variables = pico_variables(32, 32)
  x = jax.ShapeDtypeStruct((1, 64, 64, 3), F32)
  with pytest.raises(ValueError, match='resize_variables'):
    jax.eval_shape(lambda v, x: pico().apply(v, x), variables, x)


# ------------------------------------------------------------------------------------------------
# 8. bfloat16 compute.
# ------------------------------------------------------------------------------------------------

def test_bfloat16_model_close_to_float32():
  bf16_model = pico(dtype=jnp.bfloat16)
  bf16_shapes = variable_shapes(bf16_model, 32, 32)
  assert all(s.dtype == F32 for s in jax.tree.leaves(bf16_shapes['params']))
  variables = pico_variables(32, 32)
  x = images((2, 32, 32, 3), seed=14)
  want = np.asarray(forward(pico(), False)(variables, x, jax.random.key(0)))
  got = forward(bf16_model, False)(variables, x, jax.random.key(0))
  assert got.dtype == F32 and got.shape == (2, NUM_CLASSES)
  got = np.asarray(got)
  diff, scale = np.max(np.abs(got - want)), np.max(np.abs(want))
  assert scale > 0.3  # the random params are of realistic scale, so logits are not ~0
  # bf16 keeps 8 significant bits (unit roundoff 2^-8 ~ 0.4%); ~20 renormalised layers accumulate
  # a few times that: measured 0.9-1.5% of max|logit| over several seeds. 5% leaves margin, while a
  # float32 path in bf16 clothing would give exactly 0 difference (checked below).
  assert diff <= 5e-2 * scale, (diff, scale)
  assert diff > 0, 'the bfloat16 model computed in float32'


def test_bfloat16_softmax_and_logits_in_float32():
  variables = pico_variables(32, 32)
  x = jnp.zeros((1, 32, 32, 3), F32)
  jaxpr = jax.make_jaxpr(lambda v, x: pico(dtype=jnp.bfloat16).apply(v, x))(variables, x)
  eqns = list(jaxpr_eqns(jaxpr))
  exps = [e for e in eqns if e.primitive.name == 'exp']
  # The softmax's max runs over the keys, the last axis of the (batch, heads, q, k) logits; the
  # 2x2 max-pools (a reduce_max over window axes) stay in the compute dtype.
  maxes = [e for e in eqns if e.primitive.name == 'reduce_max'
           and tuple(e.params['axes']) == (e.invars[0].aval.ndim - 1,)]
  assert len(exps) >= 3 and len(maxes) >= 3  # one softmax per transformer block of pico
  for e in exps + maxes:
    assert e.invars[0].aval.dtype == F32, e
  convs = [e for e in eqns if e.primitive.name == 'conv_general_dilated']
  assert convs and all(e.invars[0].aval.dtype == jnp.bfloat16 for e in convs)
  assert jaxpr.out_avals[0].dtype == F32


# ------------------------------------------------------------------------------------------------
# 9. Errors.
# ------------------------------------------------------------------------------------------------

def test_unknown_variant_raises():
  with pytest.raises(ValueError, match='coatnet_9') as info:
    models.get_model('coatnet_9', 10)
  for name in ('coatnet_pico', 'coatnet_0', 'coatnet_7'):
    assert name in str(info.value)


def test_unknown_switch_raises():
  with pytest.raises(ValueError, match='poool'):
    models.get_model('coatnet_pico', 10, poool='max')


@pytest.mark.parametrize('field,value', [('pool', 'min'), ('mbconv_stride', '3x3'),
                                         ('padding', 'valid')])
def test_invalid_option_values_raise(field, value):
  with pytest.raises(ValueError, match=field):
    Options(**{field: value})
  with pytest.raises(ValueError, match=field):
    models.get_model('coatnet_pico', 10, **{field: value})


@pytest.mark.parametrize('rate', [-0.1, 1.0])
def test_invalid_drop_path_rate_raises(rate):
  with pytest.raises(ValueError, match='drop_path_rate'):
    models.get_model('coatnet_pico', 10, drop_path_rate=rate)


# ------------------------------------------------------------------------------------------------
# 10. Non-square inputs and sizes not divisible by 32.
# ------------------------------------------------------------------------------------------------

def test_nonsquare_input_train_and_eval():
  variables = pico_variables(64, 96)
  x = images((4, 64, 96, 3), seed=15)
  for train in (False, True):
    model = pico(drop_path_rate=0.5) if train else pico()  # train compile shared with test 5
    logits = forward(model, train)(variables, x, jax.random.key(3))
    assert logits.shape == (4, NUM_CLASSES) and logits.dtype == F32, train
    assert np.all(np.isfinite(np.asarray(logits))), train


@pytest.mark.parametrize('size,stage_sizes', [(80, (40, 20, 10, 5, 3)), (120, (60, 30, 15, 8, 4))])
def test_sizes_not_divisible_by_32(size, stage_sizes):
  model = pico()
  variables = random_variables(variable_shapes(model, size, size), seed=16)
  x = images((1, size, size, 3), seed=17)
  _, state = jax.eval_shape(lambda v, x: model.apply(v, x, mutable=['intermediates']),
                            variables, x)
  for k, s in enumerate(stage_sizes):
    assert state['intermediates'][f'stage{k}'][0].shape[1:3] == (s, s), k
  logits = forward(model, False)(variables, x, jax.random.key(0))
  assert logits.shape == (1, NUM_CLASSES) and logits.dtype == F32
  assert np.all(np.isfinite(np.asarray(logits)))


# ------------------------------------------------------------------------------------------------
# 11. Architecture switches.
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize('mbconv_stride,expected', [
    # (kernel size, feature_group_count, output channels) of every stride-2 convolution of pico:
    # the stem's first conv, then the strided conv of S1 block 0 (mid 4*16) and S2 block 0 (4*32).
    ('1x1', [((3, 3), 1, 16), ((1, 1), 1, 64), ((1, 1), 1, 128)]),
    ('depthwise', [((3, 3), 1, 16), ((3, 3), 64, 64), ((3, 3), 128, 128)]),
])
def test_mbconv_stride_placement(mbconv_stride, expected):
  model = pico(mbconv_stride=mbconv_stride)
  x = jax.ShapeDtypeStruct((1, 32, 32, 3), F32)
  variables = variable_shapes(model, 32, 32)
  jaxpr = jax.make_jaxpr(lambda v, x: model.apply(v, x))(variables, x)
  strided = [((tuple(e.invars[1].aval.shape[:2])), e.params['feature_group_count'],
              e.invars[1].aval.shape[3])
             for e in jaxpr_eqns(jaxpr) if e.primitive.name == 'conv_general_dilated'
             and tuple(e.params['window_strides']) == (2, 2)]
  assert strided == expected


@pytest.mark.parametrize('padding,pads', [('same', ((0, 1), (0, 1))),
                                          ('symmetric', ((1, 1), (1, 1)))])
def test_padding_switch_on_strided_conv(padding, pads):
  layer = blocks.conv(8, 3, Options(padding=padding), stride=2)
  x = images((2, 8, 10, 3), seed=18)
  params = random_variables(jax.eval_shape(layer.init, jax.random.key(0), x), seed=19)
  got = np.asarray(jax.jit(layer.apply)(params, x))
  want = jax.lax.conv_general_dilated(x, params['params']['kernel'], (2, 2), pads,
                                      dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
  np.testing.assert_allclose(got, np.asarray(want), rtol=1e-5, atol=1e-5)
  other = ((1, 1), (1, 1)) if padding == 'same' else ((0, 1), (0, 1))
  wrong = jax.lax.conv_general_dilated(x, params['params']['kernel'], (2, 2), other,
                                       dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
  assert np.max(np.abs(got - np.asarray(wrong))) > 1e-2


@pytest.mark.parametrize('padding,stem_pads', [('same', ((0, 1), (0, 1))),
                                               ('symmetric', ((1, 1), (1, 1)))])
def test_padding_switch_reaches_the_model(padding, stem_pads):
  model = pico(padding=padding)
  x = jax.ShapeDtypeStruct((1, 32, 32, 3), F32)
  jaxpr = jax.make_jaxpr(lambda v, x: model.apply(v, x))(variable_shapes(model, 32, 32), x)
  strided_3x3 = [tuple(map(tuple, e.params['padding'])) for e in jaxpr_eqns(jaxpr)
                 if e.primitive.name == 'conv_general_dilated'
                 and tuple(e.params['window_strides']) == (2, 2)
                 and tuple(e.invars[1].aval.shape[:2]) == (3, 3)]
  assert strided_3x3 == [stem_pads]  # pico with the default mbconv_stride: only the stem


@pytest.mark.parametrize('size', [80, 120, 160, 100, 72, 250, (120, 80)], ids=str)
def test_transfer_sizes_from_224(size):
  """GasHisSDB-like sizes (issue 8): variables made at 224 are resized and applied; pico runs,
  CoAtNet-0 is traced. Batch 1 at 80 and 120 shares the compiles above."""
  h, w = (size, size) if isinstance(size, int) else size
  x = images((1, h, w, 3), seed=20)
  variables = resize_variables(pico(), pico_variables(224, 224), size)
  logits = forward(pico(), False)(variables, x, jax.random.key(0))
  assert logits.shape == (1, NUM_CLASSES) and np.all(np.isfinite(np.asarray(logits)))
  model = models.get_model('coatnet_0', 2)
  shape = jax.eval_shape(lambda v, x: model.apply(resize_variables(model, v, size), x),
                         variable_shapes(model, 224, 224), x)
  assert shape.shape == (1, 2) and shape.dtype == F32
