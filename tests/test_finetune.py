"""MAE's fine-tuning recipe in the image-level protocols: layer-wise learning-rate decay, mixup / cutmix with
label smoothing, the soft-target loss, the global-pool representation with its LayerNorm head, drop path
per protocol; each against a direct computation, and the whole recipe's sharded step equal to the
single-device step."""

import shutil

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import REPO
from ssl_jax import config as config_lib
from ssl_jax import losses, methods, optim, parallel
from ssl_jax.data import datasets, mixup
from ssl_jax.data.datasets import EMBEDDED_DATA_DIR
from ssl_jax.errors import ConfigError
from ssl_jax.evaluate import supervised


def mae_config():
  cfg = config_lib.load(f"{REPO}/configs/mae.py:cifar10,tiny")
  cfg.data_dir = EMBEDDED_DATA_DIR
  return cfg


def random_batch(n=16, seed=0):
  rng = np.random.default_rng(seed)
  return {"image": rng.normal(size=(n, 32, 32, 3)).astype(np.float32),
          "label": rng.integers(0, 10, n).astype(np.int32)}


def build_and_step(cfg, mesh, num_steps=1, schedule=None):
  p = cfg.eval.finetune
  method = methods.get(cfg)
  variables = method.evaluation_encoder().init(jax.random.key(0), np.zeros((1, 32, 32, 3), np.float32),
                                               train=False)
  variables = {"params": variables["params"], "batch_stats": {}}  # as method.encoder_variables gives
  state, step_fn, _ = supervised.build(p, method, variables, mesh, schedule or optim.warmup_cosine(1e-3, 0, 10),
                                       datasets.get("cifar10"), seed=0)
  start = jax.device_get(state)
  losses_ = []
  for i in range(num_steps):
    state, metrics = step_fn(state, parallel.to_global(mesh, random_batch(seed=i)))
    losses_.append(float(metrics["loss"]))
  return start, jax.device_get(state), losses_


def layer_id(path: str, depth: int) -> int:
  """MAE util/lr_decay.py get_layer_id_for_vit on our parameter names, written out directly."""
  parts = path.split("/")
  if parts[0] == "encoder" and parts[1] in ("patch_embed", "cls_token", "pos_embed"):
    return 0
  if parts[0] == "encoder" and parts[1].startswith("block_"):
    return int(parts[1][len("block_"):]) + 1
  return depth + 1


def test_layer_decay_scales_each_layer_as_mae():
  """One plain SGD step (no momentum, no weight decay) with layer_decay 0.65 moves every parameter by its
  published multiplier 0.65 ** (L - layer) times the step with layer_decay 1 (L = depth + 1)."""
  cfg = mae_config()
  cfg.eval.finetune.update(optimizer="sgd", momentum=0.0, nesterov=False, weight_decay=0.0, mixup_alpha=0.0,
                           cutmix_alpha=0.0, label_smoothing=0.0, drop_path_rate=0.0, head_init_std=0.01)
  mesh = parallel.make_mesh(jax.devices()[:1])
  moved = {}
  for decay in (1.0, 0.65):
    cfg.eval.finetune.layer_decay = decay
    start, end, _ = build_and_step(cfg, mesh, schedule=lambda step: 10.0)  # large moves: float32 resolves them
    moved[decay] = flax.traverse_util.flatten_dict(
        jax.tree.map(lambda a, b: np.asarray(b, np.float64) - np.asarray(a, np.float64), start.params, end.params),
        sep="/")
  depth = cfg.model.depth
  seen = set()
  for path, base in moved[1.0].items():
    if not np.any(base):
      continue  # the final norm: unused by the global pool, no gradient
    expected = 0.65 ** (depth + 1 - layer_id(path, depth))
    np.testing.assert_allclose(moved[0.65][path], expected * base, rtol=1e-3, atol=1e-4 * np.abs(base).max(),
                               err_msg=path)
    seen.add(layer_id(path, depth))
  assert seen == set(range(depth + 2))  # every layer, embeddings to head, was checked


def test_layer_decay_groups_read_back():
  cfg = mae_config()
  method = methods.get(cfg)
  variables = method.evaluation_encoder().init(jax.random.key(0), np.zeros((1, 32, 32, 3), np.float32),
                                               train=False)
  opt = config_lib.supervised_protocol(groups=supervised.vit.layer_decay_groups(12, 0.75))
  params = {"encoder": variables["params"], "head": {"kernel": np.zeros((4, 2))}}
  # The groups are made for 12 blocks; the tiny model has 4, so the other 8 take nothing: not required.
  with pytest.raises(ConfigError, match="takes no parameter"):
    optim.param_settings(opt, params)
  opt = config_lib.supervised_protocol(groups=supervised.vit.layer_decay_groups(4, 0.75))
  settings = flax.traverse_util.flatten_dict(optim.param_settings(opt, params), sep="/")
  for path, s in settings.items():
    assert s.lr_mult == pytest.approx(0.75 ** (5 - layer_id(path, 4))), path


def test_soft_cross_entropy_value_and_gradient():
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(6, 5)).astype(np.float32)
  targets = rng.dirichlet(np.ones(5), size=6).astype(np.float32)
  z = logits.astype(np.float64)
  log_p = z - z.max(1, keepdims=True) - np.log(np.exp(z - z.max(1, keepdims=True)).sum(1, keepdims=True))
  np.testing.assert_allclose(losses.soft_cross_entropy(logits, targets), -(targets * log_p).sum(1).mean(),
                             rtol=1e-6)
  grad = jax.grad(losses.soft_cross_entropy)(jnp.asarray(logits), jnp.asarray(targets))
  np.testing.assert_allclose(grad, (np.exp(log_p) * targets.sum(1, keepdims=True) - targets) / 6, atol=1e-6)


def test_mixup_mixes_with_the_mirrored_example():
  rng = np.random.default_rng(0)
  x = rng.normal(size=(6, 8, 8, 3)).astype(np.float32)
  y = np.array([0, 1, 2, 3, 4, 5], np.int32)
  images, targets, lam = mixup.mix_batch(jax.random.key(3), x, y, 10, 0.8, 0.0, smoothing=0.1)
  lam = float(lam)
  assert 0 < lam < 1
  np.testing.assert_allclose(images, lam * x + (1 - lam) * x[::-1], rtol=1e-5, atol=1e-6)
  smooth = np.full((6, 10), 0.01)
  smooth[np.arange(6), y] = 0.91
  np.testing.assert_allclose(targets, lam * smooth + (1 - lam) * smooth[::-1], rtol=1e-5)
  np.testing.assert_allclose(np.asarray(targets).sum(1), 1.0, rtol=1e-6)
  again = mixup.mix_batch(jax.random.key(3), x, y, 10, 0.8, 0.0, smoothing=0.1)
  np.testing.assert_array_equal(images, again[0])
  other = mixup.mix_batch(jax.random.key(4), x, y, 10, 0.8, 0.0, smoothing=0.1)
  assert float(other[2]) != lam


def test_cutmix_pastes_one_box_and_weights_by_its_area():
  rng = np.random.default_rng(1)
  x = rng.normal(size=(4, 16, 12, 3)).astype(np.float32)
  y = np.array([1, 2, 3, 4], np.int32)
  areas = []
  for seed in range(20):
    images, targets, lam = mixup.mix_batch(jax.random.key(seed), x, y, 5, 0.0, 1.0)
    images = np.asarray(images)
    pasted = np.all(images == x[::-1], axis=-1) & np.any(x != x[::-1], axis=-1)       # [n, h, w]
    kept = np.all(images == x, axis=-1)
    assert np.all(pasted | kept)
    box = pasted[0]
    rows, cols = np.any(box, 1), np.any(box, 0)
    np.testing.assert_array_equal(box, rows[:, None] & cols[None, :])  # one rectangle
    assert all(np.array_equal(pasted[i], box) for i in range(4))      # the same box for the whole batch
    area = box.sum() / box.size
    np.testing.assert_allclose(float(lam), 1 - area, rtol=1e-6)
    onehot = np.eye(5)[y]
    np.testing.assert_allclose(targets, (1 - area) * onehot + area * onehot[::-1], rtol=1e-5, atol=1e-7)
    areas.append(area)
  assert 0 < np.mean(areas) < 0.6 and len(set(areas)) > 10


def test_mixup_switch_chooses_between_the_two():
  x = np.random.default_rng(2).normal(size=(4, 8, 8, 3)).astype(np.float32)
  y = np.arange(4, dtype=np.int32)
  for seed in range(5):
    images, _, _ = mixup.mix_batch(jax.random.key(seed), x, y, 4, 0.8, 1.0, switch_prob=0.0)
    assert not np.any(np.all(np.asarray(images) == x, axis=-1))  # mixup: every pixel changes
    images, _, _ = mixup.mix_batch(jax.random.key(seed), x, y, 4, 0.8, 1.0, switch_prob=1.0)
    assert np.any(np.all(np.asarray(images) == x, axis=-1))      # cutmix: some pixels are kept


def test_global_pool_and_layernorm_head_are_maes():
  """gap = mean of the last block's patch tokens before the final norm (models_vit.py global_pool); the
  head's fc_norm is a LayerNorm with eps 1e-6 and affine parameters."""
  cfg = mae_config()
  method = methods.get(cfg)
  encoder = method.evaluation_encoder("gap")
  x = np.random.default_rng(0).normal(size=(3, 32, 32, 3)).astype(np.float32)
  variables = encoder.init(jax.random.key(0), x, train=False)
  features, state = encoder.apply(variables, x, train=False, capture_intermediates=True)
  last = state["intermediates"][f"block_{cfg.model.depth - 1}"]["__call__"][0]
  np.testing.assert_allclose(features, np.asarray(last)[:, 1:].mean(1), rtol=1e-5, atol=1e-6)

  p = config_lib.supervised_protocol(head_norm="layernorm", head_init_std=2e-5)
  head = supervised.classifier_head(p, 4)
  hv = head.init(jax.random.key(1), np.zeros((1, 64), np.float32), train=False)
  assert set(hv["params"]) == {"fc_norm", "linear"} and "batch_stats" not in hv
  assert np.asarray(hv["params"]["linear"]["kernel"]).std() < 1e-4
  params = jax.tree.map(lambda a: a + 0.3, hv["params"])  # non-trivial scale, shift and weights
  logits, stats = supervised.apply_head(head, params, {}, features, train=True)
  h = np.asarray(features, np.float64)
  normed = (h - h.mean(1, keepdims=True)) / np.sqrt(h.var(1, keepdims=True) + 1e-6)
  normed = normed * np.asarray(params["fc_norm"]["scale"]) + np.asarray(params["fc_norm"]["bias"])
  expected = normed @ np.asarray(params["linear"]["kernel"]) + np.asarray(params["linear"]["bias"])
  np.testing.assert_allclose(logits, expected, rtol=1e-4, atol=1e-5)
  assert stats == {}


def test_protocol_drop_path_reaches_the_encoder():
  cfg = mae_config()
  method = methods.get(cfg)
  x = np.random.default_rng(0).normal(size=(8, 32, 32, 3)).astype(np.float32)
  variables = method.evaluation_encoder().init(jax.random.key(0), x, train=False)
  run = lambda rate: np.asarray(method.represent_train(variables, x, jax.random.key(1), "gap", rate)[0])
  np.testing.assert_array_equal(run(None), run(0.0))  # the tiny MAE model has no drop path of its own
  assert not np.allclose(run(0.0), run(0.5))
  np.testing.assert_array_equal(run(0.5), run(0.5))


@pytest.mark.parametrize("bad,match", [
    (dict(head_norm="groupnorm"), "head_norm"), (dict(mixup_alpha=-1.0), "mixup_alpha"),
    (dict(layer_decay=1.5), "layer_decay"), (dict(label_smoothing=1.0), "label_smoothing")])
def test_bad_recipe_settings_fail_in_one_line(bad, match):
  cfg = mae_config()
  cfg.eval.finetune.update(**bad)
  with pytest.raises(ConfigError, match=match):
    config_lib.validate_eval(cfg)


def test_vit_settings_refused_for_resnets_and_frozen_encoders():
  cfg = config_lib.load(f"{REPO}/configs/simclr.py:cifar10,tiny")
  cfg.eval.finetune.layer_decay = 0.65
  with pytest.raises(ConfigError, match="ViT setting"):
    config_lib.validate_eval(cfg)
  cfg = mae_config()
  cfg.eval.paper_linear.drop_path_rate = 0.1
  with pytest.raises(ConfigError, match="frozen"):
    config_lib.validate_eval(cfg)


def test_mae_recipe_sharded_step_equals_single_device():
  """The whole recipe (mixup and cutmix over the global batch, smoothing, drop path, layer decay, the
  LayerNorm head on the global pool, AdamW) on 8 devices equals 1 device."""
  cfg = mae_config()
  cfg.eval.finetune.update(drop_path_rate=0.2, head_init_std=0.01, mixup_switch_prob=0.5)
  runs = [build_and_step(cfg, parallel.make_mesh(devices), num_steps=3)
          for devices in (jax.devices()[:1], jax.devices())]
  (_, one, losses1), (_, eight, losses8) = runs
  np.testing.assert_allclose(losses1, losses8, rtol=1e-5)
  # Adam divides by sqrt(v): where a gradient is near 0, the reduction order's rounding moves a parameter by
  # a visible fraction of one step (lr 1e-3); 1e-5 is 1% of a step.
  for a, b in zip(jax.tree.leaves(one.params), jax.tree.leaves(eight.params)):
    np.testing.assert_allclose(a, b, rtol=2e-4, atol=1e-5)


def test_mae_recipe_run_resumes_to_the_same_result(tmp_path):
  """RandAugment and random erasing in the input, mixup / cutmix and drop path in the step: all drawn from
  the seed and the position, so a run killed between checkpoints resumes to the same numbers."""
  cfg = mae_config()
  cfg.shuffle_buffer = 256
  p = cfg.eval.finetune
  p.update(total_steps=4, batch_size=32, log_every_steps=1, checkpoint_every_steps=2, drop_path_rate=0.1)
  view = supervised.train_view(32, p.crop_scale, p)
  assert (view["randaugment_layers"], view["erase_prob"]) == (2, 0.25)
  method = methods.get(cfg)
  variables = method.evaluation_encoder().init(jax.random.key(0), np.zeros((1, 32, 32, 3), np.float32),
                                               train=False)
  variables = {"params": variables["params"], "batch_stats": {}}

  def run(directory):
    return supervised.train_and_score(cfg, "finetune", method, variables, parallel.make_mesh(), 1.0, 1.0, "ssl",
                                      checkpoint_dir=str(directory))

  whole = run(tmp_path / "a")
  run(tmp_path / "b")
  shutil.rmtree(tmp_path / "b" / "4")  # as if killed between the checkpoints at steps 2 and 4
  resumed = run(tmp_path / "b")
  for key in ("top1", "final_train_loss"):
    assert resumed[key] == whole[key], key
