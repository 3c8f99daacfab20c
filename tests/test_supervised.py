"""Image-level evaluation protocols (paper linear probe, fine-tune, semi-supervised): the sharded step equals
the single-device step, the frozen probe leaves the encoder alone, the classifier learns, and the labelled
subsets are what the protocol says."""

import gzip
import hashlib
import json
import shutil

import jax
import numpy as np
import pytest

from conftest import REPO
from ssl_jax import config as config_lib
from ssl_jax import methods, optim, parallel
from ssl_jax.data import datasets, pipeline
from ssl_jax.data.datasets import EMBEDDED_DATA_DIR
from ssl_jax.evaluate import features, subsets, supervised


def tiny_config():
  cfg = config_lib.load(f"{REPO}/configs/simclr.py:cifar10,tiny")
  cfg.data_dir = EMBEDDED_DATA_DIR
  cfg.model.width = 8
  cfg.shuffle_buffer = 512
  return cfg


def random_batch(n=16, seed=0):
  rng = np.random.default_rng(seed)
  return {"image": rng.random((n, 32, 32, 3), dtype=np.float32), "label": rng.integers(0, 10, n).astype(np.int32)}


def run_steps(cfg, protocol, mesh, num_steps=2, sharding="replicated"):
  p = cfg.eval[protocol]
  method = methods.get(cfg)
  variables = method.evaluation_encoder().init(jax.random.key(0), np.zeros((1, 32, 32, 3), np.float32),
                                               train=False)
  schedule = optim.warmup_cosine(1.0, 0, 10)
  state, step_fn, _ = supervised.build(p, method, dict(variables), mesh, schedule,
                                       datasets.get("cifar10"), seed=0, sharding=sharding, fsdp_min_size=256)
  losses = []
  for i in range(num_steps):
    state, metrics = step_fn(state, parallel.to_global(mesh, random_batch(seed=i)))
    losses.append(float(metrics["loss"]))
  return jax.device_get(state), losses, variables


@pytest.mark.parametrize("protocol,head_batchnorm", [("finetune", False), ("paper_linear", False),
                                                     ("paper_linear", True)])
def test_sharded_step_equals_single_device(protocol, head_batchnorm):
  """head_batchnorm: MAE's probe head, whose batch statistics are the global batch's on any mesh."""
  cfg = tiny_config()
  cfg.eval[protocol].update(head_norm="batchnorm" if head_batchnorm else "none",
                            head_init_std=0.01 if head_batchnorm else 0.0)
  one, losses1, _ = run_steps(cfg, protocol, parallel.make_mesh(jax.devices()[:1]))
  eight, losses8, variables = run_steps(cfg, protocol, parallel.make_mesh())
  np.testing.assert_allclose(losses1, losses8, rtol=1e-5)
  for a, b in zip(jax.tree.leaves((one.params, one.batch_stats, one.head_stats)),
                  jax.tree.leaves((eight.params, eight.batch_stats, eight.head_stats))):
    # The normalized features reach the classifier at unit scale: its weights move more (up to ~0.3 at lr 1),
    # and float32 sums over 8 partial batches differ from one sum by a few 1e-6 of that.
    np.testing.assert_allclose(a, b, rtol=2e-4, atol=1e-5 if head_batchnorm else 2e-6)
  assert bool(jax.tree.leaves(one.head_stats)) == head_batchnorm
  if protocol == "paper_linear":
    # Frozen: the encoder is not among the trained parameters and keeps its weights and BN statistics.
    assert set(one.params) == {"head"}
    for a, b in zip(jax.tree.leaves((one.frozen, one.batch_stats)),
                    jax.tree.leaves((variables["params"], variables["batch_stats"]))):
      np.testing.assert_array_equal(a, b)
  else:
    assert set(one.params) == {"encoder", "head"}
    changed = [not np.allclose(a, b) for a, b in zip(jax.tree.leaves(one.batch_stats),
                                                       jax.tree.leaves(variables["batch_stats"]))]
    assert all(changed)  # batch norm ran in training mode and updated every running statistic


@pytest.mark.parametrize("protocol", ["finetune", "paper_linear"])
def test_fsdp_equals_replicated(protocol):
  """The protocols under config.sharding="fsdp": the encoder (trained or frozen) and the optimizer state
  split over 8 devices, the same losses and parameters as replicated."""
  cfg = tiny_config()
  rep, losses_rep, _ = run_steps(cfg, protocol, parallel.make_mesh())
  fsdp, losses_fsdp, _ = run_steps(cfg, protocol, parallel.make_mesh(), sharding="fsdp")
  np.testing.assert_allclose(losses_fsdp, losses_rep, rtol=1e-5)
  for a, b in zip(jax.tree.leaves((fsdp.params, fsdp.batch_stats)), jax.tree.leaves((rep.params, rep.batch_stats))):
    np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-6)
  method = methods.get(cfg)
  variables = method.evaluation_encoder().init(jax.random.key(0), np.zeros((1, 32, 32, 3), np.float32),
                                               train=False)
  state, _, _ = supervised.build(cfg.eval[protocol], method, dict(variables), parallel.make_mesh(),
                                 optim.warmup_cosine(1.0, 0, 10), datasets.get("cifar10"), seed=0,
                                 sharding="fsdp", fsdp_min_size=256)
  encoder = state.params["encoder"] if protocol == "finetune" else state.frozen
  assert any(x.sharding.spec != jax.sharding.PartitionSpec() for x in jax.tree.leaves(encoder))


def test_batchnorm_head_is_maes():
  """NormLinear("batchnorm") against the direct formula: training mode normalizes with the batch's mean and biased
  variance (eps 1e-6, no scale or shift) and moves the running statistics by 0.1; inference mode reads them."""
  rng = np.random.default_rng(0)
  h = (5.0 * rng.normal(size=(32, 6)) + 2.0).astype(np.float32)
  p = config_lib.supervised_protocol(head_norm="batchnorm", head_init_std=0.01)
  head = supervised.classifier_head(p, 4)
  variables = head.init(jax.random.key(0), np.zeros((1, 6), np.float32), train=False)
  assert set(variables["params"]) == {"linear"}  # no affine parameters in the normalization
  kernel = np.asarray(variables["params"]["linear"]["kernel"], np.float64)
  assert 0.005 < kernel.std() < 0.015 and not np.any(variables["params"]["linear"]["bias"])
  logits, stats = supervised.apply_head(head, variables["params"], variables["batch_stats"], h, train=True)
  x = h.astype(np.float64)
  normed = (x - x.mean(0)) / np.sqrt(x.var(0) + 1e-6)
  np.testing.assert_allclose(logits, normed @ kernel, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(stats["bn"]["mean"], 0.1 * x.mean(0), rtol=1e-5)
  np.testing.assert_allclose(stats["bn"]["var"], 0.9 + 0.1 * x.var(0), rtol=1e-5)
  test_logits, same = supervised.apply_head(head, variables["params"], stats, h[:3], train=False)
  expected = (x[:3] - 0.1 * x.mean(0)) / np.sqrt(0.9 + 0.1 * x.var(0) + 1e-6) @ kernel
  np.testing.assert_allclose(test_logits, expected, rtol=1e-4, atol=1e-5)
  assert same is stats


def test_paper_linear_on_raw_pixels_learns():
  cfg = tiny_config()
  p = cfg.eval.paper_linear
  p.update(total_steps=60, batch_size=256, log_every_steps=60, base_learning_rate=0.4)
  r = supervised.train_and_score(cfg, "paper_linear", None, None, parallel.make_mesh(), 1.0, 1.0, "raw",
                                 represent=lambda params, batch_stats, x: features.raw_pixels(x))
  assert r["steps"] == 60 and r["num_labelled"] == 4000
  assert r["top1"] > 0.2, r  # chance is 0.1; the fast probe on raw pixels scores about 0.31
  assert r["top5"] > r["top1"]


@pytest.mark.parametrize("head_batchnorm", [False, True])
def test_interrupted_run_resumes_to_the_same_result(tmp_path, head_batchnorm):
  """With MAE's head, its batch statistics come back from the checkpoint too."""
  cfg = tiny_config()
  cfg.eval.paper_linear.update(total_steps=4, batch_size=64, log_every_steps=1, checkpoint_every_steps=2,
                               head_norm="batchnorm" if head_batchnorm else "none")
  raw = lambda params, batch_stats, x: features.raw_pixels(x)

  def run(directory):
    return supervised.train_and_score(cfg, "paper_linear", None, None, parallel.make_mesh(), 1.0, 1.0, "raw",
                                      represent=raw, checkpoint_dir=str(directory))

  whole = run(tmp_path / "a")
  run(tmp_path / "b")
  shutil.rmtree(tmp_path / "b" / "4")  # as if killed between the checkpoints at steps 2 and 4
  assert sorted(p.name for p in (tmp_path / "b").iterdir()) == ["2"]
  resumed = run(tmp_path / "b")
  for key in ("top1", "top5", "final_train_loss"):
    assert resumed[key] == whole[key], key


def test_balanced_subset_is_deterministic_and_class_balanced():
  labels = np.repeat(np.arange(10), 400)
  a = subsets.balanced_indices(labels, 0.01, seed=0)
  assert np.bincount(labels[a]).tolist() == [4] * 10
  np.testing.assert_array_equal(a, subsets.balanced_indices(labels, 0.01, seed=0))
  assert not np.array_equal(a, subsets.balanced_indices(labels, 0.01, seed=1))
  assert len(subsets.balanced_indices(labels, 0.001, seed=0)) == 10  # at least one per class


def test_subset_stream_reads_only_the_subset():
  cfg = tiny_config()
  builder = pipeline.get_builder(cfg.dataset, cfg.data_dir)
  keep, n, _ = subsets.subset_filter("cifar10", builder, "train", 0.01, seed=0)
  chosen = set(subsets.balanced_indices(subsets.train_labels(builder, "train"), 0.01, seed=0).tolist())
  assert n == 40 and len(chosen) == 40
  batches = pipeline.pretrain_batches(cfg, [supervised.train_view(32, (0.08, 1.0))], 32, split="train",
                                      keep=keep)
  seen = set()
  for _ in range(3):
    seen |= set(next(batches)["index"].tolist())
  assert seen == chosen  # 96 draws from 40 examples: every one of them, and nothing else


def test_imagenet_subset_lists_are_simclrs():
  names = subsets.imagenet_file_names(0.01)
  assert len(names) == 12811 and len(set(names)) == 12811 and names[0] == "n04235860_14959.JPEG"
  assert len(subsets.imagenet_file_names(0.1)) == 128116
  # sha256 of the published text files (google-research/simclr imagenet_subsets/, commit 383d4143).
  digests = {f: hashlib.sha256(gzip.open(subsets.IMAGENET_SUBSETS_DIR / f).read()).hexdigest()[:16]
             for f in ("1percent.txt.gz", "10percent.txt.gz")}
  assert digests == {"1percent.txt.gz": "71e82a48ba782526", "10percent.txt.gz": "6d09de11e7bdaf5b"}
  with pytest.raises(subsets.SubsetError, match="published with SimCLR"):
    subsets.imagenet_file_names(0.05)


def test_saved_config_keeps_tuples_so_flags_can_override_them():
  cfg = tiny_config()
  loaded = config_lib.with_defaults(json.loads(json.dumps(cfg.to_dict())))  # as read from config.json
  assert loaded.eval.semi.label_fractions == (0.01, 0.1) and isinstance(loaded.eval.semi.epochs, tuple)
  assert loaded.views.view.crop_scale == (0.08, 1.0)
