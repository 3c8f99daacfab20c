"""CPC v2 (Henaff et al. 2020, "Data-Efficient Image Recognition with Contrastive Predictive Coding",
arXiv:1905.09272; CPC v1: van den Oord, Li, Vinyals 2018). No official code; RECIPES.md section 2.

Each image (one view, a crop of (grid - 1) stride + patch pixels) is cut into a grid x grid grid of
overlapping patch x patch patches (7 x 7 of 64 px at stride 32 from 256 px on ImageNet), each patch is
augmented on its own (a horizontal flip and "colour dropping": two of the three channels set to zero, the
dataset mean in the normalized input space), and the encoder (a ResNet with layer norm: model.norm="layer",
since batch statistics would let patches see each other) maps each patch to one vector z, mean-pooled over
its spatial positions.

For each prediction direction (method.directions; "down": rows below from rows above), a masked
convolutional context network (appendix A.2's pseudo-code: context_blocks residual blocks of a 1x1
convolution, a 1x3 convolution, a 2x1 convolution over the row above and the row itself, a 1x1
convolution, ReLUs, then a ReLU) turns the grid of z into contexts c whose row r has seen rows <= r only.
Targets are a 1x1 convolution (linear map) of z to target_dim; the prediction of the patch k rows below,
for each k of method.offsets, is its own linear map of c times emb_scale. The loss is InfoNCE where the
candidates are the targets of every patch of every image of the global batch (gathered over the devices
with their gradient), summed over offsets and directions (losses.cpc_infonce).

The offsets: A.2's pseudo-code loops `for i in range(steps_to_ignore, steps_to_predict)` with
steps_to_ignore=2, steps_to_predict=3 and predicts the row i + 1 below, i.e. one offset of 3 rows (the
rows 1 and 2 below overlap or touch the context's patches). Some re-implementations read it as offsets 3,
4, 5 (RECIPES.md section 2); `--config.method.offsets='(3, 4, 5)'` runs that reading.

The representation every evaluation protocol reads (represent / represent_train): the encoder's patch
vectors over the grid of the whole (unaugmented) image, averaged over the grid. An input of another size
is first resized to the pre-training crop, so that the grid is the one the encoder was trained on.
"""

from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from ssl_jax import losses, parallel
from ssl_jax.errors import ConfigError
from ssl_jax.methods import base

DIRECTIONS = ("down", "up", "right", "left")


def default_config() -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(dict(
      name="cpc_v2",
      grid_size=7,          # patches per side (section 3: a 7 x 7 grid)
      patch_size=64,        # 64 x 64 patches ...
      patch_stride=32,      # ... overlapping by 32 pixels, from a 256 x 256 image
      context_dim=256,      # A.2: the context network's hidden channels
      context_blocks=5,     # A.2: residual blocks of the context network
      target_dim=64,        # A.2: target_dim
      emb_scale=0.1,        # A.2: emb_scale, the predictions' scale
      offsets=(3,),         # rows below predicted (A.2's range(steps_to_ignore=2, steps_to_predict=3) + 1)
      directions=("down",),  # "down", "up", "right", "left": each its own context network and maps
      patch_flip_prob=0.5,  # per patch horizontal flip (section 4.1, "patch-based augmentation")
      patch_color_drop_prob=1.0,  # per patch: keep one random channel of three (section 4.1)
  ))


def grid_patches(x, grid: int, size: int, stride: int):
  """[n, s, s, c] -> [n, grid, grid, size, size, c]: patch (r, c) is x[:, r stride : r stride + size,
  c stride : c stride + size]."""
  index = stride * jnp.arange(grid)[:, None] + jnp.arange(size)[None]   # [grid, size]
  rows = x[:, index]                                                     # [n, grid, size, s, c]
  return rows[:, :, :, index].transpose(0, 1, 3, 2, 4, 5)


def augment_patches(patches, flip, keep_channel, drop):
  """Per patch of [n, g, g, p, p, c] patches: mirrored left-right where `flip` [n, g, g], and where `drop`
  only channel `keep_channel` [n, g, g] kept (the others zeroed)."""
  patches = jnp.where(flip[..., None, None, None], patches[..., ::-1, :], patches)
  keep = jax.nn.one_hot(keep_channel, patches.shape[-1], dtype=patches.dtype)
  keep = jnp.where(drop[..., None], keep, 1.0)
  return patches * keep[..., None, None, :]


def in_direction(z, direction: str):
  """The grid [n, g, g, d] seen so that `direction` points down the rows: the context of row r may see
  rows <= r of the result, and predicts the rows below it."""
  if direction in ("right", "left"):
    z = z.transpose(0, 2, 1, 3)
  return z[:, ::-1] if direction in ("up", "left") else z


class ContextNetwork(nn.Module):
  """A.2's masked convolutional (PixelCNN-style) context network over a grid [n, g, g, d] -> [n, g, g, d];
  row r of the output depends on rows <= r of the input only (tested)."""

  hidden: int
  blocks: int
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, z):
    conv = lambda features, kernel, padding, name: nn.Conv(features, kernel, padding=padding, dtype=self.dtype,
                                                             name=name)
    c = z
    for i in range(self.blocks):
      h = nn.relu(conv(self.hidden, (1, 1), "VALID", f"block{i}_in")(c))
      h = conv(self.hidden, (1, 3), ((0, 0), (1, 1)), f"block{i}_row")(h)
      # One row of zeros on top: the 2x1 convolution at row r reads rows r - 1 and r.
      h = jnp.pad(h, ((0, 0), (1, 0), (0, 0), (0, 0)))
      h = nn.relu(conv(self.hidden, (2, 1), "VALID", f"block{i}_up")(h))
      c = c + conv(z.shape[-1], (1, 1), "VALID", f"block{i}_out")(h)
    return nn.relu(c).astype(jnp.float32)


class Predictor(nn.Module):
  """One direction's context network, target map and per-offset prediction maps: grid z [n, g, g, d] (in
  this direction's frame) -> (targets [n, g, g, t], [predictions [n, g - k, g, t] for k in offsets])."""

  hidden: int
  blocks: int
  target_dim: int
  offsets: Sequence[int]
  emb_scale: float
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, z):
    g = z.shape[1]
    context = ContextNetwork(self.hidden, self.blocks, self.dtype, name="context")(z)
    targets = nn.Dense(self.target_dim, dtype=self.dtype, name="target")(z).astype(jnp.float32)
    preds = [nn.Dense(self.target_dim, dtype=self.dtype, name=f"predict_{k}")(context[:, :g - k])
             .astype(jnp.float32) * self.emb_scale for k in self.offsets]
    return targets, preds


class Predictors(Predictor):
  """A Predictor (the fields above) per direction, each reading the grid in its own frame (in_direction):
  {direction: (targets, predictions)}."""

  directions: Sequence[str] = ("down",)

  @nn.compact
  def __call__(self, z):
    return {d: Predictor(self.hidden, self.blocks, self.target_dim, self.offsets, self.emb_scale, self.dtype,
                         name=d)(in_direction(z, d)) for d in self.directions}


class CPCv2(base.Method):

  default_config = staticmethod(default_config)
  has_heads = False

  @classmethod
  def check_config(cls, cfg):
    m = cfg.method
    if cfg.model.name != "resnet" or cfg.model.norm != "layer":
      raise ConfigError("cpc_v2 encodes patches with a layer-norm ResNet (batch statistics leak across patches): "
                        f"set model.name=resnet and model.norm=layer, got {cfg.model.name!r}, "
                        f"{cfg.model.get('norm')!r}")
    base.check_num_views(cfg, 1)
    for key in ("grid_size", "patch_size", "patch_stride", "context_dim", "context_blocks", "target_dim"):
      if int(m[key]) != m[key] or m[key] < 1:
        raise ConfigError(f"method.{key} must be an int >= 1, got {m[key]!r}")
    base.check_positive(cfg, "emb_scale")
    base.check_fraction(cfg, "patch_flip_prob", "patch_color_drop_prob")
    crop = base.view_crop_sizes(cfg)[0]
    need = (m.grid_size - 1) * m.patch_stride + m.patch_size
    if crop != need:
      raise ConfigError(f"a {m.grid_size} x {m.grid_size} grid of {m.patch_size}-pixel patches at stride "
                        f"{m.patch_stride} covers {need} pixels; the view's crop_size is {crop}: make them equal")
    offsets = tuple(m.offsets)
    if not offsets or len(set(offsets)) != len(offsets) or not all(1 <= k < m.grid_size for k in offsets):
      raise ConfigError(f"method.offsets must be distinct rows below in [1, {m.grid_size - 1}], got {offsets}")
    directions = tuple(m.directions)
    if not directions or len(set(directions)) != len(directions) or not set(directions) <= set(DIRECTIONS):
      raise ConfigError(f"method.directions must be distinct names of {DIRECTIONS}, got {directions}")

  @classmethod
  def apply_tiny(cls, cfg):
    cfg.method.update(context_dim=32, context_blocks=2, target_dim=32)

  def __init__(self, config, data=None):
    super().__init__(config, data)
    m = config.method
    self.grid, self.patch, self.stride = m.grid_size, m.patch_size, m.patch_stride
    self.crop = (self.grid - 1) * self.stride + self.patch
    self.encoder = base.build_encoder(config)
    self.predictors = Predictors(hidden=m.context_dim, blocks=m.context_blocks, target_dim=m.target_dim,
                                 offsets=tuple(m.offsets), emb_scale=m.emb_scale, dtype=base.dtype_of(config),
                                 directions=tuple(m.directions))

  def patches(self, x):
    """[n, s, s, 3] -> [n, g, g, p, p, 3]; an input of another size is resized to the pre-training crop."""
    if x.shape[1:3] != (self.crop, self.crop):
      x = jax.image.resize(x, (x.shape[0], self.crop, self.crop, x.shape[3]), "bilinear")
    return grid_patches(x, self.grid, self.patch, self.stride)

  def _flat(self, patches):
    return patches.reshape((-1,) + patches.shape[3:])

  def init(self, rng, batch):
    encoder_key, predictor_key = jax.random.split(rng)
    patches = self._flat(self.patches(batch["views"][0][:1]))
    encoder = self.encoder.init(encoder_key, patches, train=False)["params"]
    z = jax.eval_shape(lambda: self.encoder.apply({"params": encoder}, patches, train=False))
    grid = jnp.zeros((1, self.grid, self.grid, z.shape[-1]), z.dtype)
    return {"encoder": encoder, "predictors": self.predictors.init(predictor_key, grid)["params"]}, {}, {}

  def augment(self, patches, rng):
    """Each patch's flip and colour dropping, drawn for the whole global batch from the step's key (this
    device's rows taken: 8 devices draw what 1 draws)."""
    m, g = self.config.method, self.grid
    u = parallel.this_device_rows(lambda size: jax.random.uniform(rng, (size, g, g, 3)), patches.shape[0])
    keep = jnp.minimum(jnp.floor(u[..., 2] * 3), 2).astype(jnp.int32)
    return augment_patches(patches, u[..., 0] < m.patch_flip_prob, keep, u[..., 1] < m.patch_color_drop_prob)

  def loss(self, params, batch_stats, method_state, batch, rng, step):
    x = batch["views"][0]
    n, g = x.shape[0], self.grid
    patches = self.augment(self.patches(x), jax.random.fold_in(rng, 0))
    z = self.encoder.apply({"params": params["encoder"]}, self._flat(patches), train=True)
    z = z.reshape(n, g, g, -1)
    outputs = self.predictors.apply({"params": params["predictors"]}, z)
    first = parallel.device_index() * n
    total, metrics = 0.0, {}
    for direction, (targets, preds) in outputs.items():
      targets_all = parallel.all_gather(targets.reshape(n * g * g, -1))
      for k, pred in zip(self.config.method.offsets, preds):
        loss, accuracy = losses.cpc_infonce(pred, targets_all, k, first, g)
        total = total + loss
        metrics[f"cpc_accuracy_{direction}_{k}"] = accuracy
    first_targets = next(iter(outputs.values()))[0]
    return total, base.LossOutput(batch_stats=batch_stats, metrics=metrics, representation=jnp.mean(z, axis=(1, 2)),
                                  embedding=jnp.mean(first_targets, axis=(1, 2)))

  def represent(self, variables, x, representation=None):
    patches = self._flat(self.patches(x))
    h = self.evaluation_encoder(representation).apply(variables, patches, train=False)
    return jnp.mean(h.reshape(x.shape[0], self.grid * self.grid, -1), axis=1)

  def represent_train(self, variables, x, rng, representation=None, drop_path_rate=None):
    patches = self._flat(self.patches(x))
    h, batch_stats = base.apply_train(self.evaluation_encoder(representation, drop_path_rate), variables["params"],
                                      variables.get("batch_stats", {}), patches, rng)
    return jnp.mean(h.reshape(x.shape[0], self.grid * self.grid, -1), axis=1), batch_stats
