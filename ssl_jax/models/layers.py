"""Elementwise layers shared by the encoders and heads."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

_SQRT_HALF = float(np.sqrt(0.5))
_INV_SQRT_2PI = float(1.0 / np.sqrt(2.0 * np.pi))


@jax.custom_vjp
def gelu(x):
  """Exact GELU, x * Phi(x) = 0.5 x (1 + erf(x / sqrt 2)): PyTorch's nn.GELU() (approximate='none'), the
  form its CPU kernel computes, used by the ViTs and DINO's head.

  Its gradient Phi(x) + x phi(x) is written out (custom_vjp) so that the backward pass keeps only x and is
  one elementwise pass: differentiating the formula through erf left XLA:CPU three passes over the MLP's
  hidden activations and their intermediates (docs/cpu_step_benchmark.md). Same values as jax.nn.gelu
  (approximate=False) up to float32 rounding, and the same derivative (tests/test_vit.py)."""
  return 0.5 * x * (1.0 + jax.lax.erf(x * jnp.asarray(_SQRT_HALF, x.dtype)))


def _gelu_fwd(x):
  return gelu(x), x


def _gelu_bwd(x, g):
  cdf = 0.5 * (1.0 + jax.lax.erf(x * jnp.asarray(_SQRT_HALF, x.dtype)))
  pdf = jnp.exp(-0.5 * x * x) * jnp.asarray(_INV_SQRT_2PI, x.dtype)
  return (g * (cdf + x * pdf),)


gelu.defvjp(_gelu_fwd, _gelu_bwd)
