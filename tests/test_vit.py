"""The Vision Transformer of ssl_jax/models/vit.py: parameter counts against the architecture formula and the
published figures, the sin-cos tables and the bicubic resize of the position embedding against direct
computations from the formulas, a tiny forward pass (representations, drop path, attention maps), each
repository's initialization and the config checks. Large models are only traced (jax.eval_shape)."""

import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from ssl_jax import models
from ssl_jax.errors import ConfigError
from ssl_jax.models import vit


def _count(tree) -> int:
  return sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(tree))


def _abstract_params(model, image_size: int):
  x = jax.ShapeDtypeStruct((1, image_size, image_size, 3), jnp.float32)
  return jax.eval_shape(lambda key, x: model.init(key, x, train=False), jax.random.key(0), x)["params"]


def _formula_count(dim: int, depth: int, patch: int, image: int, mlp_ratio: float = 4.0) -> int:
  """Parameters of a ViT without classifier, counted from the architecture."""
  hidden = int(dim * mlp_ratio)
  patches = (image // patch)**2
  per_block = (2 * 2 * dim                       # norm1, norm2: scale and bias
               + dim * 3 * dim + 3 * dim          # qkv
               + dim * dim + dim                  # proj
               + dim * hidden + hidden            # fc1
               + hidden * dim + dim)              # fc2
  return (3 * patch * patch * dim + dim           # patch_embed
          + dim                                   # cls_token
          + (1 + patches) * dim                   # pos_embed
          + depth * per_block
          + 2 * dim)                              # final norm


@pytest.mark.parametrize("arch,published,tolerance", [("vit_small", 22.0e6, 0.1e6), ("vit_base", 86.6e6, 0.1e6),
                                                      ("vit_large", 304e6, 0.5e6)])
def test_parameter_counts(arch, published, tolerance):
  """/16 models at 224 with a learned position embedding. The published figures (timm / DeiT: ViT-S/16 22.0M,
  ViT-B/16 86.6M, ViT-L/16 304M) include the 1000-class linear head, D * 1000 + 1000 parameters; without it
  they are 21.7M / 85.8M / 303.3M."""
  dim, depth, heads = vit.ARCHS[arch]
  model = vit.VisionTransformer(patch_size=16, embed_dim=dim, depth=depth, num_heads=heads)
  count = _count(_abstract_params(model, 224))
  assert count == _formula_count(dim, depth, 16, 224)
  assert abs(count + dim * 1000 + 1000 - published) <= tolerance


def test_registry_builds_the_configured_vit():
  cfg = models.default_config("vit")
  models.check(cfg)
  model = models.build(cfg)
  assert isinstance(model, vit.VisionTransformer)
  assert (model.embed_dim, model.depth, model.num_heads) == (384, 12, 6)
  cfg.update(arch="vit_small_12h", patch_size=4, image_size=32)
  models.apply_tiny(cfg)
  models.check(cfg)
  model = models.build(cfg)
  assert (model.embed_dim, model.depth, model.num_heads, model.mlp_ratio) == (64, 4, 4, 2.0)
  assert _count(_abstract_params(model, 32)) == _formula_count(64, 4, 4, 32, mlp_ratio=2.0) == 141376


def _sincos_reference(dim, grid_h, grid_w, order):
  """Direct per-token computation from the formulas: omega_i = 1 / 10000**(i / (D/4)), then
  [sin(a w), cos(a w), sin(b w), cos(b w)] with (a, b) = (column, row) for column_first, (row, column) for
  row_first; tokens row-major."""
  quarter = dim // 4
  table = np.zeros((grid_h * grid_w, dim))
  for row in range(grid_h):
    for col in range(grid_w):
      a, b = (col, row) if order == "column_first" else (row, col)
      for i in range(quarter):
        omega = 1.0 / 10000**(i / quarter)
        table[row * grid_w + col, [i, quarter + i, 2 * quarter + i, 3 * quarter + i]] = [
            math.sin(a * omega), math.cos(a * omega), math.sin(b * omega), math.cos(b * omega)]
  return table


@pytest.mark.parametrize("order", ["column_first", "row_first"])
def test_sincos_matches_the_formula(order):
  table = vit.sincos_2d(16, 3, 5, order)
  assert table.shape == (15, 16)
  np.testing.assert_allclose(table, _sincos_reference(16, 3, 5, order), atol=1e-6)


def test_row_first_is_column_first_transposed():
  dim, grid_h, grid_w = 16, 3, 5
  row_first = vit.sincos_2d(dim, grid_h, grid_w, "row_first").reshape(grid_h, grid_w, dim)
  column_first = vit.sincos_2d(dim, grid_w, grid_h, "column_first").reshape(grid_w, grid_h, dim)
  np.testing.assert_array_equal(row_first, column_first.transpose(1, 0, 2))
  # The same token: the two halves swapped.
  column_first = vit.sincos_2d(dim, grid_h, grid_w, "column_first")
  np.testing.assert_array_equal(row_first.reshape(-1, dim),
                                np.concatenate([column_first[:, dim // 2:], column_first[:, :dim // 2]], 1))


def _keys_cubic(x, a=-0.75):
  x = abs(x)
  if x <= 1:
    return (a + 2) * x**3 - (a + 3) * x**2 + 1
  if x < 2:
    return a * x**3 - 5 * a * x**2 + 8 * a * x - 4 * a
  return 0.0


def _torch_bicubic_reference(image, out_h, out_w):
  """PyTorch's interpolate(mode="bicubic", align_corners=False, size=(out_h, out_w)) on [h, w, c], written
  per output pixel: source coordinate (dst + 0.5) * in / out - 0.5, the 4 x 4 neighbours around its floor
  with indices clamped to the border, weights from the a = -0.75 cubic kernel of each axis' distance."""
  in_h, in_w, _ = image.shape
  out = np.zeros((out_h, out_w, image.shape[2]))
  for i in range(out_h):
    for j in range(out_w):
      src_y = (i + 0.5) * in_h / out_h - 0.5
      src_x = (j + 0.5) * in_w / out_w - 0.5
      y0, x0 = math.floor(src_y), math.floor(src_x)
      for dy in range(-1, 3):
        for dx in range(-1, 3):
          y = min(max(y0 + dy, 0), in_h - 1)
          x = min(max(x0 + dx, 0), in_w - 1)
          out[i, j] += _keys_cubic(src_y - (y0 + dy)) * _keys_cubic(src_x - (x0 + dx)) * image[y, x]
  return out


def test_interpolate_pos_embed():
  rng = np.random.default_rng(0)
  pos = rng.standard_normal((1, 17, 8)).astype(np.float32)        # class token + a 4 x 4 grid
  np.testing.assert_array_equal(vit.interpolate_pos_embed(pos, 4, 4), pos)
  np.testing.assert_array_equal(vit.bicubic_matrix(4, 4), np.eye(4))
  for new_h, new_w in [(6, 6), (3, 5)]:
    resized = np.asarray(vit.interpolate_pos_embed(pos, new_h, new_w))
    assert resized.shape == (1, 1 + new_h * new_w, 8)
    np.testing.assert_array_equal(resized[:, 0], pos[:, 0])
    expected = _torch_bicubic_reference(pos[0, 1:].reshape(4, 4, 8), new_h, new_w).reshape(-1, 8)
    np.testing.assert_allclose(resized[0, 1:], expected, rtol=1e-5, atol=1e-5)


def _init(model, x):
  """model.init under jit: compiling the initializers once is faster than running them op by op."""
  return jax.jit(lambda key: model.init(key, x, train=False))(jax.random.key(0))


def _tiny(**overrides):
  settings = dict(patch_size=4, embed_dim=32, depth=4, num_heads=4, mlp_ratio=2.0, image_size=32)
  return vit.VisionTransformer(**dict(settings, **overrides))


def test_tiny_forward():
  model = _tiny()
  x = jax.random.normal(jax.random.key(1), (2, 32, 32, 3))
  # Random parameters shaped by jax.eval_shape: running the initializers would cost seconds of compiling.
  rng = np.random.default_rng(0)
  variables = jax.tree.map(lambda leaf: 0.2 * rng.standard_normal(leaf.shape).astype(np.float32),
                           jax.eval_shape(lambda key: model.init(key, x, train=False), jax.random.key(0)))
  cls, state = model.apply(variables, x, train=False, mutable=["intermediates"])
  assert cls.shape == (2, 32) and cls.dtype == jnp.float32 and np.isfinite(cls).all()
  # Attention maps, sown per block: [n, heads, tokens, tokens], rows summing to 1.
  for i in range(4):
    (attention,) = state["intermediates"][f"block_{i}"]["attn"]["attention"]
    assert attention.shape == (2, 4, 65, 65)
    np.testing.assert_allclose(attention.sum(-1), 1.0, rtol=1e-5)
  assert np.array_equal(model.apply(variables, x, train=False), cls)     # nothing sown unless mutable

  # A 4 x 4 grid: the table resized. Under jit: op by op, the new shapes would compile every op again.
  small = jax.jit(lambda variables, x: model.apply(variables, x, train=False))(variables, x[:, :16, :16])
  assert small.shape == (2, 32) and np.isfinite(small).all()
  assert model.clone(representation="mean").apply(variables, x, train=False).shape == (2, 32)
  last4 = model.clone(representation="cls_last4").apply(variables, x, train=False)
  assert last4.shape == (2, 4 * 32)
  np.testing.assert_allclose(last4[:, -32:], cls, rtol=1e-6, atol=1e-6)   # the last block's is "cls"

  # Drop path: train=True draws from the "dropout" rng; train=False needs none and ignores the rate.
  dropping = model.clone(drop_path_rate=0.5)
  a = dropping.apply(variables, x, train=True, rngs={"dropout": jax.random.key(2)})
  b = dropping.apply(variables, x, train=True, rngs={"dropout": jax.random.key(3)})
  again = dropping.apply(variables, x, train=True, rngs={"dropout": jax.random.key(2)})
  assert not np.allclose(a, b)
  np.testing.assert_array_equal(a, again)
  np.testing.assert_array_equal(dropping.apply(variables, x, train=False), cls)
  np.testing.assert_array_equal(model.apply(variables, x, train=True), cls)    # rates 0: no rng needed


def _params(**overrides):
  model = _tiny(embed_dim=128, depth=1, **overrides)
  return _init(model, jnp.zeros((1, 32, 32, 3)))["params"]


def test_initializations():
  dim, fan_in = 128, 3 * 4 * 4

  moco = _params(init_scheme="moco_v3", pos_embed="sincos")
  assert "pos_embed" not in moco
  qkv = np.asarray(moco["block_0"]["attn"]["qkv"]["kernel"])
  bound = math.sqrt(6 / (dim + dim))          # Q, K, V as separate D x D matrices (MoCo v3 vits.py l.34-37)
  assert 0.99 * bound < np.abs(qkv).max() <= bound
  assert not np.asarray(moco["block_0"]["attn"]["qkv"]["bias"]).any()
  assert 0.7e-6 < np.std(moco["cls_token"]) < 1.3e-6
  patch = np.asarray(moco["patch_embed"]["kernel"])
  assert 0.98 * math.sqrt(6 / (fan_in + dim)) < np.abs(patch).max() <= math.sqrt(6 / (fan_in + dim))
  assert not np.asarray(moco["patch_embed"]["bias"]).any()

  mae = _params(init_scheme="mae", pos_embed="sincos")
  qkv = np.asarray(mae["block_0"]["attn"]["qkv"]["kernel"])
  assert 0.99 * math.sqrt(6 / (dim + 3 * dim)) < np.abs(qkv).max() <= math.sqrt(6 / (dim + 3 * dim))
  assert 0.015 < np.std(mae["cls_token"]) < 0.025

  dino = _params(init_scheme="dino")
  assert dino["pos_embed"].shape == (1, 1 + 64, dim)
  # timm's trunc_normal_(std=.02) cuts at +-2 in absolute terms: in effect normal(0.02), not jax's
  # truncated_normal(0.02) (cut at 2 std, std 0.0176).
  for kernel in (dino["block_0"]["attn"]["qkv"]["kernel"], dino["block_0"]["mlp"]["fc1"]["kernel"]):
    assert abs(np.std(kernel) / 0.02 - 1) < 0.05 and np.abs(kernel).max() > 0.05
  assert not np.asarray(dino["block_0"]["mlp"]["fc1"]["bias"]).any()
  patch_bias = np.asarray(dino["patch_embed"]["bias"])        # PyTorch's default Conv2d bias
  assert patch_bias.any() and np.abs(patch_bias).max() <= 1 / math.sqrt(fan_in)
  np.testing.assert_array_equal(dino["norm"]["scale"], 1.0)


@pytest.mark.parametrize("overrides", [
    dict(arch="vit_gigantic"), dict(pos_embed="rope"), dict(init="timm"), dict(representation="max"),
    dict(embed_dim=100), dict(embed_dim=390, num_heads=6, pos_embed="sincos"), dict(image_size=200),
    dict(drop_path_rate=1.0), dict(dropout_rate=-0.1), dict(representation="cls_last4", depth=3),
    dict(patch_size=0),
])
def test_check_rejects(overrides):
  cfg = ml_collections.ConfigDict(vit.default_config())
  vit.check(cfg)
  cfg.update(overrides)
  with pytest.raises(ConfigError) as error:
    models.check(cfg)
  assert "\n" not in str(error.value)


def test_gelu_values_and_gradient_are_the_exact_gelu():
  """layers.gelu (the ViT MLP's and DINO head's activation, with a written-out gradient) against float64
  x Phi(x) and Phi(x) + x phi(x) from math.erf, and against jax.nn.gelu(approximate=False) and its autodiff
  gradient; the dtype is kept."""
  from ssl_jax.models import layers
  x = np.concatenate([np.linspace(-9.0, 9.0, 1001), np.random.default_rng(0).standard_normal(1000) * 3])
  cdf = np.array([0.5 * (1.0 + math.erf(v / math.sqrt(2.0))) for v in x])
  pdf = np.exp(-0.5 * x * x) / math.sqrt(2.0 * math.pi)
  xf = jnp.asarray(x, jnp.float32)
  value, grad = jax.value_and_grad(lambda x: jnp.sum(layers.gelu(x) * jnp.cos(x)))(xf)
  np.testing.assert_allclose(value, np.sum(x * cdf * np.cos(x)), rtol=1e-5)
  # d/dx sum(gelu(x) cos x) = gelu'(x) cos x - gelu(x) sin x
  np.testing.assert_allclose(grad, (cdf + x * pdf) * np.cos(x) - x * cdf * np.sin(x), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(layers.gelu(xf), x * cdf, rtol=1e-5, atol=1e-6)
  reference = jax.grad(lambda x: jnp.sum(jax.nn.gelu(x, approximate=False) * jnp.cos(x)))(xf)
  np.testing.assert_allclose(grad, reference, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(layers.gelu(xf), jax.nn.gelu(xf, approximate=False), rtol=1e-5, atol=1e-6)
  assert layers.gelu(xf.astype(jnp.bfloat16)).dtype == jnp.bfloat16
