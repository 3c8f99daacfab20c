"""Evaluation protocols: correctness on synthetic features, model selection that never reads the test
split, exactly-once padding at 1 and 8 devices, end to end, and bad input."""

import json
import os
import pathlib
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest

from conftest import REPO
from ssl_jax import config as config_lib
from ssl_jax import parallel, train
from ssl_jax.data.datasets import EMBEDDED_DATA_DIR
from ssl_jax.evaluate import features, knn, linear, run


def separable(n_per_class=60, num_classes=4, dim=16, seed=0, noise=0.3):
  rng = np.random.default_rng(seed)
  centers = rng.normal(size=(num_classes, dim)) * 3
  y = np.repeat(np.arange(num_classes), n_per_class)
  x = centers[y] + noise * rng.normal(size=(len(y), dim))
  perm = rng.permutation(len(y))
  return x[perm].astype(np.float32), y[perm].astype(np.int32)


def test_knn_separable_is_perfect_and_shuffled_is_chance():
  x, y = separable(n_per_class=100)
  tx, ty = x[:40] + 0.01, y[:40]
  acc = knn.knn_accuracy(x[40:], y[40:], tx, ty, ks=(1, 10, 20), num_classes=4)
  assert acc == {"knn_top1_k1": 1.0, "knn_top1_k10": 1.0, "knn_top1_k20": 1.0}
  # Labels unrelated to the features: chance (0.25), within a few standard errors (0.014).
  rng = np.random.default_rng(0)
  noise_x, noise_y = rng.normal(size=(2000, 16)), rng.integers(0, 4, 2000)
  test_x, test_y = rng.normal(size=(1000, 16)), rng.integers(0, 4, 1000)
  shuffled = knn.knn_accuracy(noise_x, noise_y, test_x, test_y, ks=(20,), num_classes=4)
  assert abs(shuffled["knn_top1_k20"] - 0.25) < 0.06


def test_knn_votes_match_direct_computation():
  rng = np.random.default_rng(5)
  mem, mem_y = rng.normal(size=(30, 6)).astype(np.float32), rng.integers(0, 3, 30)
  q = rng.normal(size=(7, 6)).astype(np.float32)
  pred = knn.knn_predict(mem, mem_y, q, ks=(5,), num_classes=3, temperature=0.07)[5]
  unit = lambda a: a / np.linalg.norm(a, axis=1, keepdims=True)
  for i in range(7):
    sim = unit(mem) @ unit(q[i:i + 1]).T
    top = np.argsort(-sim[:, 0])[:5]
    votes = np.zeros(3)
    for j in top:
      votes[mem_y[j]] += np.exp(sim[j, 0] / 0.07)
    assert pred[i] == np.argmax(votes)


def test_linear_probe_separable_and_shuffled():
  x, y = separable(n_per_class=100)
  tx, ty = separable(n_per_class=50, seed=0)
  out = linear.linear_probe(x, y, tx, ty, num_classes=4, steps=100)
  assert out["linear_top1"] == 1.0 and out["val_top1"] == 1.0
  rng = np.random.default_rng(1)
  shuffled = linear.linear_probe(x, rng.permutation(y), tx, ty, num_classes=4, steps=100)
  assert shuffled["linear_top1"] < 0.5


def test_linear_sweep_fits_on_a_stratified_sample_then_refits_on_everything():
  x, y = separable(n_per_class=100)
  tx, ty = separable(n_per_class=20)  # same class centres (seed), other noise draws
  full = linear.linear_probe(x, y, tx, ty, num_classes=4, steps=50)
  capped = linear.linear_probe(x, y, tx, ty, num_classes=4, steps=50, max_fit_examples=100)
  assert (full["num_val"], full["num_fit"]) == (40, 360)
  assert (capped["num_val"], capped["num_fit"]) == (40, 100)  # 25 of each class; same validation part
  assert capped["linear_top1"] == 1.0
  # The data a sweep fits on: a fit set sample whose class counts follow the fit set's.
  uneven = np.concatenate([np.flatnonzero(y == c)[:n] for c, n in enumerate((100, 100, 50, 10))])
  out = linear.select_hyperparameters(x[uneven], y[uneven], 4, steps=5, max_fit_examples=130)
  assert out["num_val"] == 10 + 10 + 5 + 1 and out["num_fit"] == 50 + 50 + 25 + 5


def test_linear_model_selection_never_reads_test_split():
  """The chosen setting and every validation score are identical whatever the test split holds."""
  x, y = separable(n_per_class=80, noise=3.0)
  tx, ty = separable(n_per_class=40, noise=3.0, seed=9)
  real = linear.linear_probe(x, y, tx, ty, num_classes=4, steps=60)
  garbage = linear.linear_probe(x, y, np.full_like(tx, np.nan), (ty + 1) % 4, num_classes=4, steps=60)
  for key in ("lr", "weight_decay", "val_top1", "val_top1_grid", "linear_train_top1"):
    assert real[key] == garbage[key], key
  assert garbage["linear_top1"] != real["linear_top1"]


def _extract(mesh, batch_size):
  cfg = config_lib.load(f"{REPO}/configs/simclr.py:cifar10,tiny")
  cfg.data_dir = EMBEDDED_DATA_DIR
  return features.extract(cfg, lambda x: features.raw_pixels(x)[:, :8] * 2.0, "test", mesh, batch_size)


def test_padding_counts_each_example_once_on_1_and_8_devices():
  x1, y1 = _extract(parallel.make_mesh(jax.devices()[:1]), 48)   # 1000 = 20 * 48 + 40: a padded batch
  x8, y8 = _extract(parallel.make_mesh(), 48)
  assert len(x1) == len(x8) == 1000
  assert np.bincount(y1).tolist() == [100] * 10
  np.testing.assert_array_equal(x1, x8)
  np.testing.assert_array_equal(y1, y8)


@pytest.fixture(scope="module")
def trained_workdir(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("run")
  cfg = config_lib.load(f"{REPO}/configs/simclr.py:cifar10,tiny")
  cfg.update(data_dir=EMBEDDED_DATA_DIR, batch_size=32, total_steps=2, checkpoint_every_steps=1,
             log_every_steps=1, shuffle_buffer=256)
  cfg.model.width = 8
  cfg.eval.linear_steps = 20
  train.train(cfg, str(workdir))
  return workdir


def test_evaluate_writes_results(trained_workdir):
  out = run.evaluate(str(trained_workdir), "knn", checkpoint="1")
  assert set(out["results"]) == {"ssl", "random_init", "raw_pixels"}
  assert out["num_train"] == 4000 and out["num_test"] == 1000 and out["step"] == 1
  saved = json.loads((trained_workdir / "eval" / "knn_1.json").read_text())
  assert saved["results"]["ssl"]["knn_top1_k20"] == out["results"]["ssl"]["knn_top1_k20"]
  assert saved["settings"]["knn_temperature"] == 0.07
  lin = run.evaluate(str(trained_workdir), "linear")
  assert lin["step"] == 2 and 0.0 <= lin["results"]["ssl"]["linear_top1"] <= 1.0
  rows = (trained_workdir / "eval" / "results.md").read_text().splitlines()
  assert len(rows) == 2 + 6 and "| simclr | 2 | linear | raw_pixels |" in rows[-1]


def _evaluate_cli(args):
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
  return subprocess.run([sys.executable, "-m", "ssl_jax.evaluate", *args], cwd=REPO, env=env, text=True,
                        capture_output=True, timeout=300)


def _corrupt(workdir):
  bad = workdir.parent / "corrupt"
  shutil.copytree(workdir, bad)
  shutil.rmtree(bad / "eval", ignore_errors=True)
  for f in (bad / "checkpoints" / "2" / "state").rglob("*"):
    if f.is_file() and f.stat().st_size > 100:
      f.write_bytes(b"\0" * 64)
  return bad


def test_semi_supervised_protocol_writes_results(trained_workdir):
  cfg = run.load_config(str(trained_workdir))
  cfg.eval.baselines = False
  cfg.eval.semi.update(label_fractions=(0.01, 0.1), epochs=(1.0, 1.0), batch_size=32, total_steps=2)
  out = run.evaluate(str(trained_workdir), "semi", cfg=cfg)
  ssl = out["results"]["ssl"]
  assert {"top1_1pct", "top1_10pct", "top5_1pct", "top5_10pct"} <= set(ssl)
  assert [r["num_labelled"] for r in ssl["runs"]] == [40, 400] and all(r["steps"] == 2 for r in ssl["runs"])
  saved = json.loads((trained_workdir / "eval" / "semi_2.json").read_text())
  assert saved["results"]["ssl"]["top1_1pct"] == ssl["top1_1pct"]
  assert saved["settings"]["semi"]["label_fractions"] == [0.01, 0.1]
  assert "| simclr | 2 | semi | ssl |" in (trained_workdir / "eval" / "results.md").read_text()


@pytest.mark.parametrize("case", ["missing_workdir", "no_config", "unknown_protocol", "protocol_twice",
                                  "missing_step", "corrupt", "no_labels", "eval_batch"])
def test_evaluate_bad_input(case, trained_workdir, tmp_path):
  workdir = trained_workdir
  args = ["--protocol=knn"]
  if case == "missing_workdir":
    workdir, message = tmp_path / "nope", "does not exist"
  elif case == "no_config":
    workdir, message = tmp_path, "config.json not found"
  elif case == "unknown_protocol":
    args, message = ["--protocol=knn,svm"], "unknown protocol 'svm'"
  elif case == "protocol_twice":
    args, message = ["--protocol=knn,linear,knn"], "names a protocol twice"
  elif case == "missing_step":
    args, message = ["--protocol=knn", "--checkpoint=7"], "no checkpoint at step 7"
  elif case == "corrupt":
    # Named explicitly (with "latest", evaluation falls back to the newest intact checkpoint, with a
    # warning: test_train.py's resume test).
    workdir, message = _corrupt(trained_workdir), "checkpoint step 2 in"
    args = ["--protocol=knn", "--checkpoint=2"]
  elif case == "eval_batch":
    # Every protocol's input is checked before the first one runs: kNN writes nothing either.
    args, message = ["--protocol=knn,finetune", "--config.eval.finetune.batch_size=12"], "is not divisible"
  else:
    no_labels = tmp_path / "tfds"
    shutil.copytree(EMBEDDED_DATA_DIR, no_labels)
    features_json = no_labels / "cifar10" / "3.0.2" / "features.json"
    spec = json.loads(features_json.read_text())
    del spec["featuresDict"]["features"]["label"]
    features_json.write_text(json.dumps(spec))
    args, message = ["--protocol=linear", f"--config.data_dir={no_labels}"], "has no labels"
  before = sorted(p.name for p in pathlib.Path(workdir).rglob("*")) if pathlib.Path(workdir).exists() else None
  proc = _evaluate_cli([f"--workdir={workdir}", *args])
  assert proc.returncode == 2, proc.stderr[-2000:]
  errors = [l for l in proc.stderr.splitlines() if l.startswith("error:")]
  assert len(errors) == 1 and message in errors[0], proc.stderr[-2000:]
  after = sorted(p.name for p in pathlib.Path(workdir).rglob("*")) if pathlib.Path(workdir).exists() else None
  assert before == after  # nothing written


def test_quickstart_end_to_end(tmp_path):
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
  proc = subprocess.run(
      [sys.executable, "-m", "ssl_jax.quickstart", f"--workdir={tmp_path}", "--config.total_steps=4",
       "--config.checkpoint_every_steps=2", "--config.batch_size=32", "--config.model.width=8",
       "--config.eval.linear_steps=20"], cwd=REPO, env=env, text=True, capture_output=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "| random_init |" in proc.stdout and "| raw_pixels |" in proc.stdout and "| ssl |" in proc.stdout
  assert (tmp_path / "quickstart.png").stat().st_size > 10_000
  assert "kNN (k=20) at step 4" in proc.stdout


def test_raw_pixels_is_the_image_up_to_32px_and_a_thumbnail_above():
  small = np.random.default_rng(0).normal(size=(2, 32, 32, 3)).astype(np.float32)
  np.testing.assert_array_equal(features.raw_pixels(small), small.reshape(2, -1))
  # 224x224 becomes a 32x32 thumbnail (3,072 features, not 150,528) that keeps smooth content.
  ramp = np.broadcast_to(np.linspace(0, 1, 224, dtype=np.float32)[None, :, None, None], (2, 224, 224, 3))
  thumb = np.asarray(features.raw_pixels(ramp)).reshape(2, 32, 32, 3)
  np.testing.assert_allclose(thumb, np.broadcast_to((np.arange(32) * 7 + 3)[None, :, None, None] / 223,
                                                    thumb.shape), atol=0.02)
