"""coatnet_jax: the CoAtNet family (Dai et al., 2021) in JAX/Flax, from one GPU to TPU pods."""

__version__ = '0.1.0'
