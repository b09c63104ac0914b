"""CoAtNet models: ``get_model(variant, num_classes)`` and the tools that act on their variables."""

import dataclasses
from typing import Any, Union

import jax.numpy as jnp

from coatnet_jax.models.blocks import Options, TIMM_OPTIONS
from coatnet_jax.models.coatnet import CoAtNet, REMAT_POLICIES, drop_path_rates
from coatnet_jax.models.fold import fold_batchnorm, folded_model
from coatnet_jax.models.resize import resize_variables
from coatnet_jax.models.variants import (PAPER_GMACS, PAPER_PARAMS, VARIANTS, Variant,
                                         variant_from_data)

__all__ = ['CoAtNet', 'Options', 'TIMM_OPTIONS', 'Variant', 'VARIANTS', 'PAPER_PARAMS',
           'PAPER_GMACS', 'get_model', 'resize_variables', 'drop_path_rates', 'REMAT_POLICIES',
           'fold_batchnorm', 'folded_model', 'variant_from_data']


def get_model(variant: Union[str, Variant], num_classes: int, *, dtype: Any = jnp.float32,
              drop_path_rate: float = 0.0, options: Options = Options(),
              remat: str = 'none', **switches) -> CoAtNet:
  """Builds a CoAtNet of a layout (a name of ``VARIANTS``, or a ``Variant`` the table lacks);
  ``switches`` override fields of ``options``.

  Example: ``get_model('coatnet_0', 1000, dtype=jnp.bfloat16, drop_path_rate=0.2, pool='avg')``.
  """
  if isinstance(variant, str):
    if variant not in VARIANTS:
      raise ValueError(f'Unknown model {variant!r}; valid names: {", ".join(VARIANTS)}.')
    variant = VARIANTS[variant]
  valid = {f.name for f in dataclasses.fields(Options)}
  unknown = sorted(set(switches) - valid)
  if unknown:
    raise ValueError(f'Unknown model switch(es) {unknown}; valid switches: {sorted(valid)}.')
  if not 0.0 <= drop_path_rate < 1.0:
    raise ValueError(f'drop_path_rate={drop_path_rate} must be in [0, 1).')
  if remat not in REMAT_POLICIES:
    raise ValueError(f'remat={remat!r} is not one of {tuple(REMAT_POLICIES)}.')
  return CoAtNet(variant, num_classes, dataclasses.replace(options, **switches),
                 drop_path_rate, dtype, remat)
