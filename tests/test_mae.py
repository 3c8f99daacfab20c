"""MAE: patchify, masking and the loss against direct computations (values and gradients), the masked encoder
and the decoder's unshuffling, the config checks, and a sharded step equal to the single-device step."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import REPO, set_keys
from ssl_jax import config as config_lib
from ssl_jax import losses, parallel
from ssl_jax.errors import ConfigError
from ssl_jax.models import vit
from test_vit_methods import assert_trees_close, random_batch, run_steps


def test_patchify_is_row_major_patches_of_row_column_channel():
  rng = np.random.default_rng(0)
  images = rng.normal(size=(2, 8, 12, 3)).astype(np.float32)
  p = 4
  out = np.asarray(losses.patchify(jnp.asarray(images), p))
  assert out.shape == (2, 6, 48)
  for n in range(2):
    for gi in range(2):
      for gj in range(3):
        # Patch (gi, gj) is grid entry gi * 3 + gj; inside it, element (r, c, ch) sits at (r * p + c) * 3 + ch.
        for r in range(p):
          for c in range(p):
            for ch in range(3):
              assert out[n, gi * 3 + gj, (r * p + c) * 3 + ch] == images[n, gi * p + r, gj * p + c, ch]
  np.testing.assert_array_equal(losses.unpatchify(out, p, (2, 3)), images)


@pytest.mark.parametrize("norm_pix", [True, False])
def test_reconstructed_images_paste_the_prediction_into_the_masked_patches(norm_pix, monkeypatch):
  """reconstruct_images (the notebook's): a prediction equal to the (normalized) target gives back the
  image; visible pixels are the image's; the per-image losses are mae_loss of each image."""
  from ssl_jax import methods
  cfg = mae_config()
  cfg.method.norm_pix_loss = norm_pix
  method = methods.get(cfg)
  x = jnp.asarray(random_batch(cfg, 0)["views"][0][:3])
  params, _, _ = method.init(jax.random.PRNGKey(0), {"views": [x]})
  out = method.reconstruct_images(params, x, jax.random.PRNGKey(1))
  pred, mask = method.reconstruct(params, x, jax.random.PRNGKey(1))
  mask_px = np.asarray(out["mask"])[..., 0]
  assert mask_px.shape == x.shape[:3] and mask_px.mean() == 0.75
  np.testing.assert_array_equal(mask_px[:, :4, :4], np.asarray(mask)[:, :1, None].repeat(4, 1).repeat(4, 2))
  visible = mask_px == 0
  np.testing.assert_array_equal(np.asarray(out["pasted"])[visible], np.asarray(x)[visible])
  for i in range(3):
    np.testing.assert_allclose(out["loss"][i], losses.mae_loss(pred[i:i + 1], losses.patchify(x[i:i + 1], 4),
                                                               mask[i:i + 1], norm_pix), rtol=1e-5)
  target = losses.patchify(x, 4)
  if norm_pix:
    target = (target - target.mean(-1, keepdims=True)) / jnp.sqrt(target.var(-1, keepdims=True, ddof=1) + 1e-6)
  monkeypatch.setattr(method, "reconstruct", lambda *_: (target, mask))
  perfect = method.reconstruct_images(params, x, jax.random.PRNGKey(1))
  np.testing.assert_allclose(perfect["reconstruction"], x, atol=1e-5)
  np.testing.assert_allclose(perfect["loss"], 0.0, atol=1e-10)


def test_random_masking_keeps_the_lowest_noise_patches():
  rng = np.random.default_rng(1)
  noise = rng.uniform(size=(3, 16)).astype(np.float32)
  ids_keep, mask, ids_restore = map(np.asarray, losses.random_masking(jnp.asarray(noise), 0.75))
  assert ids_keep.shape == (3, 4) and mask.shape == (3, 16)
  for n in range(3):
    order = np.argsort(noise[n])
    np.testing.assert_array_equal(ids_keep[n], order[:4])
    expected = np.ones(16)
    expected[order[:4]] = 0.0
    np.testing.assert_array_equal(mask[n], expected)
    # ids_restore[j] is where grid patch j sits in (kept, then masked): the inverse permutation.
    np.testing.assert_array_equal(order[ids_restore[n]], np.arange(16))


def _direct_mae_loss(pred, target, mask, norm_pix):
  """float64 numpy, written from the formula: per patch, (t - mean) / sqrt(var_unbiased + 1e-6)."""
  pred, target, mask = (np.asarray(a, np.float64) for a in (pred, target, mask))
  if norm_pix:
    d = target.shape[-1]
    mean = target.sum(-1, keepdims=True) / d
    var = ((target - mean) ** 2).sum(-1, keepdims=True) / (d - 1)
    target = (target - mean) / np.sqrt(var + 1e-6)
  per_patch = ((pred - target) ** 2).mean(-1)
  loss = (per_patch * mask).sum() / mask.sum()
  grad = 2.0 * (pred - target) / pred.shape[-1] * mask[..., None] / mask.sum()
  return loss, grad


@pytest.mark.parametrize("norm_pix", [True, False])
def test_mae_loss_matches_a_direct_computation(norm_pix):
  rng = np.random.default_rng(2)
  pred = rng.normal(size=(4, 9, 12)).astype(np.float32)
  target = (3.0 * rng.normal(size=(4, 9, 12)) + 1.0).astype(np.float32)
  mask = (rng.uniform(size=(4, 9)) < 0.7).astype(np.float32)
  value, grad = jax.value_and_grad(losses.mae_loss)(jnp.asarray(pred), jnp.asarray(target), jnp.asarray(mask),
                                                    norm_pix)
  expected, expected_grad = _direct_mae_loss(pred, target, mask, norm_pix)
  np.testing.assert_allclose(value, expected, rtol=1e-5)
  np.testing.assert_allclose(grad, expected_grad, rtol=1e-4, atol=1e-8)
  # The visible patches carry no loss.
  assert np.all(np.asarray(grad)[mask == 0] == 0)


def _tiny_vit(**kw):
  return vit.VisionTransformer(patch_size=4, embed_dim=32, depth=2, num_heads=4, mlp_ratio=2.0, image_size=16,
                               pos_embed="sincos", init_scheme="mae", **kw)


def test_encoder_on_every_patch_equals_the_plain_forward():
  model = _tiny_vit()
  x = jnp.asarray(np.random.default_rng(3).normal(size=(2, 16, 16, 3)), jnp.float32)
  params = model.init(jax.random.key(0), x, train=False)
  tokens = model.apply(params, x, train=False, ids_keep=jnp.tile(jnp.arange(16), (2, 1)))
  assert tokens.shape == (2, 17, 32)
  np.testing.assert_allclose(tokens[:, 0], model.apply(params, x, train=False), rtol=1e-5, atol=1e-6)
  # A subset of patches: the class token now sees only them (attention mixes tokens).
  subset = model.apply(params, x, train=False, ids_keep=jnp.tile(jnp.array([5, 0, 9]), (2, 1)))
  assert subset.shape == (2, 4, 32) and not np.allclose(subset[:, 0], tokens[:, 0])


def test_decoder_puts_each_token_back_at_its_grid_position():
  """Without blocks the decoder acts per token: the prediction at a visible patch is its own latent's, at a
  masked patch the mask token's, whatever order the visible tokens come in."""
  decoder = vit.MAEDecoder(patch_size=2, grid_size=3, embed_dim=8, depth=0, num_heads=2)
  rng = np.random.default_rng(4)
  noise = jnp.asarray(rng.uniform(size=(2, 9)), jnp.float32)
  ids_keep, mask, ids_restore = losses.random_masking(noise, 2 / 3)
  latent = jnp.asarray(rng.normal(size=(2, 4, 6)), jnp.float32)        # class token + 3 visible
  params = decoder.init(jax.random.key(1), latent, ids_restore, train=False)
  pred = np.asarray(decoder.apply(params, latent, ids_restore, train=False))
  # The same decoder applied to the tokens already in grid order, one token at a time.
  variables = params["params"]
  table = np.concatenate([np.zeros((1, 8)), vit.sincos_2d(8, 3, 3)])
  mask_token = np.asarray(variables["mask_token"])[0, 0]

  def per_token(embedded, slot):
    y = jnp.asarray(embedded + table[slot], jnp.float32)
    y = (y - y.mean()) / jnp.sqrt(y.var() + vit.LAYER_NORM_EPS)
    y = y * variables["decoder_norm"]["scale"] + variables["decoder_norm"]["bias"]
    return np.asarray(y @ variables["decoder_pred"]["kernel"] + variables["decoder_pred"]["bias"])

  embed = lambda t: np.asarray(t @ variables["decoder_embed"]["kernel"] + variables["decoder_embed"]["bias"])
  for n in range(2):
    for j in range(9):
      slot = int(ids_restore[n, j])
      source = embed(latent[n, 1 + slot]) if slot < 3 else mask_token
      np.testing.assert_allclose(pred[n, j], per_token(source, 1 + j), rtol=1e-4, atol=1e-5)
    assert sorted(int(i) for i in ids_keep[n]) == [j for j in range(9) if mask[n, j] == 0]


def mae_config(batch=16):
  cfg = config_lib.load(f"{REPO}/configs/mae.py:cifar10,tiny")
  cfg.batch_size = batch
  cfg.total_steps = 10
  cfg.model.update(depth=2, image_size=16)
  cfg.views.view.crop_size = 16
  cfg.optimizer.update(warmup_epochs=0.0)
  return cfg


@pytest.mark.parametrize("change,message", [
    ({"method.mask_ratio": 1.0}, "mask_ratio"),
    ({"method.decoder_embed_dim": 30}, "decoder_embed_dim"),
    ({"views.view.crop_size": 8}, "crop_size"),
])
def test_bad_settings_fail_with_one_line(change, message):
  cfg = mae_config()
  cfg.data_dir = "unused"
  set_keys(cfg, change)
  with pytest.raises(ConfigError, match=message):
    config_lib.validate(cfg, 1)


def test_eight_devices_equal_one_and_the_masks_follow_the_step():
  """AdamW on the recipe: the masks are drawn for the global batch from the step's key, so a step on 8
  devices equals the step on 1 (loss, gradient norm, new parameters and moments); a second step draws new
  masks."""
  assert jax.device_count() == 8
  cfg = mae_config()
  batches = [random_batch(cfg, seed) for seed in range(2)]
  _, one, m1 = run_steps(cfg, parallel.make_mesh(jax.devices()[:1]), batches)
  method, eight, m8 = run_steps(cfg, parallel.make_mesh(), batches)
  for key in ("loss", "total_loss", "grad_norm", "embedding_std", "probe_loss"):
    np.testing.assert_allclose(m8[key], m1[key], rtol=5e-5, atol=1e-6, err_msg=key)
  assert_trees_close(eight[-1].params, one[-1].params, atol=1e-5)
  assert_trees_close(eight[-1].opt_state, one[-1].opt_state, atol=1e-5)
  assert set(one[-1].params) == {"encoder", "decoder", "online_probe"} and one[-1].method_state == {}
  # The loss is the reconstruction error of the masked patches under the step's masks: recompute step 0's
  # from its parameters with the method's own pieces.
  rng = jax.random.fold_in(jax.random.wrap_key_data(one[0].rng), 0)
  x = jnp.asarray(batches[0]["views"][0])
  noise = jax.random.uniform(jax.random.fold_in(rng, 0), (x.shape[0], method.num_patches))
  ids_keep, mask, ids_restore = losses.random_masking(noise, cfg.method.mask_ratio)
  params = one[0].params
  latent = method.encoder.apply({"params": params["encoder"]}, x, train=True, ids_keep=ids_keep)
  pred = method.decoder.apply({"params": params["decoder"]}, latent, ids_restore, train=True)
  first_loss = losses.mae_loss(pred, losses.patchify(x, 4), mask)
  _, _, m_first = run_steps(cfg, parallel.make_mesh(jax.devices()[:1]), batches[:1])
  np.testing.assert_allclose(m_first["loss"], first_loss, rtol=1e-5)
  assert mask.sum() == x.shape[0] * 12  # 75% of the 16 patches of each image


@pytest.mark.parametrize("arch,blr,epochs,decay,drop_path", [
    ("vit_base", 5e-4, 100.0, 0.65, 0.1), ("vit_large", 1e-3, 50.0, 0.75, 0.2), ("vit_huge", 1e-3, 50.0, 0.75, 0.3)])
def test_finetune_protocol_is_the_published_recipe(arch, blr, epochs, decay, drop_path):
  """FINETUNE.md l.63-80 and main_finetune.py's defaults (RECIPES.md section 9)."""
  p = config_lib.load(f"{REPO}/configs/mae.py:{arch}").eval.finetune
  assert (p.optimizer, p.base_learning_rate, p.lr_scaling, p.batch_size, tuple(p.epochs)) == (
      "adamw", blr, "linear", 1024, (epochs,))
  assert (p.layer_decay, p.drop_path_rate, p.warmup_epochs, p.end_learning_rate) == (decay, drop_path, 5.0, 1e-6)
  assert (p.weight_decay, p.b1, p.b2, p.exclude_bias_and_norm) == (0.05, 0.9, 0.999, True)
  assert set(p.no_decay_names) == {"cls_token", "pos_embed"}
  assert (p.label_smoothing, p.mixup_alpha, p.cutmix_alpha, p.mixup_switch_prob) == (0.1, 0.8, 1.0, 0.5)
  assert (p.randaugment_layers, p.randaugment_magnitude, p.randaugment_magnitude_std, p.erase_prob) == (
      2, 9.0, 0.5, 0.25)
  assert (p.representation, p.head_norm, p.head_init_std, tuple(p.crop_scale)) == ("gap", "layernorm", 2e-5,
                                                                                    (0.08, 1.0))
