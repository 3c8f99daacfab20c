"""Convolution layers for the encoders, chosen by `model.conv_impl`.

* "xla": `flax.linen.Conv`; XLA differentiates the convolution itself. The choice for TPU and GPU.
* "patches": the same layer (same parameters, initialization, padding and strides, NHWC) whose kernel
  gradient is computed as matrix products over image patches, for XLA:CPU. XLA:CPU computes a
  convolution's forward pass and input gradient at matmul-like speed but its kernel gradient about ten
  times slower (3x3 conv, 512x32x32x64: 0.7 s forward, 0.7 s input gradient, 8.3 s kernel gradient), and
  the kernel gradient then dominates a ResNet train step (see benchmarks/simclr_step.py).

The kernel gradient of y = conv(x, w) is the im2col product
    dw[t] = sum over output positions p of  window_t(x)[p]^T g[p],     t = one kernel offset,
where window_t(x) is the padded input shifted by offset t and subsampled by the strides, and g = dL/dy.
Stacking the windows into one [positions, k*k*C] patch matrix would make this a single matmul; one
matmul per offset computes the same sums without materializing that k*k times larger matrix (temporary
memory about that of XLA's own kernel gradient), and measured faster on XLA:CPU than the single matmul,
whose patch extraction (`lax.conv_general_dilated_patches` is itself a grouped convolution, or k*k
slices concatenated) costs more than the product. The forward pass and the input gradient stay XLA's
convolution and its transpose.
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax


def _channels_last(num_spatial: int) -> lax.ConvDimensionNumbers:
  """NHWC input, HWIO kernel, NHWC output (any number of spatial dims): what flax.linen.Conv uses."""
  spatial = tuple(range(1, num_spatial + 1))
  return lax.ConvDimensionNumbers(lhs_spec=(0, num_spatial + 1) + spatial,
                                  rhs_spec=(num_spatial + 1, num_spatial) + tuple(range(num_spatial)),
                                  out_spec=(0, num_spatial + 1) + spatial)


def _xla_conv(x, w, strides, padding, precision):
  return lax.conv_general_dilated(x, w, strides, padding, dimension_numbers=_channels_last(x.ndim - 2),
                                  precision=precision)


def _kernel_grad(x, g, kernel_shape, strides, padding, precision):
  """dL/dw for y = conv(x, w): x [n, *in_spatial, c], g [n, *out_spatial, o] -> [*kernel_spatial, c, o].

  A scan over the kernel offsets, so one input window is alive at a time: unrolled, XLA keeps all k*k
  windows (k*k times the input) alive at once."""
  c, o = kernel_shape[-2:]
  # lax.pad rather than jnp.pad: explicit padding may be negative (cropping), as in lax.conv.
  x = lax.pad(x, jnp.zeros((), x.dtype), [(0, 0, 0), *((lo, hi, 0) for lo, hi in padding), (0, 0, 0)])
  window_shape = (x.shape[0], *(s * (n - 1) + 1 for s, n in zip(strides, g.shape[1:-1])), c)
  g = g.reshape(-1, o)
  offsets = jnp.array(list(itertools.product(*(range(k) for k in kernel_shape[:-2]))), jnp.int32)

  def per_offset(carry, offset):
    window = lax.dynamic_slice(x, (0, *offset, 0), window_shape)
    window = lax.slice(window, (0,) * window.ndim, window.shape, (1, *strides, 1))
    return carry, lax.dot_general(window.reshape(-1, c), g, (((0,), (0,)), ((), ())), precision=precision,
                                  preferred_element_type=jnp.float32)

  _, dw = lax.scan(per_offset, None, offsets)
  return dw.reshape(kernel_shape)


def _match_varying_axes(x, w):
  """Under shard_map, casts an operand to varying over the mesh axes the other varies over (a replicated
  kernel applied to a batch-sharded input). A custom VJP must return cotangents typed like its inputs; the
  cast's transpose then sums the kernel gradient over those axes, as autodiff of lax.conv does itself."""
  x_axes, w_axes = (jax.typeof(a).manual_axis_type.varying for a in (x, w))
  if x_axes - w_axes:
    w = lax.pcast(w, tuple(sorted(x_axes - w_axes)), to="varying")
  if w_axes - x_axes:
    x = lax.pcast(x, tuple(sorted(w_axes - x_axes)), to="varying")
  return x, w


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _patches_conv(x, w, strides, padding, precision):
  return _xla_conv(x, w, strides, padding, precision)


def _patches_conv_fwd(x, w, strides, padding, precision):
  return _xla_conv(x, w, strides, padding, precision), (x, w)


def _patches_conv_bwd(strides, padding, precision, residuals, g):
  x, w = residuals
  # The convolution is linear in x: its transpose is XLA's own input gradient.
  (dx,) = jax.linear_transpose(lambda x_: _xla_conv(x_, w, strides, padding, precision), x)(g)
  dw = _kernel_grad(x, g, w.shape, strides, padding, precision).astype(w.dtype)
  return dx, dw


_patches_conv.defvjp(_patches_conv_fwd, _patches_conv_bwd)


def patches_conv_general_dilated(lhs, rhs, window_strides: Sequence[int], padding, lhs_dilation=None,
                                 rhs_dilation=None, dimension_numbers=None, feature_group_count: int = 1,
                                 precision=None) -> jax.Array:
  """`lax.conv_general_dilated` with the patch-matmul kernel gradient, for the arguments flax.linen.Conv
  passes: channels-last layout, no dilation, one feature group. Others raise NotImplementedError."""
  num_spatial = lhs.ndim - 2
  if dimension_numbers is None or (lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers)
                                   != _channels_last(num_spatial)):
    raise NotImplementedError(f"patches conv supports channels-last layouts only, got {dimension_numbers}")
  if any(d != 1 for d in (lhs_dilation or ())) or any(d != 1 for d in (rhs_dilation or ())):
    raise NotImplementedError("patches conv does not support input or kernel dilation")
  if feature_group_count != 1:
    raise NotImplementedError("patches conv does not support feature_group_count > 1")
  strides = tuple(int(s) for s in window_strides)
  if isinstance(padding, str):
    padding = lax.padtype_to_pads(lhs.shape[1:-1], rhs.shape[:-2], strides, padding)
  padding = tuple((int(lo), int(hi)) for lo, hi in padding)
  lhs, rhs = _match_varying_axes(lhs, rhs)
  return _patches_conv(lhs, rhs, strides, padding, precision)


class Conv(nn.Conv):
  """`flax.linen.Conv` whose kernel gradient is a matmul over image patches (see the module docstring).

  Named Conv on purpose: flax auto-names submodules after their class, so a ResNet built with either
  implementation has the same parameter tree ("Conv_0/kernel", ...) and checkpoints move between them.
  Bias, masks and dtype promotion are nn.Conv's own; only the convolution primitive differs.
  """

  conv_general_dilated: Callable[..., jax.Array] = patches_conv_general_dilated


CONV_IMPLS = {"xla": nn.Conv, "patches": Conv}


def conv_class(conv_impl: str) -> type:
  """The convolution module for `model.conv_impl`: "xla" (flax.linen.Conv) or "patches" (CPU)."""
  if conv_impl not in CONV_IMPLS:
    raise ValueError(f"conv_impl must be one of {sorted(CONV_IMPLS)}, got {conv_impl!r}")
  return CONV_IMPLS[conv_impl]
