"""ssl_jax: self-supervised visual representation learning in JAX/Flax, TPU first."""

__version__ = "0.1.0"
