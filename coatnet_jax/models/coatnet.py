"""The CoAtNet network: conv stem (S0), MBConv stages, relative-attention stages, pooled head."""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from coatnet_jax.models import blocks
from coatnet_jax.models.variants import Variant


# ImageNet's statistics in 0..255 pixel units: those steps.normalize applies (tested).
IMAGENET_MEAN_RGB = (0.485 * 255, 0.456 * 255, 0.406 * 255)
IMAGENET_STDDEV_RGB = (0.229 * 255, 0.224 * 255, 0.225 * 255)


def drop_path_rates(rate: float, num_blocks: int) -> list[float]:
  """Stochastic-depth rate per block of S1..S4, rising linearly from 0 to ``rate`` (as timm)."""
  return [float(r) for r in np.linspace(0.0, rate, num_blocks)]


# Rematerialisation policies of ``CoAtNet.remat`` (config.model.remat).
REMAT_POLICIES = {'none': None, 'block': None,
                  'dots': jax.checkpoint_policies.checkpoint_dots}


class CoAtNet(nn.Module):
  """CoAtNet on NHWC images; returns float32 logits.

  Attributes:
    variant: the layout (see ``variants.VARIANTS``).
    num_classes: classifier width.
    options: architecture switches; defaults are the paper's form.
    drop_path_rate: stochastic depth of the last block (linear from 0 over the blocks).
    dtype: compute dtype (float32 or bfloat16); parameters are always float32.
    remat: rematerialisation of each S1..S4 block in the backward pass (``REMAT_POLICIES``):
      'none' keeps every activation; 'block' keeps only block inputs and recomputes each block;
      'dots' keeps matmul outputs and recomputes the rest (norms, GELU, softmax, convolutions).
      The parameter tree is the same for every policy.
    folded_bn: the inference form with BatchNorms folded into convolutions (``fold.py``).
  """

  variant: Variant
  num_classes: int
  options: blocks.Options = blocks.Options()
  drop_path_rate: float = 0.0
  dtype: Any = jnp.float32
  remat: str = 'none'
  folded_bn: bool = False

  def _block(self, cls):
    if self.remat == 'none':
      return cls
    # static_argnums counts self: argument 2 is ``train``.
    return nn.remat(cls, static_argnums=(2,), policy=REMAT_POLICIES[self.remat])

  @nn.compact
  def __call__(self, images, train: bool = False):
    """Forward pass; per-stage outputs are sown into the 'intermediates' collection."""
    o, v = self.options, self.variant
    norm = nn.BatchNorm(use_running_average=not train, momentum=o.bn_momentum,
                        epsilon=o.bn_epsilon, dtype=self.dtype, name='stem_norm')
    if self.folded_bn:
      norm = lambda y: y  # pylint: disable=unnecessary-lambda-assignment
    x = jnp.asarray(images, self.dtype)
    if o.input_norm == 'half':  # pixels p = x * std + mean, then p / 127.5 - 1
      x = x * jnp.asarray(np.asarray(IMAGENET_STDDEV_RGB) / 127.5, self.dtype) + jnp.asarray(
          np.asarray(IMAGENET_MEAN_RGB) / 127.5 - 1.0, self.dtype)
    x = blocks.conv(v.stem_hidden or v.stem_width, 3, o, stride=2,
                    use_bias=o.stem_bias or self.folded_bn, dtype=self.dtype, name='stem_conv1')(x)
    x = blocks.activation(norm(x), o.conv_act, o)
    x = blocks.conv(v.stem_width, 3, o, use_bias=o.stem_bias, dtype=self.dtype,
                    name='stem_conv2')(x)
    self.sow('intermediates', 'stage0', x)

    rates = iter(drop_path_rates(self.drop_path_rate, v.num_blocks))
    for s, stage in enumerate(v.stages, start=1):
      b = 0
      for kind, width, depth in stage:
        for _ in range(depth):
          common = dict(features=width, stride=2 if b == 0 else 1, drop_path=next(rates),
                        options=o, dtype=self.dtype, name=f'stage{s}_block{b}')
          if kind == 'C':
            x = self._block(blocks.MBConvBlock)(folded=self.folded_bn, **common)(x, train)
          else:
            x = self._block(blocks.TransformerBlock)(head_size=v.head_size, **common)(x, train)
          b += 1
      self.sow('intermediates', f'stage{s}', x)

    # Head in float32: it is cheap and the logits feed the loss.
    x = x.astype(jnp.float32)
    if o.head_norm == 'spatial':  # timm's rw heads: the transformer norm on the map, then pool.
      x = jnp.mean(blocks.transformer_norm(o, train, jnp.float32, name='head_norm')(x), axis=(1, 2))
    else:
      x = nn.LayerNorm(epsilon=o.ln_epsilon, name='head_norm')(jnp.mean(x, axis=(1, 2)))
    if o.head_pre_logits:
      x = nn.Dense(v.head_hidden or v.final_width, kernel_init=blocks.default_init,
                   name='pre_logits')(x)
      x = jnp.tanh(x)
    return nn.Dense(self.num_classes, kernel_init=blocks.default_init, name='classifier')(x)
