"""Initializers of the official PyTorch code that flax does not have under the same meaning."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def trunc_normal(std: float, bound: float = 2.0):
  """timm's / DINO's trunc_normal_(std=std) with its default cut-offs a=-2, b=2, which are ABSOLUTE values
  (not multiples of std): a normal(0, std) redrawn outside [-bound, bound]. At std 0.02 the cut is 100 std
  away, so it is a plain normal(0.02) in practice; jax's truncated_normal(0.02) instead cuts at 2 std and has
  a std of 0.88 x 0.02."""
  def init(key, shape, dtype=jnp.float32):
    return (std * jax.random.truncated_normal(key, -bound / std, bound / std, shape, jnp.float32)).astype(dtype)
  return init


def torch_linear_default(fan_in_axis: int = 0):
  """PyTorch's default nn.Linear / nn.Conv weight init, kaiming_uniform(a=sqrt(5)): uniform(+-1/sqrt(fan_in)),
  fan_in the size of axis `fan_in_axis` of the [in, out] kernel. DINO's last layer keeps it (it is created
  after the head's trunc_normal init, vision_transformer.py l.257-291)."""
  def init(key, shape, dtype=jnp.float32):
    bound = 1.0 / jnp.sqrt(shape[fan_in_axis])
    return jax.random.uniform(key, shape, dtype, -bound, bound)
  return init
