"""Sharded steps equal the single-device step on the same global batch (8 simulated devices vs 1)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from conftest import REPO
from ssl_jax import config as config_lib
from ssl_jax import methods, optim, parallel, train
from ssl_jax.methods import base


def small_config(name, batch=16):
  cfg = config_lib.load(f"{REPO}/configs/{name}.py:cifar10,tiny")
  cfg.batch_size = batch
  cfg.total_steps = 10
  cfg.model.width = 8
  # Plain SGD with a constant rate makes "new params" a direct read of the gradient.
  cfg.optimizer.update(name="sgd", base_learning_rate=0.1, lr_scaling="none", momentum=0.0,
                       weight_decay=0.0, warmup_epochs=0.0)
  for view in cfg.views.values():
    view.crop_size = 16
  return cfg


def random_batch(cfg, num_views, seed=0):
  rng = np.random.default_rng(seed)
  b = cfg.batch_size
  return {"views": tuple(rng.normal(size=(b, 16, 16, 3)).astype(np.float32) for _ in range(num_views)),
          "label": rng.integers(0, 10, size=b).astype(np.int32),
          "index": np.arange(b, dtype=np.int64)}


def run_step(cfg, mesh, batch_np):
  cfg = config_lib.resolve(cfg, 1000)
  method = methods.get(cfg)
  schedule = optim.warmup_cosine(optim.peak_learning_rate(cfg), 0, cfg.total_steps)
  state, tx = train.create_train_state(cfg, method, schedule, num_classes=10)
  state = parallel.replicate(mesh, state)
  step = train.jit_train_step(train.make_train_step(cfg, method, tx, schedule, mesh, 10), mesh)
  new_state, metrics = step(state, parallel.to_global(mesh, batch_np))
  return jax.device_get(new_state), jax.device_get(metrics)


def assert_trees_close(a, b, rtol, atol):
  flat_a, tree_a = jax.tree_util.tree_flatten_with_path(a)
  flat_b, tree_b = jax.tree.flatten(b)
  assert tree_a == tree_b
  for (path, x), y in zip(flat_a, flat_b):
    np.testing.assert_allclose(np.asarray(x, np.float64), np.asarray(y, np.float64), rtol=rtol, atol=atol,
                               err_msg=jax.tree_util.keystr(path))


def without_key_bias(params):
  """params with the key third of every attention qkv bias set to 0. Its gradient is 0 in exact arithmetic
  (q . b_k is the same for every key, and a softmax is invariant to a constant), so what reaches AdamW is
  rounding noise, which its normalization turns into steps of up to the learning rate whose sign depends on
  the summation order (MAE's decoder key bias: up to 2.2e-6 apart between layouts after two steps)."""
  def zero_keys(path, x):
    x = np.asarray(x)
    if jax.tree_util.keystr(path).endswith("['qkv']['bias']"):
      x = x.copy()
      third = x.shape[-1] // 3
      x[..., third:2 * third] = 0
    return x
  return jax.tree_util.tree_map_with_path(zero_keys, params)


@pytest.mark.parametrize("name", ["simclr", "byol", "simsiam", "barlow_twins", "vicreg"])
def test_eight_devices_equal_one(name):
  assert jax.device_count() == 8
  cfg = small_config(name)
  batch = random_batch(cfg, 2)
  one, m1 = run_step(cfg, parallel.make_mesh(jax.devices()[:1]), batch)
  eight, m8 = run_step(cfg, parallel.make_mesh(), batch)
  for key in ("loss", "total_loss", "grad_norm", "embedding_std", "probe_accuracy"):
    np.testing.assert_allclose(m8[key], m1[key], rtol=2e-5, err_msg=key)
  # New params = old - 0.1 * grad, so equal new params mean equal gradients, including the gradient that
  # flows back through the gathered negatives from other devices. Barlow Twins' loss sums 256 x 256
  # correlations, so its gradients (and their float32 rounding over 8 partial sums) are larger: 3.4e-6
  # on a parameter of 0.0077 among values up to 4.5 was seen.
  assert_trees_close(eight.params, one.params, rtol=1e-4, atol=1e-5 if name == "barlow_twins" else 2e-6)
  assert_trees_close(eight.batch_stats, one.batch_stats, rtol=1e-4, atol=1e-5)
  assert_trees_close(eight.method_state, one.method_state, rtol=1e-4, atol=1e-5)


def test_simclr_gathered_negatives_carry_gradient():
  """Without the gradient through the gathered copies, the 8-device step would differ: guard that the
  comparison above can fail."""
  from ssl_jax import losses
  rng = np.random.default_rng(0)
  z1, z2 = rng.normal(size=(2, 8, 4)).astype(np.float32)

  def detached(a, b):
    parts = [losses.nt_xent(a[i:i + 2], b[i:i + 2], jax.lax.stop_gradient(a), jax.lax.stop_gradient(b), i, 0.2)
             for i in range(0, 8, 2)]
    return jnp.mean(jnp.stack(parts))

  full = jax.grad(lambda a, b: losses.nt_xent(a, b, a, b, 0, 0.2))(z1, z2)
  assert not np.allclose(jax.grad(detached)(z1, z2), full, rtol=1e-3)


def test_moco_shuffle_bn_matches_per_device_reference():
  cfg = small_config("moco_v2")
  cfg.method.queue_size = 64
  method = methods.get(cfg)
  batch = random_batch(cfg, 2)
  params, batch_stats, method_state = method.init(jax.random.key(0), {"views": (batch["views"][0][:1],)})
  mesh = parallel.make_mesh()
  rng = jax.random.key(7)
  x = batch["views"][1]

  keys_sharded = jax.jit(jax.shard_map(
      lambda p, s, xx, r: method.keys(p, s, xx, r)[0], mesh=mesh,
      in_specs=(P(), P(), P(parallel.DATA), P()), out_specs=P(parallel.DATA)))(
          params, batch_stats, parallel.to_global(mesh, x), rng)

  # Reference: the same permutation, each device's shuffled slice through the key network with its own
  # batch statistics, then un-shuffled.
  n_dev, n = 8, cfg.batch_size // 8
  perm = np.asarray(jax.random.permutation(rng, cfg.batch_size))
  shuffled_keys = np.concatenate([
      np.asarray(base.apply_train(method.network, params, batch_stats, x[perm[d * n:(d + 1) * n]])[0][1])
      for d in range(n_dev)])
  reference = np.empty_like(shuffled_keys)
  reference[perm] = shuffled_keys
  np.testing.assert_allclose(np.asarray(keys_sharded), reference, rtol=1e-4, atol=1e-5)

  # Without the shuffle, each device's keys would use the statistics of its own unshuffled slice: a
  # different result, so the check above is not vacuous.
  unshuffled = np.concatenate([
      np.asarray(base.apply_train(method.network, params, batch_stats, x[d * n:(d + 1) * n])[0][1])
      for d in range(n_dev)])
  assert not np.allclose(unshuffled, reference, rtol=1e-3, atol=1e-4)


def test_moco_step_runs_sharded_and_enqueues():
  cfg = small_config("moco_v2")
  cfg.method.queue_size = 64
  batch = random_batch(cfg, 2)
  state, metrics = run_step(cfg, parallel.make_mesh(), batch)
  assert np.isfinite(metrics["loss"])
  assert int(state.method_state["queue_ptr"]) == cfg.batch_size
  queue = np.asarray(state.method_state["queue"])
  np.testing.assert_allclose(np.linalg.norm(queue[:cfg.batch_size], axis=1), 1.0, rtol=1e-5)


def test_fsdp_layout_splits_large_arrays_over_the_data_axis():
  mesh = parallel.make_mesh()
  tree = {"kernel": jnp.zeros((64, 192)), "odd": jnp.zeros((3, 5, 7)), "bias": jnp.zeros((192,)),
          "step": jnp.zeros((), jnp.int32)}
  specs = jax.tree.map(lambda s: s.spec, parallel.state_shardings(mesh, tree, "fsdp", min_size=100))
  assert specs == {"kernel": P(None, "data"), "odd": P(), "bias": P("data"), "step": P()}
  specs = jax.tree.map(lambda s: s.spec, parallel.state_shardings(mesh, tree, "fsdp", min_size=1000))
  assert specs["bias"] == P() and specs["kernel"] == P(None, "data")
  assert all(s.spec == P() for s in jax.tree.leaves(parallel.state_shardings(mesh, tree)))


@pytest.mark.parametrize("name", ["mae", "simclr"])
def test_fsdp_step_equals_replicated_step_and_checkpoints_cross_layouts(name, tmp_path):
  """Fully sharded data parallel on 8 devices: the same loss, parameters and optimizer state as the
  replicated step (MAE's ViT with AdamW; SimCLR's ResNet with LARS and global batch norm), the state
  really split; a checkpoint written under either layout restores under the other, bit for bit."""
  from ssl_jax import checkpoint as ckpt_lib
  cfg = config_lib.load(f"{REPO}/configs/{name}.py:cifar10,tiny")
  cfg.batch_size = 16
  cfg.total_steps = 10
  cfg.fsdp_min_size = 256
  cfg.optimizer.warmup_epochs = 0.0
  if name == "simclr":
    cfg.model.width = 8
  for view in cfg.views.values():
    view.crop_size = 16
  if name == "mae":
    cfg.model.update(depth=2, image_size=16)
  mesh = parallel.make_mesh()
  num_views = sum(v.num for v in cfg.views.values())
  rng = np.random.default_rng(0)
  batch = {"views": tuple(rng.normal(size=(16, 16, 16, 3)).astype(np.float32) for _ in range(num_views)),
           "label": np.arange(16, dtype=np.int32) % 10, "index": np.arange(16, dtype=np.int64)}
  results = {}
  for mode in ("replicated", "fsdp"):
    cfg.sharding = mode
    resolved, method, state, step, _, _ = train.build(cfg, mesh, 1000, 10)
    if mode == "fsdp":
      specs = [x.sharding.spec for x in jax.tree.leaves(state)]
      assert P(None, "data") in specs or P("data") in specs
      assert any(s == P() for s in specs)  # small arrays stay replicated
      sharded = [x for x in jax.tree.leaves(state.opt_state) if x.sharding.spec != P()]
      assert sharded and all(x.addressable_shards[0].data.size * 8 == x.size for x in sharded)
    for _ in range(2):
      state, metrics = step(state, parallel.to_global(mesh, batch))
    results[mode] = (jax.device_get(state), jax.device_get(metrics), state, resolved)
  (rep, m_rep, rep_live, resolved), (fsdp, m_fsdp, fsdp_live, _) = results["replicated"], results["fsdp"]
  np.testing.assert_allclose(m_fsdp["loss"], m_rep["loss"], rtol=1e-5)
  np.testing.assert_allclose(m_fsdp["grad_norm"], m_rep["grad_norm"], rtol=1e-5)
  assert_trees_close(without_key_bias(fsdp.params), without_key_bias(rep.params), rtol=1e-4, atol=1e-6)
  assert_trees_close(fsdp.opt_state, rep.opt_state, rtol=1e-4, atol=1e-6)
  assert_trees_close(fsdp.batch_stats, rep.batch_stats, rtol=1e-4, atol=1e-6)
  # Cross-layout restore: saved replicated -> restored into the FSDP layout, and back.
  for saved, target, where in ((rep_live, fsdp_live, "a"), (fsdp_live, rep_live, "b")):
    manager = ckpt_lib.Manager(str(tmp_path / where), resolved)
    manager.save(2, saved)
    manager.wait()
    restored = manager.restore(2, target)
    for a, b, t in zip(jax.tree.leaves(restored), jax.tree.leaves(saved), jax.tree.leaves(target)):
      assert a.sharding == t.sharding
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
