"""Command-line tools: ``python -m coatnet_jax.tools.<name>``."""
