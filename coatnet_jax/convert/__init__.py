"""Weight conversion from other implementations into this project's variables."""

from coatnet_jax.convert.timm import from_timm, TIMM_HEAD_SIZE, TIMM_IMAGE_SIZE, TIMM_MODELS

__all__ = ['from_timm', 'TIMM_HEAD_SIZE', 'TIMM_IMAGE_SIZE', 'TIMM_MODELS']
