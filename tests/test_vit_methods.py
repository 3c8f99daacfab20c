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


def vit_config(name, batch=16):
  cfg = config_lib.load(f"{REPO}/configs/{name}.py:cifar10,tiny")
  cfg.batch_size = batch
  cfg.total_steps = 10
  cfg.model.depth = 2             # compiling is most of these tests' time
  cfg.model.drop_path_rate = 0.0  # the masks are drawn per device: 8 devices cannot equal 1 with them
  # SGD at a constant rate: new params are a direct read of the gradient; momentum, so that there is an
  # optimizer state for the frozen groups (MoCo v3's patch projection, DINO's last layer) to leave alone.
  # (AdamW skipping frozen groups entirely: tests/test_optim.py.)
  cfg.optimizer.update(name="sgd", base_learning_rate=0.02, lr_scaling="none", momentum=0.9,
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


def run_steps(cfg, mesh, batches, num_train=NUM_TRAIN):
  """(method, [the state before and after each step], metrics of the last step)."""
  cfg = config_lib.resolve(cfg, num_train)
  method = methods.get(cfg, methods.DataFacts(num_train, cfg.batch_size))
  schedule = optim.warmup_cosine(optim.peak_learning_rate(cfg), 0, cfg.total_steps)
  state, tx = train.create_train_state(cfg, method, schedule, num_classes=10)
  state = parallel.replicate(mesh, state)
  states = [jax.device_get(state)]
  step = train.jit_train_step(train.make_train_step(cfg, method, tx, schedule, mesh, 10), mesh)
  for batch in batches:
    state, metrics = step(state, parallel.to_global(mesh, batch))
    states.append(jax.device_get(state))
  return method, states, jax.device_get(metrics)


def assert_trees_close(a, b, rtol=1e-4, atol=2e-6):
  flat_a, tree_a = jax.tree.flatten(a)
  flat_b, tree_b = jax.tree.flatten(b)
  assert tree_a == tree_b
  for x, y in zip(flat_a, flat_b):
    np.testing.assert_allclose(np.asarray(x, np.float64), np.asarray(y, np.float64), rtol=rtol, atol=atol)


def leaves_at(tree, fragment):
  return [leaf for path, leaf in jax.tree_util.tree_leaves_with_path(tree)
          if fragment in jax.tree_util.keystr(path) and np.ndim(leaf) > 0]


@pytest.mark.parametrize("name", ["moco_v3", "dino"])
def test_eight_devices_equal_one(name):
  """Three steps for DINO on data of 32 examples at batch 16 (two steps per epoch): its last layer is frozen
  for the first epoch (steps 0-1) and trains at step 2."""
  assert jax.device_count() == 8
  cfg = vit_config(name)
  num_train = 32 if name == "dino" else NUM_TRAIN
  batches = [random_batch(cfg, seed) for seed in range(3 if name == "dino" else 1)]
  _, one, m1 = run_steps(cfg, parallel.make_mesh(jax.devices()[:1]), batches, num_train)
  method, eight, m8 = run_steps(cfg, parallel.make_mesh(), batches, num_train)
  keys = ["loss", "total_loss", "grad_norm", "embedding_std"]
  keys += ["teacher_entropy", "kl_teacher_student", "teacher_batch_entropy"] if name == "dino" else ["momentum"]
  for key in keys:
    np.testing.assert_allclose(m8[key], m1[key], rtol=5e-5, atol=1e-6, err_msg=key)  # entropies near 0: absolute
  # Parameters move by up to ~1 in these steps; float32 sums over 8 partial gradients differ from one
  # sum by a few 1e-6 of that.
  assert_trees_close(eight[-1].params, one[-1].params, atol=3e-5)
  assert_trees_close(eight[-1].batch_stats, one[-1].batch_stats, atol=1e-5)
  assert_trees_close(eight[-1].method_state, one[-1].method_state, atol=1e-5)  # teacher / momentum net, center
  first, last = one[0], one[-1]
  moved = jax.tree.map(lambda a, b: float(np.abs(a - b).max()), first.params["encoder"], last.params["encoder"])
  assert max(jax.tree.leaves(moved)) > 1e-4  # the comparison is not between two unchanged states
  if name == "moco_v3":
    # The random patch projection (--stop-grad-conv1) neither moves nor gets a momentum trace.
    for a, b in zip(jax.tree.leaves(first.params["encoder"]["patch_embed"]),
                    jax.tree.leaves(last.params["encoder"]["patch_embed"])):
      np.testing.assert_array_equal(a, b)
    assert all(not np.any(t) for t in leaves_at(last.opt_state, "patch_embed"))
    assert any(np.any(t) for t in leaves_at(last.opt_state, "block_0"))
    return
  v = [s.params["projector"]["last_layer"]["v"] for s in one]
  np.testing.assert_array_equal(v[0], v[2])
  assert np.abs(v[3] - v[2]).max() > 0
  assert all(not np.any(t) for t in leaves_at(one[2].opt_state, "last_layer"))
  # The center moved towards the teacher's batch mean; the teacher is the EMA of the student.
  assert np.abs(last.method_state["center"]).max() > 0
  m = float(method.teacher_momentum(2))
  student = {k: v for k, v in last.params.items() if k != "online_probe"}
  expected = jax.tree.map(lambda t, s: m * t + (1 - m) * s, one[2].method_state["teacher_params"], student)
  assert_trees_close(last.method_state["teacher_params"], expected, atol=1e-6)
  # Evaluation reads the teacher's backbone (eval_knn.py / eval_linear.py use the teacher).
  variables = method.encoder_variables(last.params, last.batch_stats, last.method_state)
  assert variables["params"] is last.method_state["teacher_params"]["encoder"]
  x = batches[0]["views"][0]
  teacher = method.represent(variables, x)
  online = method.represent({"params": last.params["encoder"], "batch_stats": {}}, x)
  assert teacher.shape == online.shape and not np.allclose(teacher, online)


def test_protocols_read_the_configured_representation():
  """paper_linear with representation=cls_last4 (DINO's ViT-S linear probe) trains its classifier on the
  concatenated class tokens of the last 4 blocks of the evaluated (teacher) encoder; the model's own
  representation elsewhere; a ResNet refuses the setting in one line."""
  from ssl_jax.data import datasets
  from ssl_jax.errors import ConfigError
  from ssl_jax.evaluate import supervised
  cfg = vit_config("dino")
  cfg.model.depth = 4  # "cls_last4" takes the last 4 blocks
  cfg = config_lib.resolve(cfg, NUM_TRAIN)
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
