"""Weight conversion between other implementations (timm) and this project's variables."""

from coatnet_jax.convert.timm import (from_timm, timm_input, timm_model, to_timm, TIMM_MODELS,
                                      TimmModel)

__all__ = ['from_timm', 'timm_input', 'timm_model', 'to_timm', 'TIMM_MODELS', 'TimmModel']
