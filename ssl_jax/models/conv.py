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
slices concatenated) costs more than the product. The forward pass and the input gradient stay XLA
convolutions (the input gradient written in the layout XLA:CPU's convolution library takes, see
_xla_conv_input_grad).

* "winograd": the SAME 3x3 stride-1 convolutions (14 of the CIFAR ResNet-18's 20, nearly all of its FLOPs) by
  Winograd's minimal filtering F(4x4, 3x3), the others as "patches" with the forward pass (and so the input
  gradient, its transpose) as one matmul per kernel offset where they have 64 or more input channels
  (XLA:CPU computes a strided layer's input gradient as a convolution of the stride-dilated gradient, three
  quarters of it multiplications by zero); also CPU only, same parameters. Per 6x6 input tile, channel pair
  and 4x4 output tile it multiplies 36 times instead of 144: 36 batched matmuls (one per transformed-tile
  position) between elementwise transforms, run over the batch in cache-sized chunks. A custom VJP starts
  both gradients from the output gradient's tiles (the transposed output transform): the input gradient is
  the transposed input transform of those tiles times the kernel's (overlapping tiles summed back), the
  kernel gradient the product of the input tiles with them, summed over the batch. Letting JAX
  differentiate the Winograd forward instead measured 24.7-26.9 s per SimCLR step against 18.9-21.0 s (an
  early version, back to back), and the previous custom VJP (input gradient as a second Winograd
  convolution with the turned kernel, kernel gradient JAX's transpose of the forward in the kernel) 10.88 s
  against 10.00 s for this one (median of five alternated steps, benchmarks/simclr_step.py, ResNet-18 width
  64, batch 256). At width 16 (the quickstart's) it is level with "patches" (batch 128, two alternated runs:
  136 and 146 against 133 and 119 images/s) and compiles three times slower (22 s against 7.5 s). Rounding: relative error ~1e-5 against the direct convolution in float32
  (tests/test_conv.py), computed in float32 whatever the compute dtype.
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from ssl_jax.errors import ConfigError


def _channels_last(num_spatial: int) -> lax.ConvDimensionNumbers:
  """NHWC input, HWIO kernel, NHWC output (any number of spatial dims): what flax.linen.Conv uses."""
  spatial = tuple(range(1, num_spatial + 1))
  return lax.ConvDimensionNumbers(lhs_spec=(0, num_spatial + 1) + spatial,
                                  rhs_spec=(num_spatial + 1, num_spatial) + tuple(range(num_spatial)),
                                  out_spec=(0, num_spatial + 1) + spatial)


def _xla_conv(x, w, strides, padding, precision):
  return lax.conv_general_dilated(x, w, strides, padding, dimension_numbers=_channels_last(x.ndim - 2),
                                  precision=precision)


def _xla_conv_input_grad(g, w, in_spatial, strides, padding, precision):
  """dL/dx for y = _xla_conv(x, w): the stride-dilated output gradient convolved with the spatially
  flipped kernel, its input and output channels exchanged, written out in the channels-last layout.

  JAX's transpose of the convolution is the same convolution with the kernel's channel axes exchanged in
  its dimension numbers instead. XLA:CPU rewrites such a convolution into the layout its convolution
  library takes only in the entry computation (its ConvCanonicalization pass visits no other), so
  inside a while loop (the trainer's lax.scan over steps, steps_per_loop > 1) it fell back to the generic
  loop emitter: 13x slower for a 3x3 stride-1 layer (64x32x32x32), 4x at stride 2; this form runs at the
  same speed in and out of a loop, with the same result."""
  kernel_spatial = w.shape[:-2]
  flipped = jnp.flip(w, tuple(range(len(kernel_spatial)))).swapaxes(-1, -2)
  pads = []
  for n, k, s, (lo, _), m in zip(in_spatial, kernel_spatial, strides, padding, g.shape[1:-1]):
    low = k - 1 - lo  # output row i reads input rows s*i - lo ... s*i - lo + k - 1
    pads.append((low, n + k - 1 - ((m - 1) * s + 1) - low))
  return lax.conv_general_dilated(g, flipped, (1,) * len(strides), pads, lhs_dilation=strides,
                                  dimension_numbers=_channels_last(g.ndim - 2), precision=precision)


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
  if forward == "xla":
    dx = _xla_conv_input_grad(g, w, x.shape[1:-1], strides, padding, precision).astype(x.dtype)
  else:  # taps is linear in x: its input gradient is the transpose of the forward computation
    (dx,) = jax.linear_transpose(lambda x_: _taps_conv(x_, w, strides, padding, precision), x)(g)
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
# The Winograd layers run over the batch in chunks whose activations fit in the caches (L2 1 MiB per core,
# L3 32 MiB here): a whole-batch layer streams tiles 2.25x the size of its input through memory and
# faults in fresh pages for them. Measured per layer (batch 512, forward + both gradients), first version:
# 32x32x64 1.36 s whole, 0.69 s in chunks of 16 (4 MiB), 0.80 s of 32; 16x16x128 0.86 / 0.31 (16) / 0.37 s
# (32); 8x8x256 0.46 / 0.25 s (64); XLA's temporary memory 1441 MiB -> 55 MiB at 32x32x64. On the whole
# SimCLR ResNet-18 step (benchmarks/simclr_step.py, alternated in one sitting): budget 1 MiB 11.6 s, 2 MiB
# 11.1 and 11.4 s, 4 MiB 13.0 and 13.0 s. The current transforms, per layer, 1 / 2 / 4 MiB: 32x32x64 895 /
# 866 / 975 ms, 16x16x128 564 / 579 / 648 ms, 8x8x256 587 / 413 / 472 ms, 4x4x512 484 / 427 / 374 ms.
_WINOGRAD_CHUNK_BYTES = 2 * 2**20


def _transposed(matrix):
  return tuple(zip(*matrix))


def _combine(coefficients, terms):
  """sum_j coefficients[j] * terms[j], skipping zeros and multiplying only by coefficients other than +-1:
  the transform matrices are small and mostly 0 and +-1, so explicit adds beat a dot, and XLA fuses them."""
  total = None
  for c, t in zip(coefficients, terms):
    if c == 0:
      continue
    t = t if c == 1 else -t if c == -1 else t * jnp.asarray(c, t.dtype)
    total = t if total is None else total + t
  return total


def _pad_axis(a, axis: int, low: int, high: int):
  return lax.pad(a, jnp.zeros((), a.dtype), [(low, high, 0) if d == axis else (0, 0, 0) for d in range(a.ndim)])


# Each transform below is two separable passes (rows, then columns) over the chunk, every pass one sum of
# slices stacked straight into the layout the next step reads: no tile gathering by concatenation and no
# transposes. XLA:CPU emits each pass as one loop fusion; written as 1-D matrix products over gathered
# 6x6 tiles (the first version) the same transforms took five or six fusions each, and a layer's
# elementwise time was 377 ms against 234 ms now (32x32x64, batch 512, forward + both gradients).

def _num_tiles(h: int, w: int):
  return -(-h // _TILE_OUT), -(-w // _TILE_OUT)


def _input_tiles(x):
  """B^T d B for every 6x6 input tile d (SAME padding): x [n, h, w, c] -> [36, n * th * tw, c]."""
  n, h, w, c = x.shape
  th, tw = _num_tiles(h, w)
  # Pad by 1 (SAME) in front and up to whole 4-row blocks plus one behind: tile i covers padded rows
  # 4i..4i+5, i.e. block i and the first two rows of block i + 1.
  x = jnp.pad(x, ((0, 0), (1, _TILE_OUT * (th + 1) - h - 1), (1, _TILE_OUT * (tw + 1) - w - 1), (0, 0)))
  x = x.reshape(n, th + 1, _TILE_OUT, (tw + 1) * _TILE_OUT, c)
  rows = [x[:, r // _TILE_OUT:r // _TILE_OUT + th, r % _TILE_OUT] for r in range(_TILE_IN)]  # n, th, W, c
  v = jnp.stack([_combine(coefficients, rows) for coefficients in _WINOGRAD_BT])
  v = v.reshape(_TILE_IN, n, th, tw + 1, _TILE_OUT, c)
  cols = [v[:, :, :, s // _TILE_OUT:s // _TILE_OUT + tw, s % _TILE_OUT] for s in range(_TILE_IN)]
  v = jnp.stack([_combine(coefficients, cols) for coefficients in _WINOGRAD_BT], axis=1)  # 6, 6, n, th, tw, c
  return v.reshape(_TILE_IN**2, n * th * tw, c)


def _output_from_tiles(m, shape):
  """A^T m A for every tile: m [36, n * th * tw, o] -> y [n, h, w, o], shape = (n, h, w, o)."""
  n, h, w, o = shape
  th, tw = _num_tiles(h, w)
  m = m.reshape(_TILE_IN, _TILE_IN, n, th, tw, o)
  rows = jnp.stack([_combine(coefficients, list(m)) for coefficients in _WINOGRAD_AT])  # 4, 6, n, th, tw, o
  y = jnp.stack([jnp.stack([_combine(coefficients, list(row)) for coefficients in _WINOGRAD_AT], axis=3)
                 for row in rows], axis=2)                                               # n, th, 4, tw, 4, o
  return y.reshape(n, th * _TILE_OUT, tw * _TILE_OUT, o)[:, :h, :w]


def _gradient_tiles(g):
  """The transpose of _output_from_tiles, A g A^T for every 4x4 tile of g: [n, h, w, o] -> [36, T, o]."""
  n, h, w, o = g.shape
  th, tw = _num_tiles(h, w)
  g = jnp.pad(g, ((0, 0), (0, th * _TILE_OUT - h), (0, tw * _TILE_OUT - w), (0, 0)))
  g = g.reshape(n, th, _TILE_OUT, tw, _TILE_OUT, o)
  a = _transposed(_WINOGRAD_AT)
  rows = jnp.stack([_combine(coefficients, [g[:, :, r] for r in range(_TILE_OUT)]) for coefficients in a])
  t = jnp.stack([_combine(coefficients, [rows[..., s, :] for s in range(_TILE_OUT)]) for coefficients in a],
                axis=1)                                                                  # 6, 6, n, th, tw, o
  return t.reshape(_TILE_IN**2, n * th * tw, o)


def _input_from_tiles(dv, shape):
  """The transpose of _input_tiles: B dv B^T for every tile, overlapping tiles summed into the input they
  came from (rows 4 and 5 of tile i are rows 0 and 1 of tile i + 1's block). dv [36, T, c] -> [n, h, w, c]."""
  n, h, w, c = shape
  th, tw = _num_tiles(h, w)
  dv = dv.reshape(_TILE_IN, _TILE_IN, n, th, tw, c)
  b = _transposed(_WINOGRAD_BT)

  def blocks(parts, axis):
    """Six tile-local rows (or columns) -> four block rows over th + 1 (tw + 1) blocks."""
    return [_pad_axis(parts[r], axis, 0, 1) + (_pad_axis(parts[r + _TILE_OUT], axis, 1, 0)
                                              if r + _TILE_OUT < _TILE_IN else 0)
            for r in range(_TILE_OUT)]

  cols = [_combine(coefficients, [dv[:, s] for s in range(_TILE_IN)]) for coefficients in b]  # 6, n, th, tw, c
  cols = jnp.stack(blocks(cols, 3), axis=4)                                                  # 6, n, th, tw+1, 4, c
  rows = [_combine(coefficients, list(cols)) for coefficients in b]                         # n, th, tw+1, 4, c
  dx = jnp.stack(blocks(rows, 1), axis=2)                                                    # n, th+1, 4, tw+1, 4, c
  dx = dx.reshape(n, (th + 1) * _TILE_OUT, (tw + 1) * _TILE_OUT, c)
  return dx[:, 1:h + 1, 1:w + 1]


def _kernel_tiles(w):
  """G w G^T: [3, 3, c, o] -> [36, c, o]."""
  rows = [_combine(coefficients, list(w)) for coefficients in _WINOGRAD_G]
  return jnp.stack([jnp.stack([_combine(coefficients, list(row)) for coefficients in _WINOGRAD_G])
                    for row in rows]).reshape(_TILE_IN**2, *w.shape[2:])


def _kernel_from_tiles(du):
  """The transpose of _kernel_tiles: [36, c, o] -> [3, 3, c, o]."""
  du = du.reshape(_TILE_IN, _TILE_IN, *du.shape[1:])
  g = _transposed(_WINOGRAD_G)
  rows = [_combine(coefficients, list(du)) for coefficients in g]
  return jnp.stack([jnp.stack([_combine(coefficients, list(row)) for coefficients in g]) for row in rows])


def _tile_matmul(a, b, precision, contract: int):
  """36 matmuls, one per tile position: a [36, ., .] contracted over its axis `contract` with b's axis 1."""
  return lax.dot_general(a, b, (((contract,), (1,)), ((0,), (0,))), precision=precision,
                         preferred_element_type=jnp.float32)


def _winograd_chunk(x, u, out_channels: int, precision):
  m = _tile_matmul(_input_tiles(x.astype(jnp.float32)), u, precision, 2)
  return _output_from_tiles(m, (*x.shape[:3], out_channels))


def winograd_conv3x3(x, w, precision=None):
  """SAME 3x3 stride-1 convolution, x [n, h, w, c], w [3, 3, c, o] -> [n, h, w, o], by F(4x4, 3x3).

  Written with jnp ops only, so JAX can differentiate it (the layers use the custom VJP below, which
  measured faster). Computed in float32 whatever the input dtype (the transforms amplify rounding errors;
  measured relative error ~1e-5 in float32)."""
  return _winograd_chunk(x, _kernel_tiles(w.astype(jnp.float32)), w.shape[-1], precision).astype(x.dtype)


def _num_batch_chunks(n: int, bytes_per_example: int) -> int:
  """How many chunks the Winograd layers split a batch of n into: the fewest whose chunks (a divisor of n
  examples) hold at most _WINOGRAD_CHUNK_BYTES of one example's largest activation."""
  target = max(1, _WINOGRAD_CHUNK_BYTES // bytes_per_example)
  return n // max(d for d in range(1, min(n, target) + 1) if n % d == 0)


# Chunk i holds examples i, i + k, i + 2k, ... of a batch split into k chunks: the [n / k, k, ...] view of the
# batch indexed on its second axis. Interleaved rather than consecutive so that, under a global-view jit with
# the batch sharded over devices, the sharding can stay on the view's first axis and each device loops over
# its own examples (the train step's shard_map sees per-device arrays anyway; the global-view case is not
# measured here). Each chunk's result is written in place into the same view of the output, so the output
# needs no reordering copy afterwards.

def _chunk_view(a, num_chunks: int):
  return a.reshape(a.shape[0] // num_chunks, num_chunks, *a.shape[1:])


def _varying_like(a, reference):
  """`a` (built from constants) typed as varying over the mesh axes `reference` varies over, as a loop
  carry that the loop body updates from `reference` must be under shard_map."""
  axes = jax.typeof(reference).manual_axis_type.varying - jax.typeof(a).manual_axis_type.varying
  return lax.pcast(a, tuple(sorted(axes)), to="varying") if axes else a


def _over_chunks(chunk_fn, inputs, out_shape, out_dtype, num_chunks: int, accumulator=None):
  """Runs chunk_fn over the batch chunks of `inputs` (arrays with the same batch size). chunk_fn(*chunks)
  returns the chunk's output (and, with `accumulator`, a value summed over the chunks, started at
  `accumulator`). Returns the [n, ...] output (and the sum)."""
  if num_chunks == 1:
    result = chunk_fn(*inputs)
    if accumulator is None:
      return result.astype(out_dtype)
    return result[0].astype(out_dtype), accumulator + result[1]
  views = [_chunk_view(a, num_chunks) for a in inputs]
  out = _varying_like(jnp.zeros((out_shape[0] // num_chunks, num_chunks, *out_shape[1:]), out_dtype), inputs[0])

  def body(i, carry):
    out, total = carry
    result = chunk_fn(*(lax.dynamic_index_in_dim(v, i, axis=1, keepdims=False) for v in views))
    if accumulator is not None:
      result, part = result
      total = total + part
    return lax.dynamic_update_index_in_dim(out, result.astype(out_dtype), i, axis=1), total

  total = None if accumulator is None else _varying_like(accumulator, inputs[0])
  out, total = lax.fori_loop(0, num_chunks, body, (out, total))
  out = out.reshape(out_shape)
  return out if accumulator is None else (out, total)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _winograd_conv(x, w, precision, num_chunks):
  return _winograd_conv_fwd(x, w, precision, num_chunks)[0]


def _winograd_conv_fwd(x, w, precision, num_chunks):
  u, o = _kernel_tiles(w.astype(jnp.float32)), w.shape[-1]
  y = _over_chunks(lambda xi: _winograd_chunk(xi, u, o, precision), [x], (*x.shape[:3], o), x.dtype, num_chunks)
  # Keeps x, not its transformed tiles (2.25x larger): the backward pass transforms x again.
  return y, (x, w)


def _winograd_conv_bwd(precision, num_chunks, residuals, g):
  x, w = residuals
  c, o = w.shape[2:]
  u = _kernel_tiles(w.astype(jnp.float32))

  def chunk(xi, gi):
    # Both gradients start from the output gradient's tiles A g A^T (the transpose of the output transform):
    # dx is the transposed input transform of (those tiles times u^T) per tile position, dw the transposed
    # kernel transform of (the input tiles^T times those tiles), summed over the batch.
    gt = _gradient_tiles(gi.astype(jnp.float32))
    dxi = _input_from_tiles(_tile_matmul(gt, u.swapaxes(1, 2), precision, 2), xi.shape)
    return dxi, _tile_matmul(_input_tiles(xi.astype(jnp.float32)), gt, precision, 1)

  dx, du = _over_chunks(chunk, [x, g], x.shape, x.dtype, num_chunks,
                        accumulator=jnp.zeros((_TILE_IN**2, c, o), jnp.float32))
  return dx, _kernel_from_tiles(du).astype(w.dtype)


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


def check(conv_impl: str, platform: str = "", steps_per_loop: int = 1) -> None:
  """Raises ConfigError (one line) for a `model.conv_impl` that cannot run, or would run ~40x slower:
  platform is the devices' jax platform where known, steps_per_loop the trainer's steps per call."""
  if conv_impl not in CONV_IMPLS:
    raise ConfigError(f"model.conv_impl must be {', '.join(CONV_IMPLS)}, got {conv_impl!r}")
  if steps_per_loop > 1 and platform == "cpu" and conv_impl == "xla":
    # XLA:CPU rewrites a kernel-gradient convolution into its library's layout only outside loops
    # (_xla_conv_input_grad): inside the trainer's scan a step measured 37x and 54x slower.
    raise ConfigError(f"steps_per_loop={steps_per_loop} with model.conv_impl=xla is ~40x slower on CPU; "
                      "use model.conv_impl=patches or winograd, or steps_per_loop=1")


def conv_class(conv_impl: str) -> type:
  """The convolution module for `model.conv_impl`: "xla" (flax.linen.Conv) or "patches" (CPU)."""
  if conv_impl not in CONV_IMPLS:
    raise ValueError(f"conv_impl must be one of {sorted(CONV_IMPLS)}, got {conv_impl!r}")
  return CONV_IMPLS[conv_impl]
