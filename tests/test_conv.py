"""The CPU convolutions of ssl_jax/models/conv.py (patch-matmul kernel gradient; Winograd F(4x4, 3x3)) against
flax.linen.Conv: same parameters, same forward output, same input and kernel gradients."""

import functools

import flax.linen as nn
import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from ssl_jax import models, parallel
from ssl_jax.models import conv as conv_lib

CASES = [  # (kernel, strides, padding, in_channels, out_channels, height, width)
    ((1, 1), 1, "SAME", 8, 16, 8, 8),
    ((1, 1), 2, "SAME", 8, 16, 8, 8),
    ((3, 3), 1, "SAME", 5, 8, 9, 9),
    ((3, 3), 2, "SAME", 5, 8, 9, 8),
    ((3, 3), 2, [(1, 1), (1, 1)], 6, 4, 8, 8),
    ((3, 3), 1, "VALID", 4, 4, 7, 7),
    ((7, 7), 2, [(3, 3), (3, 3)], 3, 8, 16, 16),   # the ImageNet stem
    ((7, 7), 1, "SAME", 3, 4, 10, 10),
    ((3, 3), (2, 1), [(2, 0), (0, 1)], 4, 4, 9, 9),  # asymmetric strides and padding
]


def _random_like(abstract_tree, seed=0):
  """Standard-normal arrays shaped like `abstract_tree` (cheaper than compiling each initializer)."""
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda a: rng.standard_normal(a.shape).astype(np.float32), abstract_tree)


def _shapes(tree):
  return jax.tree.map(jnp.shape, tree)


def _outputs_and_grads(module, params, x, cotangent):
  """(y, dL/dkernel, dL/dx) for the loss <module(x), cotangent>."""
  y, vjp = jax.vjp(lambda p, x_: module.apply(p, x_), params, x)
  dparams, dx = vjp(cotangent)
  return y, dparams["params"]["kernel"], dx


# "winograd" computes SAME 3x3 stride-1 layers itself and hands every other layer to "patches", with the
# forward pass as one matmul per kernel offset ("taps") from conv._TAPS_MIN_CHANNELS input channels on: its
# own case, two hand-offs with XLA's forward and three with taps.
TAPS_CASES = [
    ((3, 3), 2, "SAME", 64, 8, 9, 8),
    ((1, 1), 2, "SAME", 64, 8, 8, 8),
    ((3, 3), (2, 1), [(2, 0), (0, 1)], 64, 4, 9, 9),
]
IMPL_CASES = ([("patches", *case) for case in CASES]
              + [("winograd", *CASES[i]) for i in (2, 3, 6)]
              + [("winograd", *case) for case in TAPS_CASES])


@pytest.mark.parametrize("impl,kernel,strides,padding,cin,cout,h,w", IMPL_CASES)
def test_cpu_conv_matches_flax_conv(impl, kernel, strides, padding, cin, cout, h, w):
  settings = {"features": cout, "kernel_size": kernel, "strides": strides, "padding": padding,
              "use_bias": False}
  reference, patches = nn.Conv(**settings), conv_lib.conv_class(impl)(**settings)
  x = _random_like(jax.ShapeDtypeStruct((3, h, w, cin), jnp.float32), seed=1)
  params = _random_like(jax.eval_shape(reference.init, jax.random.key(0), x))
  assert _shapes(jax.eval_shape(patches.init, jax.random.key(0), x)) == _shapes(params)
  cotangent = _random_like(jax.eval_shape(reference.apply, params, x), seed=2)

  @jax.jit
  def both():
    return [_outputs_and_grads(m, params, x, cotangent) for m in (patches, reference)]

  got, want = both()
  for g, w_ in zip(got, want):
    scale = np.max(np.abs(w_))
    np.testing.assert_allclose(g / scale, w_ / scale, atol=1e-5)
  # Which forward computed it: XLA's convolution primitive, or matmuls only (Winograd, taps).
  uses_xla_conv = "conv_general_dilated" in str(jax.make_jaxpr(patches.apply)(params, x))
  assert uses_xla_conv == (impl == "patches" or (kernel != (3, 3) or strides != 1 or padding != "SAME")
                           and cin < conv_lib._TAPS_MIN_CHANNELS)


@pytest.mark.parametrize("kernel,strides,padding,cin,cout,h,w", CASES)
def test_taps_forward_matches_xla_convolution(kernel, strides, padding, cin, cout, h, w):
  """The one-matmul-per-offset forward and its transpose (the input gradient) against XLA's convolution,
  on every layer shape of CASES (strided, asymmetric, VALID, 7x7)."""
  rng = np.random.default_rng(0)
  x, kernel_ = rng.standard_normal((3, h, w, cin), np.float32), rng.standard_normal((*kernel, cin, cout), np.float32)
  strides = (strides,) * 2 if isinstance(strides, int) else strides
  dn = ("NHWC", "HWIO", "NHWC")
  xla = lambda x_, k_: jax.lax.conv_general_dilated(x_, k_, strides, padding, dimension_numbers=dn)
  taps = lambda x_, k_: conv_lib.patches_conv_general_dilated(x_, k_, strides, padding, dimension_numbers=dn,
                                                              forward="taps")
  g = rng.standard_normal(jax.eval_shape(xla, x, kernel_).shape, np.float32)
  run = jax.jit(lambda f: (lambda y, vjp: (y, *vjp(g)))(*jax.vjp(f, x, kernel_)), static_argnums=0)
  for got, want in zip(run(taps), run(xla)):
    scale = np.max(np.abs(want))
    np.testing.assert_allclose(got / scale, want / scale, atol=1e-5)


def test_bias_and_batch_dims_follow_flax_conv():
  settings = {"features": 4, "kernel_size": (3, 3), "strides": 2}
  # Two leading batch dimensions, which nn.Conv flattens into one.
  x = _random_like(jax.ShapeDtypeStruct((2, 3, 8, 8, 5), jnp.float32), seed=1)
  params = _random_like(jax.eval_shape(nn.Conv(**settings).init, jax.random.key(0), x))
  loss = lambda module: lambda p: jnp.sum(jnp.sin(module.apply(p, x)))
  want = jax.jit(jax.grad(loss(nn.Conv(**settings))))(params)
  got = jax.jit(jax.grad(loss(conv_lib.Conv(**settings))))(params)
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("impl", ["patches", "winograd"])
def test_resnet_conv_impls_share_parameters_and_gradients(impl):
  x = _random_like(jax.ShapeDtypeStruct((4, 16, 16, 3), jnp.float32), seed=1)
  nets = {name: models.ResNet(stage_sizes=(1, 1), block_cls=models.resnet.BasicBlock, width=4, conv_impl=name)
          for name in ("xla", impl)}
  abstract = {name: jax.eval_shape(functools.partial(net.init, train=False), jax.random.key(0), x)
              for name, net in nets.items()}
  assert _shapes(abstract[impl]) == _shapes(abstract["xla"])
  variables = _random_like(abstract["xla"])

  def grad(net):
    def loss(params):
      out, _ = net.apply({**variables, "params": params}, x, train=True, mutable=["batch_stats"])
      return jnp.sum(out ** 2)
    return jax.grad(loss)(variables["params"])

  got, want = jax.jit(lambda: (grad(nets[impl]), grad(nets["xla"])))()
  for (path, g), w in zip(jax.tree_util.tree_leaves_with_path(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(g, w, rtol=1e-3, atol=1e-5 * np.max(np.abs(w)) + 1e-6, err_msg=str(path))


@pytest.mark.parametrize("impl,chunk_bytes", [("patches", None), ("winograd", None), ("winograd", 1)])
def test_kernel_gradient_under_shard_map_sums_over_devices(impl, chunk_bytes, monkeypatch):
  """A replicated kernel on a batch-sharded input, as in the train step: the gradient is the sum over
  devices, equal to nn.Conv's (Winograd also over batch chunks of one example each)."""
  if chunk_bytes:
    monkeypatch.setattr(conv_lib, "_WINOGRAD_CHUNK_BYTES", chunk_bytes)
  mesh = parallel.make_mesh()
  settings = {"features": 4, "kernel_size": (3, 3), "use_bias": False}
  x = _random_like(jax.ShapeDtypeStruct((2 * mesh.size, 6, 6, 3), jnp.float32), seed=1)
  params = _random_like(jax.eval_shape(nn.Conv(**settings).init, jax.random.key(0), x))

  def grad(module):
    def loss(p):
      per_device = lambda p_, x_: parallel.mean(jnp.sum(jnp.sin(module.apply(p_, x_))))
      return jax.shard_map(per_device, mesh=mesh, in_specs=(P(), P(parallel.DATA)), out_specs=P())(p, x)
    return jax.grad(loss)(params)

  got, want = jax.jit(lambda: (grad(conv_lib.conv_class(impl)(**settings)), grad(nn.Conv(**settings))))()
  # Winograd's rounding error is relative to the size of the sums (about 1e-5 of the largest entry), not to
  # each entry: a small entry beside large ones may differ by more than 1e-4 of itself.
  got, want = got["params"]["kernel"], want["params"]["kernel"]
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=2e-5 * np.max(np.abs(want)))


@pytest.mark.parametrize("n,h,w,c,o,chunks", [(2, 1, 1, 3, 2, 1), (2, 5, 3, 4, 6, 2), (1, 7, 9, 8, 5, 1),
                                               (3, 8, 8, 5, 7, 1), (6, 8, 8, 5, 7, 3)])
def test_winograd_matches_direct_convolution_at_any_size(n, h, w, c, o, chunks, monkeypatch):
  """F(4x4, 3x3) on sizes that are and are not whole 4x4 tiles, over the whole batch and in batch chunks:
  values and both gradients (the custom VJP: Winograd with the turned kernel; the transposed Winograd steps)
  against XLA's direct convolution, float32 and bfloat16."""
  # Chunks of n / chunks examples: the chunk budget is one such chunk's largest activation in bytes.
  monkeypatch.setattr(conv_lib, "_WINOGRAD_CHUNK_BYTES", 4 * h * w * max(c, o) * (n // chunks))
  assert conv_lib._num_batch_chunks(n, 4 * h * w * max(c, o)) == chunks
  rng = np.random.default_rng(0)
  x, kernel = rng.standard_normal((n, h, w, c), np.float32), rng.standard_normal((3, 3, c, o), np.float32)
  g = rng.standard_normal((n, h, w, o), np.float32)
  direct = lambda x_, k_: jax.lax.conv_general_dilated(x_, k_, (1, 1), "SAME",
                                                       dimension_numbers=("NHWC", "HWIO", "NHWC"))
  run = jax.jit(lambda f, x_, k_: (lambda y, vjp: (y, *vjp(g.astype(y.dtype))))(*jax.vjp(f, x_, k_)),
                static_argnums=0)
  winograd = lambda x_, k_: conv_lib.winograd_conv_general_dilated(x_, k_, (1, 1), "SAME",
                                                                   dimension_numbers=("NHWC", "HWIO", "NHWC"))
  for got, want in zip(run(winograd, x, kernel), run(direct, x, kernel)):
    scale = np.max(np.abs(want))
    np.testing.assert_allclose(got / scale, want / scale, atol=1e-5)
  y16 = jax.jit(winograd)(x.astype(jnp.bfloat16), kernel.astype(jnp.bfloat16))
  assert y16.dtype == jnp.bfloat16
  want = direct(x.astype(jnp.bfloat16).astype(np.float32), kernel.astype(jnp.bfloat16).astype(np.float32))
  np.testing.assert_allclose(np.asarray(y16, np.float32) / np.max(np.abs(want)), want / np.max(np.abs(want)),
                             atol=1e-2)


@pytest.mark.parametrize("h,w", [(8, 8), (5, 7), (1, 1)])
def test_winograd_backward_transforms_are_the_forward_transposes(h, w):
  """The custom VJP's tile transforms against JAX's own transposes of the forward ones: the output
  gradient's tiles (transposed output transform) and the overlap-add back to the input (transposed input
  transform), on whole and partial 4x4 tiles."""
  rng = np.random.default_rng(0)
  x = rng.standard_normal((2, h, w, 3), np.float32)
  tiles = jax.eval_shape(conv_lib._input_tiles, x)
  dv = rng.standard_normal(tiles.shape, np.float32)
  g = rng.standard_normal((2, h, w, 5), np.float32)
  m = jax.ShapeDtypeStruct((tiles.shape[0], tiles.shape[1], 5), jnp.float32)
  (want_dx,) = jax.linear_transpose(conv_lib._input_tiles, x)(dv)
  (want_gt,) = jax.linear_transpose(lambda m_: conv_lib._output_from_tiles(m_, g.shape), m)(g)
  np.testing.assert_allclose(conv_lib._input_from_tiles(dv, x.shape), want_dx, rtol=1e-5, atol=1e-4)
  np.testing.assert_allclose(conv_lib._gradient_tiles(g), want_gt, rtol=1e-5, atol=1e-4)


def test_conv_impl_checks_live_with_the_convolutions():
  """The model's checks (models.check, which config.validate calls) accept every implementation and turn
  down the others and a loop of xla steps on CPU in one line."""
  from ssl_jax import models
  from ssl_jax.errors import ConfigError
  m = models.default_config("resnet")
  for impl in conv_lib.CONV_IMPLS:
    m.conv_impl = impl
    models.check(m, "cpu", steps_per_loop=1 if impl == "xla" else 4)
  m.conv_impl = "cudnn"
  with pytest.raises(ConfigError, match="model.conv_impl must be xla, patches, winograd, got 'cudnn'"):
    models.check(m)
  m.conv_impl = "xla"
  with pytest.raises(ConfigError, match="~40x slower on CPU"):
    models.check(m, "cpu", steps_per_loop=2)
  models.check(m, "tpu", steps_per_loop=2)


def test_unknown_conv_impl_and_unsupported_settings_raise():
  with pytest.raises(ValueError, match="conv_impl"):
    conv_lib.conv_class("cudnn")
  x = jax.ShapeDtypeStruct((1, 8, 8, 4), jnp.float32)
  with pytest.raises(NotImplementedError, match="dilation"):
    jax.eval_shape(conv_lib.Conv(4, (3, 3), kernel_dilation=2).init, jax.random.key(0), x)
  with pytest.raises(NotImplementedError, match="feature_group_count"):
    jax.eval_shape(conv_lib.Conv(4, (3, 3), feature_group_count=2).init, jax.random.key(0), x)


def _conv_eqns(jaxpr):
  """Every conv_general_dilated equation in a closed jaxpr, nested calls and custom VJPs included."""
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == "conv_general_dilated":
      yield eqn
    for sub in jax.extend.core.jaxprs_in_params(eqn.params):
      yield from _conv_eqns(sub)


@pytest.mark.parametrize("strides", [1, 2])
def test_patches_gradient_convolutions_are_channels_last(strides):
  """The forward pass and the input gradient of "patches" are NHWC x HWIO -> NHWC convolutions. XLA:CPU
  brings any other layout (JAX's transpose of a convolution has the kernel's channel axes exchanged) to
  its convolution library's only outside loops, and steps_per_loop runs train steps in one: such an input
  gradient ran 4-12x slower there (conv._xla_conv_input_grad)."""
  module = conv_lib.Conv(8, (3, 3), strides=strides, use_bias=False)
  x = jnp.ones((2, 9, 9, 4))
  params = jax.eval_shape(module.init, jax.random.key(0), x)
  loss = lambda p, x_: jnp.sum(module.apply(p, x_) ** 2)
  eqns = list(_conv_eqns(jax.make_jaxpr(jax.grad(loss, argnums=(0, 1)))(params, x).jaxpr))
  assert len(eqns) == 2  # forward and input gradient; the kernel gradient is matmuls
  for eqn in eqns:
    assert eqn.params["dimension_numbers"] == conv_lib._channels_last(2), eqn.params["dimension_numbers"]
