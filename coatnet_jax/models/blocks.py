"""CoAtNet building blocks in Flax Linen, NHWC: MBConv, transformer block, 2-D relative attention.

Everything follows the paper's pre-norm form ``x <- Proj(Pool(x)) + Module(Pool?(Norm(x)))``
(paper Sec. 2, eq. 4-5). The switches that separate the paper's form from timm's live in ``Options``
so that one code path serves both and the timm parity test exercises the real model.
"""

import dataclasses
import functools
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from coatnet_jax.models import relpos

Dtype = Any

# The paper's code base (google-research/maxvit, which CoAtNet grew from) initialises every kernel,
# and the relative-bias tables, from N(0, 0.02).
default_init = nn.initializers.normal(stddev=0.02)


@dataclasses.dataclass(frozen=True)
class Options:
  """Architecture switches. Defaults are the paper's form (and its TF code's); see TIMM_OPTIONS."""

  # '1x1': stride in the first 1x1 conv (paper eq. 5); 'depthwise'; 'pool': 2x2 average pool
  # after the pre-norm (timm's, whatever ``pool`` says).
  mbconv_stride: str = '1x1'
  # Down-sampling pool: 'max' 2x2 stride 2 (paper), 'avg' 2x2, 'max3' 3x3 stride 2 padding 1
  # (timm's 'max').
  pool: str = 'max'
  head_pre_logits: bool = True  # pool -> LN -> Dense(width) -> tanh -> Dense(classes).
  gelu_approximate: bool = True  # The TF code uses the tanh form; timm the exact (erf) one.
  bn_epsilon: float = 1e-3
  bn_momentum: float = 0.99
  ln_epsilon: float = 1e-5
  padding: str = 'same'  # 'same': TF/XLA SAME, (0, 1) on stride 2; 'symmetric': (1, 1) like PyTorch.
  stem_bias: bool = True
  # The switches below express timm's own ('rw') models; see convert/timm.py for which set which.
  conv_act: str = 'gelu'  # Activation of the stem and MBConv blocks: 'gelu' or 'silu'.
  mbconv_pre_norm_act: bool = False  # The activation after the MBConv pre-norm too.
  # 'output': expand to 4x the output width, SE reduces to out/4; 'input': 4x the input, SE mid/4.
  mbconv_expand_from: str = 'output'
  mbconv_output_bias: bool = True  # Bias of the last 1x1 conv and of the shortcut projection.
  se_act: str = 'silu'  # SE bottleneck activation: 'silu' or 'relu'.
  se_early: bool = False  # SE between the depthwise conv and its norm, not after the activation.
  # q, k, v as wide as the block's 'output' (paper) or its 'input' (the out projection widens).
  attention_width: str = 'output'
  transformer_shortcut_bias: bool = True
  # Norm of transformer blocks (and of a 'spatial' head): 'layer' or 'batch'; eps ln_epsilon.
  transformer_norm: str = 'layer'
  layer_scale: float = 0.0  # > 0: per-channel scales on both transformer branches, from this.
  rel_pos: str = 'table'  # Relative bias: a trainable 'table' per head (paper) or timm's 'mlp'.
  rel_pos_mlp_width: int = 512  # Hidden width of the 'mlp' bias.
  # 'pooled': pool, then LayerNorm (paper); 'spatial': norm the S4 map, then pool (timm's rw).
  head_norm: str = 'pooled'
  # 'imagenet': images arrive normalised with ImageNet's mean and std (input_pipeline) and are
  # used as they are; 'half': re-normalised to mean = std = 0.5, as timm trained its rw weights.
  input_norm: str = 'imagenet'

  def __post_init__(self):
    choices = {'mbconv_stride': ('1x1', 'depthwise', 'pool'), 'pool': ('max', 'avg', 'max3'),
               'padding': ('same', 'symmetric'), 'conv_act': ('gelu', 'silu'),
               'mbconv_expand_from': ('output', 'input'), 'se_act': ('silu', 'relu'),
               'attention_width': ('output', 'input'), 'transformer_norm': ('layer', 'batch'),
               'rel_pos': ('table', 'mlp'), 'head_norm': ('pooled', 'spatial'),
               'input_norm': ('imagenet', 'half')}
    for field, valid in choices.items():
      if getattr(self, field) not in valid:
        raise ValueError(f'{field}={getattr(self, field)!r} is not one of {valid}.')


# timm's paper-config models (`coatnet_N_224` in timm/models/maxxvit.py) differ in these switches.
TIMM_OPTIONS = Options(
    mbconv_stride='depthwise', pool='avg', gelu_approximate=False, bn_epsilon=1e-5,
    bn_momentum=0.9, ln_epsilon=1e-6, padding='symmetric', stem_bias=False)


def conv(features, kernel, options, stride=1, groups=1, use_bias=False, dtype=None, name=None):
  """A square convolution with the padding convention that ``options`` names."""
  if options.padding == 'same':
    padding = 'SAME'
  else:
    pad = (kernel - 1) // 2
    padding = ((pad, pad), (pad, pad))
  return nn.Conv(features, (kernel, kernel), strides=(stride, stride), padding=padding,
                 feature_group_count=groups, use_bias=use_bias, dtype=dtype,
                 kernel_init=default_init, name=name)


def pool2x2(x, kind):
  """The paper's down-sampling pool: window 2, stride 2 (ceil for odd sizes, as TF 'SAME').

  ``'max3'`` is timm's other one: window 3, stride 2, padding 1.

  Window 2 is written as a reshape and a reduction over the window axes, so that the max-pool
  gradient is elementwise (a compare and a select) instead of ``reduce_window``'s
  select-and-scatter. An odd height or width is padded at the end (with -inf for max; excluded from
  the mean), which is what 'SAME' pooling gives, so the values are today's for any size. Max
  gradients on exact ties within a window are split evenly among them (``reduce_window`` gives
  them to one); ties have measure zero in float training.
  """
  if kind == 'max3':
    return nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
  batch, height, width, channels = x.shape
  pad_h, pad_w = height % 2, width % 2
  if kind == 'max':
    if pad_h or pad_w:
      x = jnp.pad(x, ((0, 0), (0, pad_h), (0, pad_w), (0, 0)), constant_values=-jnp.inf)
    return x.reshape(batch, (height + pad_h) // 2, 2, (width + pad_w) // 2, 2, channels).max(
        axis=(2, 4))
  if pad_h or pad_w:  # A border window averages only its real entries (count_include_pad=False).
    # Flax divides by float32 counts: cast back, or a bf16 model turns float32 from here on.
    return nn.avg_pool(x, (2, 2), strides=(2, 2), padding='SAME',
                       count_include_pad=False).astype(x.dtype)
  return x.reshape(batch, height // 2, 2, width // 2, 2, channels).mean(axis=(2, 4))


def gelu(x, options):
  return nn.gelu(x, approximate=options.gelu_approximate)


def activation(x, kind, options):
  """'gelu' (in the form ``options`` names), 'silu' or 'relu'."""
  if kind == 'gelu':
    return gelu(x, options)
  return nn.silu(x) if kind == 'silu' else nn.relu(x)


class DropPath(nn.Module):
  """Stochastic depth: drops a whole residual branch per example while training."""

  rate: float

  @nn.compact
  def __call__(self, x, train: bool):
    if not train or self.rate == 0.0:
      return x
    keep = 1.0 - self.rate
    mask = jax.random.bernoulli(self.make_rng('dropout'), keep, (x.shape[0],) + (1,) * (x.ndim - 1))
    return jnp.where(mask, x / keep, jnp.zeros_like(x))


class SqueezeExcite(nn.Module):
  """SE with a SiLU bottleneck of ``reduced`` channels; gates the tensor it pooled."""

  reduced: int
  dtype: Dtype
  act: str = 'silu'

  @nn.compact
  def __call__(self, x):
    s = jnp.mean(x, axis=(1, 2), keepdims=True)
    s = nn.Dense(self.reduced, dtype=self.dtype, kernel_init=default_init, name='reduce')(s)
    s = nn.silu(s) if self.act == 'silu' else nn.relu(s)
    s = nn.Dense(x.shape[-1], dtype=self.dtype, kernel_init=default_init, name='expand')(s)
    return x * nn.sigmoid(s)


def foldable_mbconv_norms(options: Options) -> tuple[str, ...]:
  """The MBConv BatchNorms that fold exactly into a neighbouring convolution under ``options``.

  ``expand_norm`` follows ``expand_conv`` directly in every layout. ``depthwise_norm`` folds into
  the depthwise convolution unless squeeze-excitation (a per-example gate) sits between them
  (``se_early``). ``pre_norm`` folds into the 1x1 ``expand_conv`` (no padding; the average pool
  of ``mbconv_stride='pool'`` commutes with a per-channel affine map) unless an activation
  follows it (``mbconv_pre_norm_act``).
  """
  folds = ['expand_norm']
  if not options.se_early:
    folds.append('depthwise_norm')
  if not options.mbconv_pre_norm_act:
    folds.append('pre_norm')
  return tuple(folds)


class MBConvBlock(nn.Module):
  """Pre-norm MBConv: BN -> 1x1 expand (x4 of out) -> BN GELU -> dw 3x3 -> BN GELU -> SE -> 1x1.

  ``folded``: the inference form whose BatchNorms (``foldable_mbconv_norms``: all three in the
  paper's layout) live in the convolutions' kernels and biases (``fold.fold_batchnorm`` makes its
  variables).
  """

  features: int
  stride: int
  drop_path: float
  options: Options
  dtype: Dtype
  folded: bool = False

  @nn.compact
  def __call__(self, x, train: bool):
    o = self.options
    bn = functools.partial(nn.BatchNorm, use_running_average=not train, momentum=o.bn_momentum,
                           epsilon=o.bn_epsilon, dtype=self.dtype)
    folds = foldable_mbconv_norms(o) if self.folded else ()

    def norm(name):
      """A BatchNorm, or nothing where the folded form carries it in a convolution."""
      return (lambda y: y) if name in folds else bn(name=name)

    act = functools.partial(activation, kind=o.conv_act, options=o)
    shortcut = pool2x2(x, o.pool) if self.stride > 1 else x
    if shortcut.shape[-1] != self.features:
      shortcut = conv(self.features, 1, o, use_bias=o.mbconv_output_bias, dtype=self.dtype,
                      name='shortcut_proj')(shortcut)

    if o.mbconv_expand_from == 'output':
      mid, reduced = self.features * 4, int(self.features * 0.25)
    else:
      mid = x.shape[-1] * 4
      reduced = int(mid * 0.25)
    stride_1x1 = self.stride if o.mbconv_stride == '1x1' else 1
    stride_dw = self.stride if o.mbconv_stride == 'depthwise' else 1
    se = SqueezeExcite(reduced, self.dtype, o.se_act, name='se')
    y = norm('pre_norm')(x)
    if o.mbconv_pre_norm_act:
      y = act(y)
    if o.mbconv_stride == 'pool' and self.stride > 1:
      y = pool2x2(y, 'avg')
    y = conv(mid, 1, o, stride=stride_1x1, use_bias=self.folded, dtype=self.dtype,
             name='expand_conv')(y)
    y = act(norm('expand_norm')(y))
    y = conv(mid, 3, o, stride=stride_dw, groups=mid, use_bias='depthwise_norm' in folds,
             dtype=self.dtype, name='depthwise_conv')(y)
    if o.se_early:
      y = se(y)
    y = act(norm('depthwise_norm')(y))
    if not o.se_early:
      y = se(y)
    y = conv(self.features, 1, o, use_bias=o.mbconv_output_bias, dtype=self.dtype,
             name='project_conv')(y)
    return shortcut + DropPath(self.drop_path)(y, train)


def relative_bias(table, height: int, width: int):
  """The (heads, N, N) float32 pre-softmax bias of an H x W map from its (heads, 2H-1, 2W-1) table.

  One gather per call through a precomputed flat index (a constant of the shape), so the
  backward pass is one scatter-add into the small table.
  """
  rows, cols = relpos.relative_index(height, width)
  flat = jnp.asarray(rows * (2 * width - 1) + cols, jnp.int32)
  n = height * width
  return jnp.take(table.reshape(table.shape[0], -1), flat.reshape(-1), axis=1).reshape(-1, n, n)


def attention_implementation(num_tokens: int, head_size: int, dtype, train: bool,
                             backend=None) -> str:
  """'cudnn' (``jax.nn.dot_product_attention``'s fused kernel) where its rules allow, else 'xla'.

  cuDNN's kernel needs a GPU, 16-bit inputs and a head size that is a multiple of 8 up to 128;
  with a bias it refuses the backward pass for an odd token count (S4 at 224 px has 7x7 = 49
  tokens): those calls FALL BACK to the XLA form (the same math, N x N logits materialised)
  rather than padding, because padding the keys needs a mask and the padded queries' rows would
  cost as much as the fallback at these sizes. The choice is made per call, at trace time;
  ``backend`` defaults to ``jax.default_backend()``.
  """
  if (backend or jax.default_backend()) != 'gpu':
    return 'xla'
  if jnp.dtype(dtype) not in (jnp.bfloat16, jnp.float16):
    return 'xla'
  if head_size % 8 or head_size > 128 or (train and num_tokens % 2):
    return 'xla'
  return 'cudnn'


def attend(q, k, v, bias, implementation: str = 'xla'):
  """softmax(q k^T + bias) v for (batch, tokens, heads, head_size) q, k, v; q comes pre-scaled.

  ``bias`` is float32 (heads, N, N). 'cudnn' is ``jax.nn.dot_product_attention``'s fused kernel,
  which takes the bias in the inputs' dtype; a shape or version it refuses when the call is traced
  (jax checks its rules in Python) falls back to 'xla'. 'xla' is written out here rather than
  taken from ``jax.nn.dot_product_attention(implementation='xla')``: the same math (float32
  logits, bias and softmax; probabilities in the inputs' dtype), but that function scales the
  N x N float32 logits instead of q and, on the CPU, counts 2.1x the bytes of this form forward
  and 1.2x with the gradient (S3 of CoAtNet-0, batch 8, bf16; benchmarks/README.md).
  """
  if implementation == 'cudnn':
    try:
      return jax.nn.dot_product_attention(q, k, v, bias=bias[None].astype(q.dtype), scale=1.0,
                                          implementation='cudnn')
    except (ValueError, NotImplementedError, RuntimeError, TypeError):
      pass  # cuDNN refused this shape or version while tracing: the XLA form below, same math.
  logits = jnp.einsum('bqhd,bkhd->bhqk', q, k, preferred_element_type=jnp.float32) + bias[None]
  probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
  return jnp.einsum('bhqk,bkhd->bqhd', probs, v)


class QKVProjection(nn.Module):
  """q, k and v of every head as one (3, batch, tokens, heads, head_size) array, q pre-scaled.

  The parameters are those of ``nn.DenseGeneral((3, heads, head_size))`` (kernel
  (C, 3, heads, head_size), bias (3, heads, head_size), same initialisation), but the output puts
  the q/k/v axis first, so each of q, k, v is a contiguous (B, N, heads, d) slice in the layout
  the attention takes (no transposes), and q's kernel and bias are multiplied by
  ``head_size ** -0.5`` (a pass over the small kernel instead of over q or the logits).
  """

  heads: int
  head_size: int
  dtype: Dtype

  @nn.compact
  def __call__(self, tokens):
    channels = tokens.shape[-1]
    shape = (channels, 3, self.heads, self.head_size)
    kernel = self.param('kernel', lambda key, shape, dtype: default_init(
        key, (channels, int(np.prod(shape[1:]))), dtype).reshape(shape), shape, jnp.float32)
    bias = self.param('bias', nn.initializers.zeros_init(), shape[1:], jnp.float32)
    scale = jnp.asarray([self.head_size ** -0.5, 1.0, 1.0], jnp.float32)[:, None, None]
    kernel = (kernel * scale).astype(self.dtype)
    out = jnp.einsum('bnc,cthd->tbnhd', tokens.astype(self.dtype), kernel)
    return out + (bias * scale).astype(self.dtype)[:, None, None]


class RelativeAttention(nn.Module):
  """Multi-head self-attention with a trainable (2H-1)x(2W-1) pre-softmax bias table per head.

  The table is sized from the feature map it sees (never from a constructor image size); logits,
  bias and softmax are float32 whatever the compute dtype (on the cuDNN path the bias is added in
  the compute dtype inside the fused kernel). ``rel_pos='mlp'`` takes the bias from timm's
  log-coordinate MLP instead (``relpos.RelPosMlp``), which has no size of its own. ``width`` is
  that of q, k and v (default ``features``); the out projection maps it to ``features``.
  ``implementation`` forces 'xla' or 'cudnn'; 'auto' asks ``attention_implementation``.
  """

  features: int
  head_size: int
  dtype: Dtype
  width: Optional[int] = None
  rel_pos: str = 'table'
  rel_pos_mlp_width: int = 512
  implementation: str = 'auto'

  @nn.compact
  def __call__(self, x, train: bool = False):
    batch, height, width, _ = x.shape
    heads = (self.width or self.features) // self.head_size
    if self.rel_pos == 'mlp':
      bias = relpos.RelPosMlp(heads, self.rel_pos_mlp_width, name='rel_pos_mlp')(
          height, width, deterministic=not train)
    else:
      bias = self._table_bias(heads, height, width)

    tokens = x.reshape(batch, height * width, x.shape[-1])
    q, k, v = QKVProjection(heads, self.head_size, self.dtype, name='qkv')(tokens)
    implementation = self.implementation
    if implementation == 'auto':
      implementation = attention_implementation(height * width, self.head_size, self.dtype,
                                                train)
    out = attend(q, k, v, bias, implementation)
    out = nn.DenseGeneral(self.features, axis=(-2, -1), dtype=self.dtype,
                          kernel_init=default_init, name='out')(out)
    return out.reshape(batch, height, width, self.features)

  def _table_bias(self, heads, height, width):
    """The paper's source: (heads, N, N) gathered from a trainable (heads, 2H-1, 2W-1) table."""
    table_shape = (heads, 2 * height - 1, 2 * width - 1)
    if self.has_variable('params', 'relative_bias'):
      have = self.get_variable('params', 'relative_bias').shape
      if tuple(have) != table_shape:
        raise ValueError(
            f'{"/".join(self.scope.path)}: relative-bias table {tuple(have)} was made for a '
            f'{(have[1] + 1) // 2}x{(have[2] + 1) // 2} feature map but this input gives '
            f'{height}x{width}; resize the variables first with '
            'coatnet_jax.models.resize_variables(model, variables, image_size).')
    table = self.param('relative_bias', default_init, table_shape, jnp.float32)
    return relative_bias(table, height, width)


class TransformerBlock(nn.Module):
  """Pre-norm transformer block: ``x + Attn(LN(x))`` then ``x + FFN(LN(x))``.

  With stride 2 both branches are pooled (paper eq. 4): ``Proj(Pool(x)) + Attn(Pool(LN(x)))``.
  A width change without stride (CoAtNet-6/7 inside S3) projects the shortcut only.
  """

  features: int
  stride: int
  head_size: int
  drop_path: float
  options: Options
  dtype: Dtype

  @nn.compact
  def __call__(self, x, train: bool):
    o = self.options
    norm = functools.partial(transformer_norm, o, train, dtype=self.dtype)
    dense = functools.partial(nn.Dense, dtype=self.dtype, kernel_init=default_init)
    shortcut = pool2x2(x, o.pool) if self.stride > 1 else x
    if shortcut.shape[-1] != self.features:
      shortcut = dense(self.features, use_bias=o.transformer_shortcut_bias,
                       name='shortcut_proj')(shortcut)
    y = norm(name='attn_norm')(x)
    if self.stride > 1:
      y = pool2x2(y, o.pool)
    width = self.features if o.attention_width == 'output' else x.shape[-1]
    y = RelativeAttention(self.features, self.head_size, self.dtype, width, o.rel_pos,
                          o.rel_pos_mlp_width, name='attention')(y, train)
    x = shortcut + DropPath(self.drop_path)(self._layer_scale('attn_scale', y), train)

    y = norm(name='ffn_norm')(x)
    y = gelu(dense(self.features * 4, name='ffn_in')(y), o)
    y = dense(self.features, name='ffn_out')(y)
    return x + DropPath(self.drop_path)(self._layer_scale('ffn_scale', y), train)

  def _layer_scale(self, name, y):
    """timm's LayerScale (``layer_scale`` > 0): a trainable per-channel factor on a branch."""
    if not self.options.layer_scale:
      return y
    scale = self.param(name, nn.initializers.constant(self.options.layer_scale),
                       (self.features,), jnp.float32)
    return y * scale.astype(y.dtype)


def transformer_norm(options, train, dtype, name):
  """The norm of transformer blocks: LayerNorm (paper) or BatchNorm, both with ``ln_epsilon``."""
  if options.transformer_norm == 'batch':
    return nn.BatchNorm(use_running_average=not train, momentum=options.bn_momentum,
                        epsilon=options.ln_epsilon, dtype=dtype, name=name)
  return nn.LayerNorm(epsilon=options.ln_epsilon, dtype=dtype, name=name)
