"""CPC v2: the patch grid and the per-patch augmentation against direct slicing, the causal context network
(a row below never changes a context above, in every direction), the InfoNCE loss against a direct float64
computation (values and gradients), the layer-norm encoder's independence of the batch, the evaluation
representation, 8 devices equal to 1, an exact resume, and bad settings in one line."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import REPO, numeric_grad, set_keys, stop_and_resume
from ssl_jax import config as config_lib
from ssl_jax import losses, methods, parallel
from ssl_jax.errors import ConfigError
from ssl_jax.methods import cpc
from test_vit_methods import assert_trees_close, random_batch, run_steps

NUM_TRAIN = 64


def cpc_config(batch=16, **method):
  cfg = config_lib.load(f"{REPO}/configs/cpc_v2.py:cifar10,tiny")
  cfg.batch_size = batch
  cfg.total_steps = 10
  cfg.model.width = 8
  cfg.method.update(**method)
  return cfg


def test_grid_patches_are_the_overlapping_windows():
  x = np.random.default_rng(0).normal(size=(2, 32, 32, 3)).astype(np.float32)
  patches = np.asarray(cpc.grid_patches(jnp.asarray(x), 7, 8, 4))
  assert patches.shape == (2, 7, 7, 8, 8, 3)
  for r in range(7):
    for c in range(7):
      np.testing.assert_array_equal(patches[:, r, c], x[:, 4 * r:4 * r + 8, 4 * c:4 * c + 8])


def test_each_patch_is_flipped_and_colour_dropped_on_its_own():
  rng = np.random.default_rng(1)
  patches = rng.normal(size=(2, 3, 3, 4, 4, 3)).astype(np.float32)
  flip = rng.random((2, 3, 3)) < 0.5
  drop = rng.random((2, 3, 3)) < 0.5
  keep = rng.integers(0, 3, size=(2, 3, 3))
  out = np.asarray(cpc.augment_patches(jnp.asarray(patches), jnp.asarray(flip), jnp.asarray(keep), jnp.asarray(drop)))
  for i in np.ndindex(2, 3, 3):
    want = patches[i][:, ::-1] if flip[i] else patches[i].copy()
    if drop[i]:
      want[..., [ch for ch in range(3) if ch != keep[i]]] = 0
    np.testing.assert_array_equal(out[i], want)
  # The method's draws over a global batch: about half the patches flipped, every patch colour-dropped
  # (p 1 in the recipe), each channel kept about a third of the time.
  cfg = config_lib.resolve(cpc_config(), NUM_TRAIN)
  method = methods.get(cfg, methods.DataFacts(NUM_TRAIN, cfg.batch_size))
  ones = jnp.ones((64, 7, 7, 2, 2, 3))
  mesh = parallel.make_mesh(jax.devices()[:1])
  out = np.asarray(jax.shard_map(lambda p: method.augment(p, jax.random.PRNGKey(0)), mesh=mesh,
                                 in_specs=jax.P("data"), out_specs=jax.P("data"))(ones))
  kept = out[..., 0, 0, :]                                     # [64, 7, 7, 3]
  assert (kept.sum(-1) == 1).all()
  counts = kept.reshape(-1, 3).sum(0)
  assert np.abs(counts - 64 * 49 / 3).max() < 5 * math.sqrt(64 * 49 / 3)


@pytest.mark.parametrize("direction", cpc.DIRECTIONS)
def test_context_never_sees_the_rows_it_predicts(direction):
  """In `direction`'s frame, changing grid row r (and below) never changes the contexts of rows above it,
  nor any prediction made from them; changing a row above does change a context below."""
  g, d = 7, 6
  module = cpc.Predictors(hidden=8, blocks=3, target_dim=5, offsets=(1, 3), emb_scale=0.1, directions=(direction,))
  z = jax.random.normal(jax.random.PRNGKey(0), (2, g, g, d))
  params = module.init(jax.random.PRNGKey(1), z)

  def contexts(z):
    inner = params["params"][direction]["context"]
    return cpc.ContextNetwork(8, 3).apply({"params": inner}, cpc.in_direction(z, direction))

  def frame_row(z, r, value):
    """z with row r of `direction`'s frame set to `value` (undoing in_direction's flip, then transpose)."""
    framed = cpc.in_direction(z, direction).at[:, r].set(value)
    if direction in ("up", "left"):
      framed = framed[:, ::-1]
    return framed.transpose(0, 2, 1, 3) if direction in ("right", "left") else framed

  base_c = np.asarray(contexts(z))
  base_preds = module.apply(params, z)[direction][1]
  for r in (1, 4, 6):
    changed = frame_row(z, r, 3.0)
    assert not np.allclose(cpc.in_direction(changed, direction), cpc.in_direction(z, direction))
    c = np.asarray(contexts(changed))
    np.testing.assert_array_equal(c[:, :r], base_c[:, :r])
    assert not np.allclose(c[:, r:], base_c[:, r:])
    for k, pred, base_pred in zip((1, 3), module.apply(params, changed)[direction][1], base_preds):
      np.testing.assert_array_equal(np.asarray(pred)[:, :r], np.asarray(base_pred)[:, :r])
  assert not np.allclose(np.asarray(contexts(frame_row(z, 0, 3.0)))[:, 3], base_c[:, 3])


def _direct_infonce(preds, targets_all, offset, first, grid):
  """The InfoNCE of every prediction written out: -log softmax over all N grid^2 targets at its positive."""
  n, rows, cols, _ = preds.shape
  total, hits = 0.0, 0
  for b in range(n):
    for r in range(rows):
      for c in range(cols):
        logits = targets_all @ preds[b, r, c]
        positive = (first + b) * grid * grid + (r + offset) * grid + c
        total += -(logits[positive] - math.log(np.exp(logits).sum()))
        hits += int(np.argmax(logits) == positive)
  return total / (n * rows * cols), hits / (n * rows * cols)


def test_infonce_matches_a_direct_computation():
  rng = np.random.default_rng(2)
  grid, offset, first = 4, 2, 3
  preds = rng.normal(size=(2, grid - offset, grid, 3))
  targets_all = rng.normal(size=(6 * grid * grid, 3))           # 6 images in the global batch
  # Make a few predictions right, so the accuracy is not trivially 0.
  preds[0, 0, 1] = 5 * targets_all[(first + 0) * grid * grid + offset * grid + 1]
  ours = lambda p, t: losses.cpc_infonce(p, t, offset, first, grid)
  with jax.enable_x64(True):
    loss, accuracy = ours(jnp.asarray(preds), jnp.asarray(targets_all))
    want_loss, want_accuracy = _direct_infonce(preds, targets_all, offset, first, grid)
    # softmax_cross_entropy works in float32
    np.testing.assert_allclose(float(loss), want_loss, rtol=1e-6)
    assert float(accuracy) == want_accuracy and want_accuracy > 0
    g_preds, g_targets = jax.grad(lambda p, t: ours(p, t)[0], argnums=(0, 1))(jnp.asarray(preds), jnp.asarray(targets_all))

  np.testing.assert_allclose(np.asarray(g_preds), numeric_grad(
      lambda p: _direct_infonce(p, targets_all, offset, first, grid)[0], preds, 1e-5), rtol=1e-3, atol=1e-6)
  np.testing.assert_allclose(np.asarray(g_targets), numeric_grad(
      lambda t: _direct_infonce(preds, t, offset, first, grid)[0], targets_all, 1e-5), rtol=1e-3, atol=1e-6)


def test_layer_norm_encoder_and_the_representation():
  """The layer-norm ResNet has no batch statistics and encodes each patch independently of the batch; the
  representation is the grid's mean of the patch vectors, also for inputs of another size (resized)."""
  cfg = config_lib.resolve(cpc_config(), NUM_TRAIN)
  method = methods.get(cfg, methods.DataFacts(NUM_TRAIN, cfg.batch_size))
  x = jnp.asarray(random_batch(cfg)["views"][0][:3])
  params, batch_stats, state = method.init(jax.random.PRNGKey(0), {"views": (x,)})
  assert batch_stats == {} and state == {}
  variables = {"params": params["encoder"], "batch_stats": {}}
  patches = np.asarray(cpc.grid_patches(x, 7, 8, 4))
  one = jax.jit(lambda p: method.encoder.apply({"params": params["encoder"]}, p[None], train=True)[0])
  want = np.stack([np.mean([one(patches[b, r, c]) for r in range(7) for c in range(7)], axis=0) for b in range(3)])
  np.testing.assert_allclose(np.asarray(method.represent(variables, x)), want, rtol=1e-4, atol=1e-5)
  h, stats = method.represent_train(variables, x, jax.random.PRNGKey(1))
  np.testing.assert_allclose(np.asarray(h), want, rtol=1e-4, atol=1e-5)
  assert stats == {}
  bigger = jax.image.resize(x, (3, 48, 48, 3), "bilinear")
  np.testing.assert_allclose(np.asarray(method.represent(variables, bigger)),
                             np.asarray(method.represent(variables, jax.image.resize(bigger, (3, 32, 32, 3),
                                                                                       "bilinear"))), rtol=1e-5)


def test_eight_devices_equal_one():
  """Two SGD steps with two directions and two offsets: loss, accuracies, gradient norm and parameters equal
  on 8 devices and on 1 (the targets gathered over devices with their gradient; the patches' augmentation
  drawn for the global batch)."""
  assert jax.device_count() == 8
  cfg = cpc_config(directions=("down", "right"), offsets=(2, 3))
  cfg.optimizer.update(name="sgd", base_learning_rate=0.5, lr_scaling="none", momentum=0.9)
  batches = [random_batch(cfg, seed) for seed in range(2)]
  _, one, m1 = run_steps(cfg, parallel.make_mesh(jax.devices()[:1]), batches, NUM_TRAIN)
  _, eight, m8 = run_steps(cfg, parallel.make_mesh(), batches, NUM_TRAIN)
  keys = ("loss", "total_loss", "grad_norm", "cpc_accuracy_down_2", "cpc_accuracy_right_3")
  for key in keys:
    np.testing.assert_allclose(m8[key], m1[key], rtol=2e-5, atol=1e-7, err_msg=key)
  # Two directions, two offsets: four InfoNCE terms of about log(16 x 49) each at the start.
  assert abs(m1["loss"] - 4 * math.log(16 * 49)) < 1.0
  assert_trees_close(eight[-1].params, one[-1].params, atol=2e-6)
  moved = [np.abs(a - b).max() for a, b in zip(jax.tree.leaves(one[-1].params["predictors"]),
                                               jax.tree.leaves(one[0].params["predictors"]))]
  assert min(moved) > 0


def test_stopped_run_resumes_exactly_and_evaluation_reads_the_grid(tmp_path):
  from ssl_jax.data import pipeline
  from ssl_jax.evaluate import run
  from ssl_jax.evaluate import workdir as eval_workdir
  cfg = cpc_config()
  whole, parts = stop_and_resume(cfg, tmp_path)
  # Evaluation restores the checkpoint and reads the grid's mean patch vectors of its (unaugmented) images.
  saved = eval_workdir.load_config(str(tmp_path / "parts"))
  encoder = run.Encoder(saved, parallel.make_mesh())
  state, step = encoder.restore_latest(str(tmp_path / "parts"))
  images = next(pipeline.eval_batches(saved, encoder.info.test_split, 16, 32, encoder.info.eval_crop_proportion))
  features = encoder.method.represent(encoder.encoder_variables(state), jnp.asarray(images["image"]))
  patches = cpc.grid_patches(jnp.asarray(images["image"]), 7, 8, 4).reshape(16 * 49, 8, 8, 3)
  want = encoder.method.encoder.apply({"params": state.params["encoder"]}, patches, train=False)
  assert step == 4 and features.shape == (16, 8 * cfg.model.width)
  np.testing.assert_allclose(np.asarray(features), np.asarray(want).reshape(16, 49, -1).mean(1), rtol=1e-4,
                             atol=1e-5)


@pytest.mark.parametrize("change,message", [
    ({"model.norm": "batch"}, "model.norm=layer"),
    ({"views.image.crop_size": 30}, "covers 32 pixels"),
    ({"method.offsets": (3, 7)}, "method.offsets"),
    ({"method.offsets": ()}, "method.offsets"),
    ({"method.directions": ("down", "diagonal")}, "method.directions"),
    ({"method.patch_color_drop_prob": 1.5}, "patch_color_drop_prob"),
])
def test_bad_settings_fail_in_one_line(change, message):
  cfg = set_keys(cpc_config(), change)
  cfg.data_dir = "unused"
  with pytest.raises(ConfigError, match=message):
    config_lib.validate(cfg, 8)
