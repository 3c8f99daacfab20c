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

* "winograd": the SAME 3x3 stride-1 convolutions (14 of the CIFAR ResNet-18's 20, nearly all of its FLOPs) by
  Winograd's minimal filtering F(4x4, 3x3), the others as "patches" with the forward pass (and so the input
  gradient, its transpose) as one matmul per kernel offset where they have 64 or more input channels; also
  CPU only, same parameters. That last part took the ResNet-18 step from 15.5-16.0 s to 13.7-14.4 s (two
  runs each, alternated; XLA:CPU computes a strided layer's input gradient as a convolution of the
  stride-dilated gradient, three quarters of it multiplications by zero). The Winograd layers run over the
  batch in cache-sized chunks (_WINOGRAD_CHUNK_BYTES), which halved their time again. Per
  6x6 input tile, channel pair and 4x4 output tile it multiplies 36 times instead of 144; the products
  become 36 batched matmuls (one per transformed-tile position) between cheap elementwise transforms. A
  custom VJP keeps the backward pass Winograd too: the input gradient is the same convolution with the
  turned kernel, the kernel gradient JAX's transpose of the Winograd steps in the kernel. Measured on the
  SimCLR ResNet-18 step (batch 256, width 64, this 2-core machine; benchmarks/simclr_step.py), one run:
  21.1 s per step against 31.4 s for "patches" and 22.9 s for PyTorch. Letting JAX differentiate the
  Winograd forward instead (its input gradient then sums overlapping tiles, and the transformed tiles are
  kept for the backward pass) measured 24.7-26.9 s against 18.9-21.0 s, back to back; taking the kernel
  gradient from "patches" 23.9-26.8 s (and, with the autodiff version, Winograd on the wide late stages
  only: 24.5-25.8 s against 21.6-23.2 s). At width 16 it is slower than "patches" (batch 128: 54.3 against 75.3 images/s): with
  16-128 channels the matmuls are too narrow to pay for the transforms. Rounding: relative error ~1e-5
  against the direct convolution in float32 (tests/test_conv.py), computed in float32 whatever the
  compute dtype.
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


def _taps_conv(x, w, strides, padding, precision):
  """The convolution as one matmul per kernel offset: y = sum_t window_t(x) @ w[t], with window_t(x) the
  padded input shifted by offset t and subsampled by the strides ([n, *out_spatial, c]). Its transpose
  (the input gradient) is then one matmul per offset, each added into a strided slot of dx, instead of
  XLA:CPU's transposed convolution, which for a strided layer convolves the stride-dilated gradient and
  so multiplies by zeros three times in four (2x2 strides)."""
  kernel_spatial, c = w.shape[:-2], w.shape[-2]
  x = lax.pad(x, jnp.zeros((), x.dtype), [(0, 0, 0), *((lo, hi, 0) for lo, hi in padding), (0, 0, 0)])
  out_spatial = [(size - k) // s + 1 for size, k, s in zip(x.shape[1:-1], kernel_spatial, strides)]
  y = None
  for offset in itertools.product(*(range(k) for k in kernel_spatial)):
    limit = [t + s * (n - 1) + 1 for t, s, n in zip(offset, strides, out_spatial)]
    window = lax.slice(x, (0, *offset, 0), (x.shape[0], *limit, c), (1, *strides, 1))
    term = lax.dot_general(window, w[offset], (((window.ndim - 1,), (0,)), ((), ())), precision=precision)
    y = term if y is None else y + term
  return y


_FORWARDS = {"xla": _xla_conv, "taps": _taps_conv}


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4, 5))
def _patches_conv(x, w, strides, padding, precision, forward):
  return _FORWARDS[forward](x, w, strides, padding, precision)


def _patches_conv_fwd(x, w, strides, padding, precision, forward):
  return _FORWARDS[forward](x, w, strides, padding, precision), (x, w)


def _patches_conv_bwd(strides, padding, precision, forward, residuals, g):
  x, w = residuals
  # The convolution is linear in x: its input gradient is the transpose of the forward computation.
  (dx,) = jax.linear_transpose(lambda x_: _FORWARDS[forward](x_, w, strides, padding, precision), x)(g)
  dw = _kernel_grad(x, g, w.shape, strides, padding, precision).astype(w.dtype)
  return dx, dw


_patches_conv.defvjp(_patches_conv_fwd, _patches_conv_bwd)


def patches_conv_general_dilated(lhs, rhs, window_strides: Sequence[int], padding, lhs_dilation=None,
                                 rhs_dilation=None, dimension_numbers=None, feature_group_count: int = 1,
                                 precision=None, forward: str = "xla") -> jax.Array:
  """`lax.conv_general_dilated` with the patch-matmul kernel gradient, for the arguments flax.linen.Conv
  passes: channels-last layout, no dilation, one feature group. Others raise NotImplementedError.
  `forward`: "xla" (XLA's convolution and its transpose) or "taps" (one matmul per kernel offset)."""
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
  return _patches_conv(lhs, rhs, strides, padding, precision, forward)


class Conv(nn.Conv):
  """`flax.linen.Conv` whose kernel gradient is a matmul over image patches (see the module docstring).

  Named Conv on purpose: flax auto-names submodules after their class, so a ResNet built with either
  implementation has the same parameter tree ("Conv_0/kernel", ...) and checkpoints move between them.
  Bias, masks and dtype promotion are nn.Conv's own; only the convolution primitive differs.
  """

  conv_general_dilated: Callable[..., jax.Array] = patches_conv_general_dilated


# Winograd minimal filtering F(4x4, 3x3) (Lavin & Gray, "Fast Algorithms for Convolutional Neural Networks",
# CVPR 2016, section 4.2; interpolation points 0, +-1, +-2, infinity): a 4x4 output tile of a 3x3
# convolution is A^T [(G g G^T) * (B^T d B)] A for the 6x6 input tile d that covers it, so 36 multiplies per
# tile and channel pair instead of 144.
_WINOGRAD_BT = ((4, 0, -5, 0, 1, 0), (0, -4, -4, 1, 1, 0), (0, 4, -4, -1, 1, 0), (0, -2, -1, 2, 1, 0),
                (0, 2, -1, -2, 1, 0), (0, 4, 0, -5, 0, 1))
_WINOGRAD_G = ((1 / 4, 0, 0), (-1 / 6, -1 / 6, -1 / 6), (-1 / 6, 1 / 6, -1 / 6), (1 / 24, 1 / 12, 1 / 6),
               (1 / 24, -1 / 12, 1 / 6), (0, 0, 1))
_WINOGRAD_AT = ((1, 1, 1, 1, 1, 0), (0, 1, -1, 2, -2, 0), (0, 1, 1, 4, 4, 0), (0, 1, -1, 8, -8, 1))
_TILE_OUT, _TILE_IN = 4, 6
_TAPS_MIN_CHANNELS = 64
# The Winograd layers run over the batch in chunks whose activations fit in the caches (L2 2 MiB per core,
# L3 32 MiB here): a whole-batch layer streams tiles 2.25x the size of its input through memory four times
# and faults in fresh pages for each. Measured per layer (batch 512, forward + both gradients): 32x32x64
# 1.36 s whole, 0.69 s in chunks of 16 (4 MiB), 0.80 s of 32; 16x16x128 0.86 / 0.31 (16) / 0.37 s (32);
# 8x8x256 0.46 / 0.25 s (64); XLA's temporary memory 1441 MiB -> 55 MiB at 32x32x64. On the whole SimCLR
# ResNet-18 step (benchmarks/simclr_step.py, alternated in one sitting): budget 1 MiB 11.6 s, 2 MiB 11.1
# and 11.4 s, 4 MiB 13.0 and 13.0 s.
_WINOGRAD_CHUNK_BYTES = 2 * 2**20


def _small_matmul(matrix, x, axis: int):
  """out[.., i, ..] = sum_j matrix[i][j] * x[.., j, ..] along `axis`, as explicit adds of slices: the
  matrices are small and mostly 0 and +-1, so this is cheaper than a dot and XLA fuses it elementwise."""
  parts = [lax.index_in_dim(x, j, axis, keepdims=False) for j in range(x.shape[axis])]
  rows = []
  for row in matrix:
    terms = [parts[j] if c == 1 else -parts[j] if c == -1 else parts[j] * jnp.asarray(c, x.dtype)
             for j, c in enumerate(row) if c != 0]
    rows.append(functools.reduce(lax.add, terms))
  return jnp.stack(rows, axis)


def winograd_conv3x3(x, w, precision=None):
  """SAME 3x3 stride-1 convolution, x [n, h, w, c], w [3, 3, c, o] -> [n, h, w, o], by F(4x4, 3x3).

  Written with jnp ops only, so JAX can differentiate it (the layers use the custom VJP below, which
  measured faster). Computed in float32 whatever the input dtype (the transforms amplify rounding errors;
  measured relative error ~1e-5 in float32)."""
  n, h, wd, c = x.shape
  o = w.shape[-1]
  dtype = x.dtype
  x, w = x.astype(jnp.float32), w.astype(jnp.float32)
  th, tw = -(-h // _TILE_OUT), -(-wd // _TILE_OUT)
  # Pad by 1 (SAME) in front and up to whole tiles plus one block behind; tile (i, j) covers padded rows
  # 4i..4i+5: block i (4 rows) followed by the first 2 rows of block i + 1.
  x = jnp.pad(x, ((0, 0), (1, _TILE_OUT * (th + 1) - h - 1), (1, _TILE_OUT * (tw + 1) - wd - 1), (0, 0)))
  blocks = x.reshape(n, th + 1, _TILE_OUT, tw + 1, _TILE_OUT, c)
  extra = _TILE_IN - _TILE_OUT
  rows = jnp.concatenate([blocks[:, :th], blocks[:, 1:, :extra]], axis=2)
  tiles = jnp.concatenate([rows[:, :, :, :tw], rows[:, :, :, 1:, :extra]], axis=4)  # n, th, 6, tw, 6, c
  v = _small_matmul(_WINOGRAD_BT, _small_matmul(_WINOGRAD_BT, tiles, 2), 4)
  v = v.transpose(2, 4, 0, 1, 3, 5).reshape(_TILE_IN**2, n * th * tw, c)
  u = _small_matmul(_WINOGRAD_G, _small_matmul(_WINOGRAD_G, w, 0), 1).reshape(_TILE_IN**2, c, o)
  m = lax.dot_general(v, u, (((2,), (1,)), ((0,), (0,))), precision=precision)
  m = m.reshape(_TILE_IN, _TILE_IN, n, th, tw, o)
  y = _small_matmul(_WINOGRAD_AT, _small_matmul(_WINOGRAD_AT, m, 0), 1)  # 4, 4, n, th, tw, o
  y = y.transpose(2, 3, 0, 4, 1, 5).reshape(n, th * _TILE_OUT, tw * _TILE_OUT, o)
  return y[:, :h, :wd].astype(dtype)


def _num_batch_chunks(n: int, bytes_per_example: int) -> int:
  """How many chunks the Winograd layers split a batch of n into: the fewest whose chunks (a divisor of n
  examples) hold at most _WINOGRAD_CHUNK_BYTES of one example's largest activation."""
  target = max(1, _WINOGRAD_CHUNK_BYTES // bytes_per_example)
  return n // max(d for d in range(1, min(n, target) + 1) if n % d == 0)


def _chunk(a, num_chunks: int, i):
  """Chunk i of a's batch: examples i, i + num_chunks, i + 2 num_chunks, ... Interleaved rather than
  consecutive so that, under a global-view jit with the batch sharded over devices, the batch sharding can
  stay on the chunk's own axis and each device loops over its own examples (the train step's shard_map
  sees per-device arrays anyway; the global-view case is not measured here)."""
  a = a.reshape(a.shape[0] // num_chunks, num_chunks, *a.shape[1:])
  return lax.dynamic_index_in_dim(a, i, axis=1, keepdims=False)


def _unchunk(chunks, num_chunks: int):
  """Inverse of _chunk over all i: [num_chunks, n / num_chunks, ...] -> [n, ...]."""
  return chunks.swapaxes(0, 1).reshape(-1, *chunks.shape[2:])


def _chunked_winograd(x, w, precision, num_chunks: int):
  if num_chunks == 1:
    return winograd_conv3x3(x, w, precision)
  return _unchunk(lax.map(lambda i: winograd_conv3x3(_chunk(x, num_chunks, i), w, precision),
                          jnp.arange(num_chunks)), num_chunks)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _winograd_conv(x, w, precision, num_chunks):
  return _chunked_winograd(x, w, precision, num_chunks)


def _winograd_conv_fwd(x, w, precision, num_chunks):
  # Keeps x, not its transformed tiles (2.25x larger): the backward pass transforms x again.
  return _chunked_winograd(x, w, precision, num_chunks), (x, w)


def _winograd_conv_bwd(precision, num_chunks, residuals, g):
  x, w = residuals
  # The input gradient of a SAME 3x3 stride-1 convolution is the same convolution of g with the kernel
  # turned 180 degrees and its in/out channels swapped: Winograd again, with no overlapping tile sums
  # (which JAX's own transpose of the tile extraction would need).
  dx = _chunked_winograd(g, w[::-1, ::-1].swapaxes(2, 3), precision, num_chunks).astype(x.dtype)

  # The kernel gradient: JAX's transpose of the Winograd steps in w, i.e. one product of the transformed
  # input tiles with the transformed output-gradient tiles per tile position (36 batched matmuls), summed
  # over the chunks.
  def chunk_kernel_grad(i):
    xi, gi = (x, g) if num_chunks == 1 else (_chunk(x, num_chunks, i), _chunk(g, num_chunks, i))
    _, kernel_vjp = jax.vjp(lambda w_: winograd_conv3x3(xi, w_, precision), w)
    return kernel_vjp(gi)[0].astype(jnp.float32)

  if num_chunks == 1:
    return dx, chunk_kernel_grad(0).astype(w.dtype)
  dw = lax.fori_loop(1, num_chunks, lambda i, acc: acc + chunk_kernel_grad(i), chunk_kernel_grad(0))
  return dx, dw.astype(w.dtype)


_winograd_conv.defvjp(_winograd_conv_fwd, _winograd_conv_bwd)


def winograd_conv_general_dilated(lhs, rhs, window_strides: Sequence[int], padding, lhs_dilation=None,
                                  rhs_dilation=None, dimension_numbers=None, feature_group_count: int = 1,
                                  precision=None) -> jax.Array:
  """Winograd for SAME 3x3 stride-1 2-D convolutions (most of a ResNet's), the patches convolution
  otherwise (strided, 1x1, 7x7 layers), for the arguments flax.linen.Conv passes."""
  strides = tuple(int(s) for s in window_strides)
  if isinstance(padding, str):
    padding = lax.padtype_to_pads(lhs.shape[1:-1], rhs.shape[:-2], strides, padding)
  padding = tuple((int(lo), int(hi)) for lo, hi in padding)
  if (lhs.ndim == 4 and rhs.shape[:2] == (3, 3) and strides == (1, 1) and padding == ((1, 1), (1, 1))
      and feature_group_count == 1 and not any(d != 1 for d in (lhs_dilation or ()) + (rhs_dilation or ()))
      and dimension_numbers is not None
      and lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers) == _channels_last(2)):
    lhs, rhs = _match_varying_axes(lhs, rhs)
    num_chunks = _num_batch_chunks(lhs.shape[0], 4 * lhs.shape[1] * lhs.shape[2] * max(rhs.shape[2:]))
    return _winograd_conv(lhs, rhs, precision, num_chunks)
  # The other layers (strided, 1x1): one matmul per kernel offset (measured faster than XLA:CPU's convolution
  # at 64-256 input channels: forward + input gradient of ResNet-18's three 3x3/2 layers at batch 512, 1.35 s
  # against 1.69 s, of its three 1x1/2 layers 0.19 s against 0.37 s); XLA's with fewer channels, e.g. the
  # ImageNet stem (7x7 over 3 channels: 49 matmuls of depth 3).
  forward = "taps" if rhs.shape[-2] >= _TAPS_MIN_CHANNELS else "xla"
  return patches_conv_general_dilated(lhs, rhs, strides, padding, lhs_dilation, rhs_dilation,
                                      dimension_numbers, feature_group_count, precision, forward)


class WinogradConv(nn.Conv):
  """`flax.linen.Conv` computing SAME 3x3 stride-1 convolutions by Winograd F(4x4, 3x3), CPU only.
  Renamed Conv below, for the same parameter tree as the other implementations (see `Conv`)."""

  conv_general_dilated: Callable[..., jax.Array] = winograd_conv_general_dilated


WinogradConv.__name__ = WinogradConv.__qualname__ = "Conv"


CONV_IMPLS = {"xla": nn.Conv, "patches": Conv, "winograd": WinogradConv}


def conv_class(conv_impl: str) -> type:
  """The convolution module for `model.conv_impl`: "xla" (flax.linen.Conv) or "patches" (CPU)."""
  if conv_impl not in CONV_IMPLS:
    raise ValueError(f"conv_impl must be one of {sorted(CONV_IMPLS)}, got {conv_impl!r}")
  return CONV_IMPLS[conv_impl]
