"""BatchNorm folded into the neighbouring convolutions, for inference (evaluate, export, predict).

At inference a BatchNorm is the per-channel affine map ``x * s + t`` with
``s = scale / sqrt(var + eps)`` and ``t = bias - mean * s``. CoAtNet's BatchNorms all sit next to a
convolution and fold into it exactly (up to float rounding):
- the stem's ``stem_norm`` after ``stem_conv1``: kernel * s on the output channels, bias b * s + t;
- each MBConv's ``expand_norm`` after ``expand_conv`` and ``depthwise_norm`` after
  ``depthwise_conv``: the same, on the output channels;
- each MBConv's ``pre_norm`` before the 1x1 ``expand_conv``: a 1x1 convolution has no padding, so
  ``conv(x * s + t) = conv'(x) + t . kernel`` with the kernel's input rows scaled by s.
timm's layouts keep the norms that an activation or a squeeze-excitation gate separates from their
convolution (``blocks.foldable_mbconv_norms``), and BatchNorms in transformer blocks
(``transformer_norm='batch'``): their statistics pass through to the folded model.
So the folded network of the paper's layout runs no BatchNorm pass at all: 1 + 3 per MBConv block
fewer elementwise passes over the largest activations, and fewer variables to read.
"""

import jax.numpy as jnp

from coatnet_jax.models import blocks
from coatnet_jax.models.coatnet import CoAtNet


def folded_model(model: CoAtNet) -> CoAtNet:
  """The same network without BatchNorm modules; takes ``fold_batchnorm``'s variables."""
  return model.clone(folded_bn=True)


def _affine(params, stats, eps):
  s = params['scale'] / jnp.sqrt(stats['var'] + eps)
  return s, params['bias'] - stats['mean'] * s


def fold_batchnorm(model: CoAtNet, variables) -> dict:
  """{'params', 'batch_stats'} of ``model`` -> the variables of ``folded_model(model)``.

  Every other parameter, and the statistics of any BatchNorm not folded here, pass through
  unchanged; float32 arithmetic.
  """
  eps = model.options.bn_epsilon
  params = {k: dict(v) if isinstance(v, dict) or hasattr(v, 'items') else v
            for k, v in variables['params'].items()}
  stats = {k: dict(v) for k, v in variables.get('batch_stats', {}).items()}

  s, t = _affine(params.pop('stem_norm'), stats.pop('stem_norm'), eps)
  stem = dict(params['stem_conv1'])
  stem['bias'] = stem.get('bias', 0.0) * s + t
  stem['kernel'] = stem['kernel'] * s
  params['stem_conv1'] = stem

  folds = blocks.foldable_mbconv_norms(model.options)
  for name, block in params.items():
    if not (isinstance(block, dict) and 'expand_norm' in block):
      continue  # Transformer blocks and the head have no MBConv BatchNorm.
    block = dict(block)
    block_stats = stats[name]
    stats[name] = {k: v for k, v in block_stats.items() if k not in folds}
    s2, t2 = _affine(block.pop('expand_norm'), block_stats['expand_norm'], eps)
    kernel = block['expand_conv']['kernel']  # (1, 1, in, mid)
    if 'pre_norm' in folds:
      s1, t1 = _affine(block.pop('pre_norm'), block_stats['pre_norm'], eps)
      block['expand_conv'] = {'kernel': kernel * s1[:, None] * s2,
                              'bias': (t1 @ kernel[0, 0]) * s2 + t2}
    else:
      block['expand_conv'] = {'kernel': kernel * s2, 'bias': t2}
    if 'depthwise_norm' in folds:
      s3, t3 = _affine(block.pop('depthwise_norm'), block_stats['depthwise_norm'], eps)
      block['depthwise_conv'] = {'kernel': block['depthwise_conv']['kernel'] * s3, 'bias': t3}
    params[name] = block
  stats = {k: v for k, v in stats.items() if v}
  return {'params': params, **({'batch_stats': stats} if stats else {})}
