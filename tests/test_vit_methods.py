"""MoCo v3 and DINO on a tiny ViT: a sharded step equals the single-device step (loss, gradients through
the new parameters, teacher / momentum network, DINO's center), the frozen patch projection and DINO's
frozen last layer neither move nor advance optimizer state, and DINO evaluates its teacher."""

import jax
import numpy as np
import pytest

from conftest import REPO
from ssl_jax import config as config_lib
from ssl_jax import methods, optim, parallel, train

NUM_TRAIN = 1000  # the data's size as the methods see it (epoch-counted events)


def vit_config(name, batch=16, sgd=True):
  cfg = config_lib.load(f"{REPO}/configs/{name}.py:cifar10,tiny")
  cfg.batch_size = batch
  cfg.total_steps = 10
  cfg.model.drop_path_rate = 0.0  # the masks are drawn per device: 8 devices cannot equal 1 with them
  if sgd:
    # Plain SGD at a constant rate: new params are a direct read of the gradient. The groups (frozen patch
    # projection, DINO's last layer) are kept.
    cfg.optimizer.update(name="sgd", base_learning_rate=0.1, lr_scaling="none", momentum=0.0,
                         weight_decay=0.0, warmup_epochs=0.0, clip_per_param=0.0)
  # Small crops keep the step cheap; DINO keeps global and local crops of different sizes (two backbone
  # calls, an interpolated position embedding for the locals).
  for view in cfg.views.values():
    view.crop_size = 8 if view.crop_size < 32 else 16
  if "local" in cfg.views:
    cfg.views.local.num = 2
  return cfg


def random_batch(cfg, seed=0):
  rng = np.random.default_rng(seed)
  sizes = [v.crop_size for v in sorted(cfg.views.values(), key=lambda v: v.order) for _ in range(v.num)]
  b = cfg.batch_size
  return {"views": tuple(rng.normal(size=(b, s, s, 3)).astype(np.float32) for s in sizes),
          "label": rng.integers(0, 10, size=b).astype(np.int32), "index": np.arange(b, dtype=np.int64)}


def run_steps(cfg, mesh, batches):
  cfg = config_lib.resolve(cfg, NUM_TRAIN)
  method = methods.get(cfg, methods.DataFacts(NUM_TRAIN, cfg.batch_size))
  schedule = optim.warmup_cosine(optim.peak_learning_rate(cfg), 0, cfg.total_steps)
  state, tx = train.create_train_state(cfg, method, schedule, num_classes=10)
  state = parallel.replicate(mesh, state)
  initial = jax.device_get(state)
  step = train.jit_train_step(train.make_train_step(cfg, method, tx, schedule, mesh, 10), mesh)
  for batch in batches:
    state, metrics = step(state, parallel.to_global(mesh, batch))
  return method, initial, jax.device_get(state), jax.device_get(metrics)


def assert_trees_close(a, b, rtol=1e-4, atol=2e-6):
  flat_a, tree_a = jax.tree.flatten(a)
  flat_b, tree_b = jax.tree.flatten(b)
  assert tree_a == tree_b
  for x, y in zip(flat_a, flat_b):
    np.testing.assert_allclose(np.asarray(x, np.float64), np.asarray(y, np.float64), rtol=rtol, atol=atol)


@pytest.mark.parametrize("name", ["moco_v3", "dino"])
def test_eight_devices_equal_one(name):
  assert jax.device_count() == 8
  cfg = vit_config(name)
  batch = random_batch(cfg)
  _, initial, one, m1 = run_steps(cfg, parallel.make_mesh(jax.devices()[:1]), [batch])
  method, _, eight, m8 = run_steps(cfg, parallel.make_mesh(), [batch])
  keys = ["loss", "total_loss", "grad_norm", "embedding_std"]
  keys += ["teacher_entropy", "kl_teacher_student", "teacher_batch_entropy"] if name == "dino" else ["momentum"]
  for key in keys:
    np.testing.assert_allclose(m8[key], m1[key], rtol=2e-5, err_msg=key)
  # Parameters move by up to ~2 in this one step (lr 0.1); float32 sums over 8 partial gradients differ
  # from one sum by a few 1e-6 of that.
  assert_trees_close(eight.params, one.params, atol=2e-5)
  assert_trees_close(eight.batch_stats, one.batch_stats, atol=1e-5)
  assert_trees_close(eight.method_state, one.method_state, atol=1e-5)  # teacher / momentum network, center
  # Something was learned (the comparison is not between two unchanged states) ...
  moved = jax.tree.map(lambda a, b: float(np.abs(a - b).max()), initial.params["encoder"], one.params["encoder"])
  assert max(jax.tree.leaves(moved)) > 1e-4
  # ... except what is frozen: MoCo v3's random patch projection (--stop-grad-conv1) for the whole run,
  # DINO's last layer during the first epoch (and its g for good with norm_last_layer).
  frozen = initial.params["encoder"]["patch_embed"] if name == "moco_v3" else \
      initial.params["projector"]["last_layer"]
  after = one.params["encoder"]["patch_embed"] if name == "moco_v3" else one.params["projector"]["last_layer"]
  for a, b in zip(jax.tree.leaves(frozen), jax.tree.leaves(after)):
    np.testing.assert_array_equal(a, b)
  if name == "dino":
    # The center moved towards the teacher's batch mean; the teacher is the EMA of the student.
    assert np.abs(one.method_state["center"]).max() > 0
    teacher = one.method_state["teacher_params"]
    student = {k: v for k, v in one.params.items() if k != "online_probe"}
    expected = jax.tree.map(lambda t, s, m=float(method.teacher_momentum(0)): m * t + (1 - m) * s,
                            initial.method_state["teacher_params"], student)
    assert_trees_close(teacher, expected, atol=1e-6)


def test_frozen_groups_skip_adamw_entirely():
  """With the recipes' AdamW (decoupled weight decay, moments), a frozen parameter is skipped as PyTorch
  skips a parameter without gradient: no weight decay, no Adam moments (RECIPES.md cross-cutting 4)."""
  cfg = vit_config("moco_v3", batch=8, sgd=False)
  _, initial, state, _ = run_steps(cfg, parallel.make_mesh(jax.devices()[:1]), [random_batch(cfg, s) for s in (0, 1)])
  for a, b in zip(jax.tree.leaves(initial.params["encoder"]["patch_embed"]),
                  jax.tree.leaves(state.params["encoder"]["patch_embed"])):
    np.testing.assert_array_equal(a, b)
  moments = [leaf for path, leaf in jax.tree_util.tree_leaves_with_path(state.opt_state)
             if "patch_embed" in jax.tree_util.keystr(path) and np.ndim(leaf) > 0]
  assert moments and all(not np.any(m) for m in moments)
  others = [leaf for path, leaf in jax.tree_util.tree_leaves_with_path(state.opt_state)
            if "block_0" in jax.tree_util.keystr(path) and np.ndim(leaf) > 0]
  assert any(np.any(m) for m in others)


def test_dino_evaluates_the_teacher_and_its_last_layer_trains_after_the_first_epoch():
  cfg = vit_config("dino", batch=8)
  cfg.total_steps = 4
  # 16 examples at batch 8: two steps per epoch, so the last layer is frozen for steps 0-1 and trains at 2.
  cfg = config_lib.resolve(cfg, 16)
  method = methods.get(cfg, methods.DataFacts(16, cfg.batch_size))
  mesh = parallel.make_mesh(jax.devices()[:1])
  schedule = optim.warmup_cosine(optim.peak_learning_rate(cfg), 0, cfg.total_steps)
  state, tx = train.create_train_state(cfg, method, schedule, num_classes=10)
  state = parallel.replicate(mesh, state)
  step = train.jit_train_step(train.make_train_step(cfg, method, tx, schedule, mesh, 10), mesh)
  last = [jax.device_get(state.params["projector"]["last_layer"]["v"])]
  for i in range(3):
    state, _ = step(state, parallel.to_global(mesh, random_batch(cfg, i)))
    last.append(jax.device_get(state.params["projector"]["last_layer"]["v"]))
  np.testing.assert_array_equal(last[0], last[2])
  assert np.abs(last[3] - last[2]).max() > 0
  variables = method.encoder_variables(state.params, state.batch_stats, state.method_state)
  assert variables["params"] is state.method_state["teacher_params"]["encoder"]
  x = random_batch(cfg)["views"][0]
  teacher = method.represent(variables, x)
  student = method.represent({"params": state.params["encoder"], "batch_stats": {}}, x)
  assert teacher.shape == student.shape and not np.allclose(teacher, student)


def test_protocols_read_the_configured_representation():
  """paper_linear with representation=cls_last4 (DINO's ViT-S linear probe) trains its classifier on the
  concatenated class tokens of the last 4 blocks of the evaluated (teacher) encoder; the model's own
  representation elsewhere; a ResNet refuses the setting in one line."""
  from ssl_jax.data import datasets
  from ssl_jax.errors import ConfigError
  from ssl_jax.evaluate import supervised
  cfg = config_lib.resolve(vit_config("dino"), NUM_TRAIN)
  method = methods.get(cfg, methods.DataFacts(NUM_TRAIN, cfg.batch_size))
  state, _ = train.create_train_state(cfg, method, optim.warmup_cosine(0.1, 0, 10), num_classes=10)
  variables = method.encoder_variables(state.params, state.batch_stats, state.method_state)
  mesh = parallel.make_mesh(jax.devices()[:1])
  dim = cfg.model.embed_dim
  for representation, features in (("", dim), ("cls_last4", 4 * dim)):
    p = cfg.eval.paper_linear
    p.representation = representation
    head_state, _, _ = supervised.build(p, method, variables, mesh, optim.warmup_cosine(0.1, 0, 10),
                                        datasets.get("cifar10"), seed=0)
    assert head_state.params["head"]["kernel"].shape == (features, 10)
  x = random_batch(cfg)["views"][0]
  last4 = method.represent(variables, x, "cls_last4")
  np.testing.assert_allclose(last4[:, -dim:], method.represent(variables, x), rtol=1e-5, atol=1e-6)
  resnet = config_lib.load(f"{REPO}/configs/simclr.py:cifar10,tiny")
  resnet.data_dir = "/data"
  resnet.eval.paper_linear.representation = "cls_last4"
  with pytest.raises(ConfigError, match="eval.paper_linear.representation is a ViT setting"):
    config_lib.validate(resnet, 8, 1, "cpu")


def test_dino_warns_of_the_uniform_collapse_only():
  """Logged rows of the tiny DINO run that collapsed on the embedded data (loss 5.46 and teacher entropy
  5.30 against log 256 = 5.55) warn; a sharp teacher at the same loss does not."""
  method = methods.get(config_lib.load(f"{REPO}/configs/dino.py:cifar10,tiny"))
  assert "collapse" in method.log_warnings({"loss": 5.46, "teacher_entropy": 5.30})[0]
  assert method.log_warnings({"loss": 5.46, "teacher_entropy": 2.0}) == []
  assert method.log_warnings({"loss": 3.0, "teacher_entropy": 5.4}) == []
