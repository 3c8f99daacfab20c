"""Vision Transformer (Dosovitskiy et al. 2021) in Flax linen, as used by DINO, MoCo v3 and MAE.

One module covers the three repositories' encoders (../shared/RECIPES.md sections 4, 8, 9 and 11): pre-norm
blocks with LayerNorm eps 1e-6 and a qkv bias, a class token, a learned or fixed 2-D sin-cos position
embedding, and each repository's initialization (`init`). Inputs whose patch grid differs from the one the
position embedding was made for (DINO's 96-px local crops) get the table resized bicubically, as DINO does.

Parameter names follow the PyTorch modules (patch_embed, cls_token, pos_embed, block_i/{norm1, attn/{qkv,
proj}, norm2, mlp/{fc1, fc2}}, norm), so that optimizer groups chosen by path (MoCo v3's frozen patch
projection, DINO's weight-decay mask) and weight imports can name them.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Callable, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from ssl_jax.errors import ConfigError
from ssl_jax.models import initializers, layers

# (embed_dim, depth, num_heads); mlp_ratio 4 for all. DINO vision_transformer.py l.236-254 (tiny, small,
# base), MoCo v3 vits.py l.115-118 (ViT-S with 12 heads: head dim 32), MAE models_mae.py l.231-244 (large,
# huge).
ARCHS = {
    "vit_tiny": (192, 12, 3),
    "vit_small": (384, 12, 6),
    "vit_small_12h": (384, 12, 12),
    "vit_base": (768, 12, 12),
    "vit_large": (1024, 24, 16),
    "vit_huge": (1280, 32, 16),
}
POS_EMBEDS = ("learned", "sincos")
INITS = ("dino", "moco_v3", "mae")
REPRESENTATIONS = ("cls", "mean", "cls_last4", "gap")
LAYER_NORM_EPS = 1e-6  # all three repositories: partial(nn.LayerNorm, eps=1e-6)

# The sin-cos ordering each repository uses (RECIPES.md section 4, pitfalls): MoCo v3 puts the token's row
# in the first half of the dimensions, MAE its column. DINO has no sin-cos table; MAE's ordering is the default.
SINCOS_ORDER = {"dino": "column_first", "moco_v3": "row_first", "mae": "column_first"}


def sincos_2d(embed_dim: int, grid_h: int, grid_w: int, order: str = "column_first") -> np.ndarray:
  """Fixed 2-D sin-cos position embedding: [grid_h * grid_w, embed_dim] float32, tokens row-major.

  With D/4 frequencies omega_i = 1 / 10000**(i / (D/4)) and a token at row r, column c, the embedding is
  [sin(a w), cos(a w), sin(b w), cos(b w)] with (a, b) = (c, r) for order="column_first" (MAE
  util/pos_embed.py l.20-67: np.meshgrid(grid_w, grid_h) puts the column first) and (a, b) = (r, c) for
  order="row_first" (MoCo v3 vits.py l.53-69: torch.meshgrid(grid_w, grid_h) in 'ij' indexing, then
  flattened, makes the first quarter follow the row). The class-token slot (zeros) is not included.
  """
  if embed_dim % 4:
    raise ValueError(f"a 2-D sin-cos embedding needs embed_dim divisible by 4, got {embed_dim}")
  if order not in ("column_first", "row_first"):
    raise ValueError(f"order must be 'column_first' or 'row_first', got {order!r}")
  quarter = embed_dim // 4
  omega = 1.0 / 10000.0**(np.arange(quarter, dtype=np.float64) / quarter)
  rows, cols = np.meshgrid(np.arange(grid_h, dtype=np.float64), np.arange(grid_w, dtype=np.float64),
                           indexing="ij")
  first, second = (cols, rows) if order == "column_first" else (rows, cols)
  a = first.reshape(-1, 1) * omega
  b = second.reshape(-1, 1) * omega
  return np.concatenate([np.sin(a), np.cos(a), np.sin(b), np.cos(b)], axis=1).astype(np.float32)


def _cubic_weight(distance: np.ndarray, a: float = -0.75) -> np.ndarray:
  """Keys' cubic convolution kernel with PyTorch's a = -0.75 (aten UpSample.h, cubic_convolution1/2)."""
  x = np.abs(distance)
  near = ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0
  far = ((a * x - 5.0 * a) * x + 8.0 * a) * x - 4.0 * a
  return np.where(x <= 1.0, near, np.where(x < 2.0, far, 0.0))


def bicubic_matrix(size_in: int, size_out: int) -> np.ndarray:
  """[size_out, size_in] float64: 1-D bicubic resampling as PyTorch's interpolate(mode="bicubic",
  align_corners=False) with an output size does it. The source coordinate of output pixel j is
  (j + 0.5) * size_in / size_out - 0.5 (not clamped at 0 for cubic), its 4 neighbours floor(src) - 1 ..
  floor(src) + 2 are clamped to the border, and their weights are the a = -0.75 cubic kernel of the
  distance. At size_in == size_out it is the identity exactly."""
  src = (np.arange(size_out, dtype=np.float64) + 0.5) * (size_in / size_out) - 0.5
  base = np.floor(src)
  frac = src - base
  matrix = np.zeros((size_out, size_in))
  for k in (-1, 0, 1, 2):
    index = np.clip(base + k, 0, size_in - 1).astype(np.int64)
    np.add.at(matrix, (np.arange(size_out), index), _cubic_weight(frac - k))
  return matrix


def interpolate_pos_embed(pos, new_grid_h: int, new_grid_w: int):
  """pos: [1, 1 + N, D] with a square grid of N patches -> [1, 1 + new_grid_h * new_grid_w, D].

  The patch part is resized bicubically (PyTorch's convention: bicubic_matrix, separable), the class-token
  slot is kept. DINO vision_transformer.py l.174-194 (interpolate_pos_encoding) does the same, except that
  it passes scale_factor=(new + 0.1) / old to dodge floating error (dino issue #8), which makes PyTorch
  sample at (j + 0.5) * old / (new + 0.1) - 0.5 instead: positions shifted by up to ~0.1 * old / new
  source pixels (0.21 for DINO's 14 -> 6 grid).
  We use the exact ratio old / new. At the original grid the table is returned unchanged.
  """
  num_patches = pos.shape[1] - 1
  grid = math.isqrt(num_patches)
  if grid * grid != num_patches:
    raise ValueError(f"the position embedding's {num_patches} patches are not a square grid")
  if (new_grid_h, new_grid_w) == (grid, grid):
    return pos
  rows = jnp.asarray(bicubic_matrix(grid, new_grid_h), jnp.float32)
  cols = jnp.asarray(bicubic_matrix(grid, new_grid_w), jnp.float32)
  patches = jnp.asarray(pos[0, 1:], jnp.float32).reshape(grid, grid, -1)
  # HIGHEST: the default matmul precision on TPU rounds the operands to bfloat16.
  resized = jnp.einsum("hi,ijd,wj->hwd", rows, patches, cols, precision=jax.lax.Precision.HIGHEST)
  resized = resized.reshape(1, new_grid_h * new_grid_w, -1).astype(pos.dtype)
  return jnp.concatenate([jnp.asarray(pos[:, :1]), resized], axis=1)


def _uniform(bound: float) -> Callable:
  """Initializer: uniform on [-bound, bound]."""
  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -bound, bound)
  return init


@dataclasses.dataclass(frozen=True)
class _Initializers:
  dense: Callable        # every Dense kernel but qkv's (biases are zero everywhere)
  qkv: Callable
  cls_token: Callable
  patch_kernel: Callable
  patch_bias: Callable


def _initializers(init: str, embed_dim: int, patch_size: int) -> _Initializers:
  """Each repository's initialization (RECIPES.md section 11). LayerNorms are 1 / 0 in all three (flax's
  default); a learned pos_embed is trunc_normal(.02) in all (DINO l.161, timm)."""
  fan_in = 3 * patch_size * patch_size
  # PyTorch's default Conv2d init: kaiming_uniform(a=sqrt(5)) on the weight and uniform(+-1/sqrt(fan_in)) on
  # the bias, both bound 1/sqrt(fan_in). DINO's _init_weights (l.165-172) touches only Linear and LayerNorm,
  # and MAE's (models_mae.py l.74-76) replaces only the weight, so the patch projection keeps this.
  torch_conv_default = _uniform(1.0 / math.sqrt(fan_in))
  # Xavier-uniform of the weight seen as a [D, 3 p p] matrix (MoCo v3 vits.py l.43-47; MAE models_mae.py
  # l.74-76); flax's xavier_uniform on the [p, p, 3, D] kernel would count the receptive field in both fans.
  patch_xavier = _uniform(math.sqrt(6.0 / (fan_in + embed_dim)))
  if init == "dino":
    # DINO l.161-172: trunc_normal_(std=.02) with timm's default cut-offs a=-2, b=2, which are absolute
    # (initializers.trunc_normal; MAE models_mae.py l.78 notes it is a plain normal in practice).
    trunc = initializers.trunc_normal(0.02)
    return _Initializers(dense=trunc, qkv=trunc, cls_token=trunc, patch_kernel=torch_conv_default,
                         patch_bias=torch_conv_default)
  if init == "moco_v3":
    # vits.py l.32-41: xavier_uniform Linears, except qkv: uniform with bound sqrt(6 / (3D/3 + D)), i.e. Q, K
    # and V each treated as a D x D matrix; zero biases; cls_token normal(1e-6); patch bias zero.
    return _Initializers(dense=nn.initializers.xavier_uniform(),
                         qkv=_uniform(math.sqrt(6.0 / (embed_dim + embed_dim))),
                         cls_token=nn.initializers.normal(1e-6), patch_kernel=patch_xavier,
                         patch_bias=nn.initializers.zeros)
  if init == "mae":
    # models_mae.py l.74-93: xavier_uniform Linears with qkv fused (fans D and 3D), zero biases, cls_token
    # normal(.02).
    return _Initializers(dense=nn.initializers.xavier_uniform(), qkv=nn.initializers.xavier_uniform(),
                         cls_token=nn.initializers.normal(0.02), patch_kernel=patch_xavier,
                         patch_bias=torch_conv_default)
  raise ValueError(f"init must be one of {INITS}, got {init!r}")


class Attention(nn.Module):
  """Multi-head self-attention; the qkv features are laid out [3, heads, head_dim] (timm's reshape)."""

  num_heads: int
  dropout_rate: float
  dtype: Any
  kernel_init: Callable
  qkv_init: Callable

  @nn.compact
  def __call__(self, x, train: bool):
    n, tokens, dim = x.shape
    head_dim = dim // self.num_heads
    qkv = nn.Dense(3 * dim, kernel_init=self.qkv_init, dtype=self.dtype, name="qkv")(x)
    # jnp.split, not unpacking or indexing: its gradient is one concatenate, where three slices would
    # each pad their gradient to the full qkv size and add them (measured: 0.3-0.4 s of a 5.9 s CPU step).
    q, k, v = (jnp.squeeze(t, 2) for t in jnp.split(qkv.reshape(n, tokens, 3, self.num_heads, head_dim), 3, 2))
    logits = jnp.einsum("nqhc,nkhc->nhqk", q, k) * head_dim**-0.5
    attn = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)   # [n, heads, tokens, tokens]
    self.sow("intermediates", "attention", attn)
    attn = nn.Dropout(self.dropout_rate)(attn, deterministic=not train)
    y = jnp.einsum("nhqk,nkhc->nqhc", attn.astype(self.dtype), v).reshape(n, tokens, dim)
    y = nn.Dense(dim, kernel_init=self.kernel_init, dtype=self.dtype, name="proj")(y)
    return nn.Dropout(self.dropout_rate)(y, deterministic=not train)


class Mlp(nn.Module):
  hidden_dim: int
  dropout_rate: float
  dtype: Any
  kernel_init: Callable

  @nn.compact
  def __call__(self, x, train: bool):
    y = nn.Dense(self.hidden_dim, kernel_init=self.kernel_init, dtype=self.dtype, name="fc1")(x)
    y = layers.gelu(y)  # PyTorch's nn.GELU default, the exact erf form
    y = nn.Dropout(self.dropout_rate)(y, deterministic=not train)
    y = nn.Dense(x.shape[-1], kernel_init=self.kernel_init, dtype=self.dtype, name="fc2")(y)
    return nn.Dropout(self.dropout_rate)(y, deterministic=not train)


class Block(nn.Module):
  """Pre-norm transformer block: x + drop_path(attn(norm1(x))), then x + drop_path(mlp(norm2(x)))."""

  num_heads: int
  mlp_ratio: float
  drop_path: float
  dropout_rate: float
  dtype: Any
  kernel_init: Callable
  qkv_init: Callable

  @nn.compact
  def __call__(self, x, train: bool):
    norm = functools.partial(nn.LayerNorm, epsilon=LAYER_NORM_EPS, dtype=self.dtype)
    y = Attention(self.num_heads, self.dropout_rate, self.dtype, self.kernel_init, self.qkv_init,
                  name="attn")(norm(name="norm1")(x), train)
    x = x + self._drop_path(y, train)
    y = Mlp(int(x.shape[-1] * self.mlp_ratio), self.dropout_rate, self.dtype, self.kernel_init,
            name="mlp")(norm(name="norm2")(x), train)
    return x + self._drop_path(y, train)

  def _drop_path(self, y, train: bool):
    """Stochastic depth (Huang et al. 2016) per example: the residual branch is dropped with probability
    drop_path and kept ones are scaled by 1 / (1 - drop_path) (DINO vision_transformer.py l.27-35)."""
    if not train or self.drop_path == 0.0:
      return y
    keep = 1.0 - self.drop_path
    kept = jax.random.bernoulli(self.make_rng("dropout"), keep, (y.shape[0],) + (1,) * (y.ndim - 1))
    return jnp.where(kept, y / keep, 0.0).astype(y.dtype)


class VisionTransformer(nn.Module):
  """ViT trunk returning one representation per image.

  Attributes:
    patch_size, embed_dim, depth, num_heads, mlp_ratio: the architecture (ARCHS).
    image_size: the input size the position embedding is made for; other sizes (multiples of patch_size,
      not necessarily square) get it resized bicubically (interpolate_pos_embed).
    pos_embed: "learned" (DINO; a parameter) or "sincos" (MoCo v3, MAE; a constant, never a parameter).
    init_scheme: "dino", "moco_v3" or "mae": that repository's initialization, and for "sincos" its ordering
      (the config key is model.init; the field cannot be called `init`, which would hide Module.init).
    representation: "cls", the class token after the final LayerNorm (the DINO and MoCo v3 head input);
      "mean", the mean of the patch tokens after the final LayerNorm (DINO eval_linear.py l.169's average
      pool); "cls_last4", the class tokens of the last 4 blocks, each through the final LayerNorm,
      concatenated (DINO eval_linear.py l.166-167 with n_last_blocks=4, its ViT-S linear probe); "gap",
      the mean of the patch tokens of the last block without the final LayerNorm (MAE fine-tuning's
      global_pool, models_vit.py l.33-49, whose fresh fc_norm is the protocol's head_norm="layernorm").
    drop_path_rate: stochastic depth of the last block; block i gets linspace(0, rate, depth)[i] (DINO l.150).
    dropout_rate: dropout after the position embedding, the attention softmax, the attention projection and
      in the MLP (DINO's drop_rate and attn_drop_rate, both this rate).
    dtype: compute dtype; parameters stay float32 and the output is float32.

  Random bits of drop path and dropout come from the "dropout" rng (`rngs={"dropout": key}`), needed only
  when train=True and a rate is > 0. Each block's attention softmax [n, heads, tokens, tokens] is sown into
  the "intermediates" collection under block_i/attn/attention (`mutable=["intermediates"]` returns them).
  """

  patch_size: int
  embed_dim: int
  depth: int
  num_heads: int
  mlp_ratio: float = 4.0
  image_size: int = 224
  pos_embed: str = "learned"
  init_scheme: str = "dino"
  representation: str = "cls"
  drop_path_rate: float = 0.0
  dropout_rate: float = 0.0
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool = True, ids_keep=None):
    """x: [n, h, w, 3] with h and w multiples of patch_size -> [n, features] float32 (features = embed_dim,
    or 4 * embed_dim for "cls_last4").

    ids_keep: [n, k] int, MAE's visible patches (indices into the row-major patch grid): only those patches
    (after their position embedding is added, models_mae.py l.150-168) and the class token go through the
    blocks, and the call returns every token after the final LayerNorm, [n, 1 + k, embed_dim] float32."""
    n, h, w, _ = x.shape
    p, dim = self.patch_size, self.embed_dim
    if h % p or w % p:
      raise ValueError(f"input {h}x{w} is not a multiple of the patch size {p}")
    inits = _initializers(self.init_scheme, dim, p)
    x = nn.Conv(dim, (p, p), strides=(p, p), padding="VALID", kernel_init=inits.patch_kernel,
                bias_init=inits.patch_bias, dtype=self.dtype, name="patch_embed")(x.astype(self.dtype))
    x = x.reshape(n, (h // p) * (w // p), dim)                   # row-major, as PyTorch's flatten(2)
    cls_token = self.param("cls_token", inits.cls_token, (1, 1, dim))
    table = self._position_table(h // p, w // p).astype(self.dtype)
    x = x + table[:, 1:]
    if ids_keep is not None:
      x = jnp.take_along_axis(x, ids_keep[:, :, None], axis=1)
    cls_token = cls_token.astype(self.dtype) + table[:, :1]
    x = jnp.concatenate([jnp.broadcast_to(cls_token, (n, 1, dim)), x], axis=1)
    x = nn.Dropout(self.dropout_rate)(x, deterministic=not train)

    drop_path_rates = np.linspace(0.0, self.drop_path_rate, self.depth)
    outputs = []
    for i in range(self.depth):
      x = Block(self.num_heads, self.mlp_ratio, float(drop_path_rates[i]), self.dropout_rate, self.dtype,
                inits.dense, inits.qkv, name=f"block_{i}")(x, train)
      outputs.append(x)
    norm = nn.LayerNorm(epsilon=LAYER_NORM_EPS, dtype=self.dtype, name="norm")
    if ids_keep is not None:
      return norm(x).astype(jnp.float32)
    if self.representation == "cls":
      features = norm(x)[:, 0]
    elif self.representation == "mean":
      features = jnp.mean(norm(x)[:, 1:].astype(jnp.float32), axis=1)
    elif self.representation == "cls_last4":
      features = jnp.concatenate([norm(y)[:, 0] for y in outputs[-4:]], axis=-1)
    elif self.representation == "gap":
      features = jnp.mean(x[:, 1:].astype(jnp.float32), axis=1)
    else:
      raise ValueError(f"representation must be one of {REPRESENTATIONS}, got {self.representation!r}")
    return features.astype(jnp.float32)

  def head_input(self, features):
    """What a method's heads read of this model's representation: the last block's class token (DINO and
    MoCo v3 train their heads on it). "cls_last4" ends with it; "mean" does not contain it, and methods
    with heads refuse it for pre-training (ssl_jax.methods.check_config)."""
    if self.representation == "cls_last4":
      return features[..., -self.embed_dim:]
    return features

  def _position_table(self, grid_h: int, grid_w: int):
    """[1, 1 + grid_h * grid_w, D] float32, class-token slot first."""
    grid = self.image_size // self.patch_size
    shape = (1, 1 + grid * grid, self.embed_dim)
    if self.pos_embed == "learned":
      table = self.param("pos_embed", initializers.trunc_normal(0.02), shape)
    elif self.pos_embed == "sincos":
      # A constant folded into the program (MoCo v3 and MAE freeze it: requires_grad=False); the class-token
      # slot is zero (MoCo v3 vits.py l.66-68, MAE util/pos_embed.py l.33-34).
      table = np.concatenate([np.zeros((1, self.embed_dim), np.float32),
                              sincos_2d(self.embed_dim, grid, grid, SINCOS_ORDER[self.init_scheme])])[None]
    else:
      raise ValueError(f"pos_embed must be one of {POS_EMBEDS}, got {self.pos_embed!r}")
    # Other grids: the table resized, for "sincos" too (timm's behaviour; DINO only has "learned").
    return interpolate_pos_embed(table, grid_h, grid_w)


class MAEDecoder(nn.Module):
  """MAE's decoder (models_mae.py l.46-63, 170-196): the encoder's tokens embedded to `embed_dim`, a shared
  mask token appended for every masked patch, the sequence unshuffled to grid order, a fixed sin-cos
  position embedding (class slot zero) added, `depth` pre-norm blocks, a final LayerNorm and a linear
  prediction of each patch's p * p * 3 pixels. MAE's initialization: xavier-uniform Linears (qkv fused),
  zero biases, mask token normal(0.02).

  Call: (latent [n, 1 + k, encoder_dim], ids_restore [n, L]) -> [n, L, p * p * 3] float32, the class token's
  prediction dropped. ids_restore[i, j] is the position in (visible patches, then masked ones) of grid
  patch j."""

  patch_size: int
  grid_size: int          # patches per side of the encoder's image_size
  embed_dim: int = 512
  depth: int = 8
  num_heads: int = 16
  mlp_ratio: float = 4.0
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, latent, ids_restore, train: bool = True):
    dense_init = nn.initializers.xavier_uniform()
    x = nn.Dense(self.embed_dim, kernel_init=dense_init, dtype=self.dtype, name="decoder_embed")(
        latent.astype(self.dtype))
    n, num_patches = ids_restore.shape
    mask_token = self.param("mask_token", nn.initializers.normal(0.02), (1, 1, self.embed_dim))
    masked = jnp.broadcast_to(mask_token.astype(self.dtype), (n, num_patches + 1 - x.shape[1], self.embed_dim))
    patches = jnp.concatenate([x[:, 1:], masked], axis=1)
    patches = jnp.take_along_axis(patches, ids_restore[:, :, None], axis=1)   # grid order
    x = jnp.concatenate([x[:, :1], patches], axis=1)
    table = np.concatenate([np.zeros((1, self.embed_dim), np.float32),
                            sincos_2d(self.embed_dim, self.grid_size, self.grid_size, SINCOS_ORDER["mae"])])
    x = x + jnp.asarray(table, self.dtype)[None]
    for i in range(self.depth):
      x = Block(self.num_heads, self.mlp_ratio, 0.0, 0.0, self.dtype, dense_init, dense_init,
                name=f"decoder_block_{i}")(x, train)
    x = nn.LayerNorm(epsilon=LAYER_NORM_EPS, dtype=self.dtype, name="decoder_norm")(x)
    x = nn.Dense(self.patch_size * self.patch_size * 3, kernel_init=dense_init, dtype=self.dtype,
                 name="decoder_pred")(x)
    return x[:, 1:].astype(jnp.float32)


def layer_decay_groups(depth: int, decay: float, prefix: str = "encoder") -> tuple:
  """Optimizer groups (optim.build's (regex, settings) pairs) of layer-wise learning-rate decay (BEiT; MAE
  util/lr_decay.py, param_groups_lrd and get_layer_id_for_vit): with L = depth + 1 layers, the patch
  embedding, class token and position embedding are layer 0, block i is layer i + 1 and everything after
  the blocks (the final norm, the classifier) layer L; layer l's rate is x decay ** (L - l). Parameters
  under `prefix` only; the rest keep x 1 (layer L)."""
  num_layers = depth + 1
  groups = [(f"{prefix}/(patch_embed|cls_token|pos_embed)(/.*)?", dict(lr_mult=decay ** num_layers))]
  groups += [(f"{prefix}/block_{i}/.*", dict(lr_mult=decay ** (num_layers - i - 1))) for i in range(depth)]
  return tuple(groups)


def _dims(m):
  """(embed_dim, depth, num_heads) of the `model.*` settings: the arch's where a setting is 0."""
  arch = ARCHS[m.arch]
  return m.embed_dim or arch[0], m.depth or arch[1], m.num_heads or arch[2]


def default_config() -> dict:
  """The `model.*` settings of model.name="vit" (DINO's ViT-S/16)."""
  return dict(name="vit", arch="vit_small", patch_size=16, image_size=224,
              embed_dim=0, depth=0, num_heads=0,  # 0: the arch's
              mlp_ratio=4.0, pos_embed="learned", init="dino", representation="cls", drop_path_rate=0.0,
              dropout_rate=0.0, dtype="float32",
              bn_momentum=0.9)  # not read by the ViT (no batch norm): the methods' MLP heads read it


def build(m, dtype, bn_axis_name: Optional[str]) -> VisionTransformer:
  """The ViT of the `model.*` settings `m` (bn_axis_name unused: a ViT has no batch norm)."""
  del bn_axis_name
  embed_dim, depth, num_heads = _dims(m)
  return VisionTransformer(patch_size=m.patch_size, embed_dim=embed_dim, depth=depth, num_heads=num_heads,
                           mlp_ratio=m.mlp_ratio, image_size=m.image_size, pos_embed=m.pos_embed,
                           init_scheme=m.init, representation=m.representation, drop_path_rate=m.drop_path_rate,
                           dropout_rate=m.dropout_rate, dtype=dtype)


def apply_tiny(m) -> None:
  """Width 64, 4 blocks of 4 heads, MLP ratio 2, patch and image size kept: 0.14M parameters at patch 4 /
  image 32 (the CIFAR variant), 0.20M at patch 16 / image 224. CPU runs and tests."""
  m.embed_dim = 64
  m.depth = 4
  m.num_heads = 4
  m.mlp_ratio = 2.0


def check(m, platform: str = "", steps_per_loop: int = 1) -> None:
  del platform, steps_per_loop  # nothing platform-specific
  if m.arch not in ARCHS:
    raise ConfigError(f"model.arch must be one of {', '.join(ARCHS)}, got {m.arch!r}")
  for key, allowed in (("pos_embed", POS_EMBEDS), ("init", INITS), ("representation", REPRESENTATIONS)):
    if m[key] not in allowed:
      raise ConfigError(f"model.{key} must be one of {', '.join(allowed)}, got {m[key]!r}")
  if min(m.embed_dim, m.depth, m.num_heads) < 0 or m.patch_size <= 0 or m.image_size <= 0 or m.mlp_ratio <= 0:
    raise ConfigError(f"model.embed_dim, depth, num_heads must be >= 0 (0: the arch's) and model.patch_size, "
                      f"image_size, mlp_ratio > 0, got {m.embed_dim}, {m.depth}, {m.num_heads}, {m.patch_size}, "
                      f"{m.image_size}, {m.mlp_ratio}")
  embed_dim, depth, num_heads = _dims(m)
  if embed_dim % num_heads:
    raise ConfigError(f"model.embed_dim {embed_dim} is not divisible by model.num_heads {num_heads}")
  if m.pos_embed == "sincos" and embed_dim % 4:
    raise ConfigError(f"model.pos_embed='sincos' needs model.embed_dim divisible by 4, got {embed_dim}")
  if m.image_size % m.patch_size:
    raise ConfigError(f"model.image_size {m.image_size} is not a multiple of model.patch_size {m.patch_size}")
  for key in ("drop_path_rate", "dropout_rate"):
    if not 0.0 <= m[key] < 1.0:
      raise ConfigError(f"model.{key} must be in [0, 1), got {m[key]}")
  if m.representation == "cls_last4" and depth < 4:
    raise ConfigError(f"model.representation='cls_last4' needs model.depth >= 4, got {depth}")
