"""MAE (He et al. 2022, "Masked Autoencoders Are Scalable Vision Learners").

Each image is cut into patches; a random 75% of them per image is hidden (losses.random_masking, from this
step's key), the ViT encoder (the registry's model, under params["encoder"]) sees the visible 25% with the
class token, and a light decoder (models.vit.MAEDecoder, params["decoder"]) reconstructs every patch from
the encoder's tokens and a shared mask token. The loss is the mean squared error of the masked patches'
pixels, each target patch normalized by its own mean and variance (losses.mae_loss).

There is no projection head, no batch norm and no target network: `method_state` is empty. The online probe
and every evaluation protocol read the encoder on the whole, unmasked image (its class token after the
final norm, model.representation), as MAE's linear probe does (main_linprobe.py, --cls_token); the probe's
unmasked forward runs only when config.online_probe is on.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections

from ssl_jax import losses, parallel
from ssl_jax.errors import ConfigError
from ssl_jax.methods import base
from ssl_jax.models import vit


def default_config() -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(dict(
      name="mae",
      mask_ratio=0.75,
      # The published runs' --norm_pix_loss (PRETRAIN.md); main_pretrain.py's default is off.
      norm_pix_loss=True,
      # models_mae.py l.223-250: every released model's decoder is 512 wide, 8 blocks, 16 heads.
      decoder_embed_dim=512,
      decoder_depth=8,
      decoder_num_heads=16,
      decoder_mlp_ratio=4.0,
  ))


class MAE(base.Method):

  default_config = staticmethod(default_config)
  has_heads = False

  @classmethod
  def check_config(cls, cfg):
    m = cfg.method
    if cfg.model.name != "vit":
      raise ConfigError(f"mae masks the patches of a ViT: set model.name='vit', got {cfg.model.name!r}")
    base.check_num_views(cfg, 1)
    crop = base.view_crop_sizes(cfg)[0]
    if crop != cfg.model.image_size:
      raise ConfigError(f"mae's decoder has a fixed position embedding for model.image_size="
                        f"{cfg.model.image_size}; the view's crop_size is {crop}: make them equal")
    num_patches = (cfg.model.image_size // cfg.model.patch_size) ** 2
    if not 0.0 < m.mask_ratio < 1.0 or int(num_patches * (1 - m.mask_ratio)) < 1:
      raise ConfigError(f"method.mask_ratio must leave at least one of the {num_patches} patches visible and "
                        f"mask at least one, got {m.mask_ratio}")
    if min(m.decoder_embed_dim, m.decoder_depth, m.decoder_num_heads) <= 0 or m.decoder_mlp_ratio <= 0:
      raise ConfigError("method.decoder_embed_dim, decoder_depth, decoder_num_heads and decoder_mlp_ratio must "
                        "be > 0")
    if m.decoder_embed_dim % m.decoder_num_heads or m.decoder_embed_dim % 4:
      raise ConfigError(f"method.decoder_embed_dim {m.decoder_embed_dim} must be divisible by "
                        f"decoder_num_heads {m.decoder_num_heads} and by 4 (its sin-cos embedding)")

  @classmethod
  def apply_tiny(cls, cfg):
    cfg.method.update(decoder_embed_dim=64, decoder_depth=2, decoder_num_heads=4, decoder_mlp_ratio=2.0)

  def __init__(self, config, data=None):
    super().__init__(config, data)
    m = config.method
    self.encoder = base.build_encoder(config)
    self.patch_size = config.model.patch_size
    self.num_patches = (config.model.image_size // self.patch_size) ** 2
    self.decoder = vit.MAEDecoder(patch_size=self.patch_size, grid_size=config.model.image_size // self.patch_size,
                                  embed_dim=m.decoder_embed_dim, depth=m.decoder_depth,
                                  num_heads=m.decoder_num_heads, mlp_ratio=m.decoder_mlp_ratio,
                                  dtype=base.dtype_of(config))

  def init(self, rng, batch):
    x = batch["views"][0]
    encoder_key, decoder_key = jax.random.split(rng)
    ids_keep, _, ids_restore = losses.random_masking(jnp.zeros((x.shape[0], self.num_patches)),
                                                     self.config.method.mask_ratio)
    encoder = self.encoder.init(encoder_key, x, train=False)["params"]
    latent = jax.eval_shape(lambda: self.encoder.apply({"params": encoder}, x, train=False, ids_keep=ids_keep))
    decoder = self.decoder.init(decoder_key, jnp.zeros(latent.shape, latent.dtype), ids_restore,
                                train=False)["params"]
    return {"encoder": encoder, "decoder": decoder}, {}, {}

  def loss(self, params, batch_stats, method_state, batch, rng, step):
    m = self.config.method
    x = batch["views"][0]
    # The masks of the whole global batch from the step's key, this device's rows taken: the same masks
    # on any number of devices. Dropout and drop path (off in MAE's recipe) draw per device.
    mask_key = jax.random.fold_in(rng, 0)
    noise = parallel.this_device_rows(lambda size: jax.random.uniform(mask_key, (size, self.num_patches)),
                                      x.shape[0])
    ids_keep, mask, ids_restore = losses.random_masking(noise, m.mask_ratio)
    dropout_key = base.dropout_key(rng, 1)
    latent = self.encoder.apply({"params": params["encoder"]}, x, train=True, ids_keep=ids_keep,
                                rngs={"dropout": dropout_key})
    pred = self.decoder.apply({"params": params["decoder"]}, latent, ids_restore, train=True)
    loss = losses.mae_loss(pred, losses.patchify(x, self.patch_size), mask, m.norm_pix_loss)
    if self.config.online_probe:
      # MAE's probes read the whole image: the unmasked encoder in inference mode, no gradient.
      representation = self.represent({"params": jax.lax.stop_gradient(params["encoder"])}, x)
    else:
      representation = latent[:, 0]
    return loss, base.LossOutput(batch_stats=batch_stats, metrics={}, representation=representation,
                                 embedding=latent[:, 0])

  def reconstruct(self, params, images, key):
    """(prediction [n, L, p * p * 3] in the loss's target space, mask [n, L]) of `images` under a random
    mask drawn from `key`: for looking at reconstructions (inference mode)."""
    noise = jax.random.uniform(key, (images.shape[0], self.num_patches))
    ids_keep, mask, ids_restore = losses.random_masking(noise, self.config.method.mask_ratio)
    latent = self.encoder.apply({"params": params["encoder"]}, images, train=False, ids_keep=ids_keep)
    return self.decoder.apply({"params": params["decoder"]}, latent, ids_restore, train=False), mask

  def reconstruct_images(self, params, images, key, eps: float = 1e-6):
    """What the decoder makes of `images` [n, h, w, 3] (the network's input space) under a random mask from
    `key`, for looking at: a dict of
      "reconstruction" [n, h, w, 3]: every patch predicted, in the input space (with norm_pix_loss the
        prediction is in per-patch normalized units; each patch is brought back with the true patch's mean
        and unbiased std, as MAE's demo notebook does, so only the masked patches are a real prediction),
      "pasted" [n, h, w, 3]: the visible patches of the image with the reconstruction in the masked ones,
      "mask" [n, h, w, 1]: 1 on masked pixels,
      "loss" [n]: each image's loss (mae_loss over its masked patches)."""
    pred, mask = self.reconstruct(params, images, key)
    target = losses.patchify(images, self.patch_size)
    if self.config.method.norm_pix_loss:
      mean = jnp.mean(target, axis=-1, keepdims=True)
      std = jnp.sqrt(jnp.var(target, axis=-1, keepdims=True, ddof=1) + eps)
      pixels = pred * std + mean
    else:
      pixels = pred
    grid = (images.shape[1] // self.patch_size, images.shape[2] // self.patch_size)
    unpatch = lambda x: losses.unpatchify(x, self.patch_size, grid)
    pixel_mask = unpatch(jnp.broadcast_to(mask[..., None], target.shape[:2] + (self.patch_size ** 2,)))
    reconstruction = unpatch(pixels)
    per_image = jax.vmap(lambda p, t, m: losses.mae_loss(p[None], t[None], m[None],
                                                         self.config.method.norm_pix_loss, eps))
    return {"reconstruction": reconstruction, "pasted": images * (1 - pixel_mask) + reconstruction * pixel_mask,
            "mask": pixel_mask, "loss": per_image(pred, target, mask)}
