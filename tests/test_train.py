"""End-to-end training: each config's tiny variant runs, resume is exact, SIGTERM and bad input are handled
(non-finite steps and damaged checkpoints: test_reliability.py)."""

import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from conftest import REPO, flip_bytes, killed_after, set_keys
from ssl_jax import checkpoint as ckpt_lib
from ssl_jax import config as config_lib
from ssl_jax import parallel, train
from ssl_jax.data.datasets import EMBEDDED_DATA_DIR
from ssl_jax.evaluate import run as eval_run
from ssl_jax.evaluate.workdir import EvalError


def tiny(name, data_dir, **overrides):
  cfg = config_lib.load(f"{REPO}/configs/{name}.py:cifar10,tiny")
  cfg.data_dir = data_dir
  cfg.batch_size = 16
  if "width" in cfg.model:
    cfg.model.width = 8
  cfg.total_steps = 3
  cfg.log_every_steps = 1
  cfg.checkpoint_every_steps = 2
  cfg.shuffle_buffer = 256
  if "queue_size" in cfg.method:
    cfg.method.queue_size = 64
  set_keys(cfg, overrides)
  return cfg


def read_metrics(workdir):
  return [json.loads(line) for line in (pathlib.Path(workdir) / "metrics.jsonl").read_text().splitlines()]


# SimCLR's tiny run and resume: test_resume_equals_uninterrupted (one compiled end-to-end run per method).
@pytest.mark.parametrize("name", ["byol", "moco_v2", "simsiam", "barlow_twins", "vicreg", "mae"])
def test_config_tiny_variant_runs_and_resumes_exactly(name, data_dir, tmp_path, monkeypatch):
  """Each config's tiny variant runs 3 steps end to end; with its last checkpoint removed, it resumes
  from step 2 and redoes step 3 to the same bits: parameters, optimizer state and the method's state
  (BYOL's target, MoCo's key encoder and queue). The resumed run reuses the compiled step."""
  # A relative workdir, as `make quickstart` passes (orbax itself only accepts absolute paths).
  monkeypatch.chdir(tmp_path)
  cfg = tiny(name, data_dir)
  out = train.train(cfg, "run")
  tmp_path = tmp_path / "run"
  rows = read_metrics(tmp_path)
  assert [r["step"] for r in rows] == [1, 2, 3]
  for key in ("loss", "learning_rate", "images_per_sec", "embedding_std", "probe_accuracy"):
    assert all(np.isfinite(r[key]) for r in rows), key
  assert out["step"] == 3
  saved = json.loads((tmp_path / "config.json").read_text())
  assert saved["method"]["name"] == out["config"].method.name and saved["total_steps"] == 3
  assert ckpt_lib.Manager(str(tmp_path), out["config"]).all_steps() == [2, 3]

  shutil.rmtree(tmp_path / "checkpoints" / "3")
  again = train.train(cfg, "run")
  assert again["step"] == 3
  assert [(r["step"], r["total_loss"]) for r in read_metrics(tmp_path)] == [(r["step"], r["total_loss"]) for r in rows]
  for a, b in zip(jax.tree.leaves(jax.device_get(out["state"])), jax.tree.leaves(jax.device_get(again["state"]))):
    np.testing.assert_array_equal(a, b)


def test_resume_equals_uninterrupted(tmp_path, capsys):
  """A run stopped at step 2 whose latest checkpoint (2) was then damaged resumes from checkpoint 1 and
  ends with exactly the losses and state of an uninterrupted run; the damaged checkpoint is moved aside,
  not deleted. Evaluation never uses it either, and moves nothing."""
  cfg = tiny("simclr", EMBEDDED_DATA_DIR, total_steps=4)
  whole = train.train(cfg, str(tmp_path / "whole"))
  cfg.checkpoint_every_steps = 1
  first = train.train(cfg, str(tmp_path / "resumed"), stop_at_step=2)
  assert first["step"] == 2
  flip_bytes(tmp_path / "resumed" / "checkpoints" / "2")
  encoder = eval_run.Encoder(config_lib.resolve(cfg, 4000), parallel.make_mesh())
  with pytest.raises(EvalError, match="step 2 .* is damaged"):
    encoder.restore(str(tmp_path / "resumed"), 2)
  assert encoder.restore_latest(str(tmp_path / "resumed"))[1] == 1
  assert (tmp_path / "resumed" / "checkpoints" / "2").is_dir()
  second = train.train(cfg, str(tmp_path / "resumed"))
  assert "resuming from the newest intact checkpoint, step 1" in capsys.readouterr().err
  assert (tmp_path / "resumed" / "checkpoints_damaged" / "2" / "state").is_dir()
  for key in ("loss", "learning_rate", "images_per_sec", "embedding_std", "probe_accuracy"):
    assert all(np.isfinite(r[key]) for r in read_metrics(tmp_path / "whole")), key
  losses_whole = [(r["step"], r["total_loss"]) for r in read_metrics(tmp_path / "whole")]
  losses_resumed = [(r["step"], r["total_loss"]) for r in read_metrics(tmp_path / "resumed")]
  assert losses_resumed == losses_whole  # exact: same batches, same keys, same arithmetic
  for a, b in zip(jax.tree.leaves(jax.device_get(whole["state"])), jax.tree.leaves(jax.device_get(second["state"]))):
    np.testing.assert_array_equal(a, b)


def test_dino_tiny_run_resumes_exactly(tmp_path):
  """DINO (tiny ViT, multi-crop, drop path) killed after step 2 and resumed ends exactly as an uninterrupted
  run: teacher, center, optimizer state and the step's random keys all come back from the checkpoint."""
  # Two blocks and two local crops: the compilation is most of this test's time (MoCo v3's end-to-end run is
  # test_vit_methods.py's).
  cfg = tiny("dino", EMBEDDED_DATA_DIR, total_steps=4, **{"model.depth": 2, "views.local.num": 2})
  assert cfg.model.drop_path_rate > 0 and len(cfg.views) == 3
  whole = train.train(cfg, str(tmp_path / "whole"))
  rows = read_metrics(tmp_path / "whole")
  assert [r["step"] for r in rows] == [1, 2, 3, 4]
  for key in ("loss", "teacher_entropy", "kl_teacher_student", "teacher_temperature", "probe_accuracy"):
    assert all(np.isfinite(r[key]) for r in rows), key
  second = train.train(cfg, str(killed_after(tmp_path / "whole", 2, tmp_path / "resumed")))
  timing = {"images_per_sec", "eta_seconds", "elapsed_seconds"}
  strip = lambda rs: [{k: v for k, v in r.items() if k not in timing} for r in rs]
  assert strip(read_metrics(tmp_path / "resumed")) == strip(rows)  # exact
  for a, b in zip(jax.tree.leaves(jax.device_get(whole["state"])), jax.tree.leaves(jax.device_get(second["state"]))):
    np.testing.assert_array_equal(a, b)


def test_steps_per_loop_matches_single_steps_and_resumes(tmp_path):
  """Loops of steps_per_loop steps in one call give the losses and parameters of single steps. A run stopped
  off the loop grid (step 3 of loops of 2) resumes with a single step to the next boundary, then loops.
  conv_impl=patches: the one whose input gradient had to be rewritten to run fast inside the loop."""
  cfg = tiny("simclr", EMBEDDED_DATA_DIR, total_steps=6, log_every_steps=2, checkpoint_every_steps=4)
  cfg.model.conv_impl = "patches"
  single = train.train(cfg, str(tmp_path / "single"))
  cfg.steps_per_loop = 2
  assert train.train(cfg, str(tmp_path / "looped"), stop_at_step=3)["step"] == 3
  looped = train.train(cfg, str(tmp_path / "looped"))
  want = {r["step"]: r["total_loss"] for r in read_metrics(tmp_path / "single")}
  got = {r["step"]: r["total_loss"] for r in read_metrics(tmp_path / "looped")}
  assert sorted(want) == [2, 4, 6] and sorted(got) == [2, 3, 4, 6]
  np.testing.assert_allclose([got[s] for s in want], list(want.values()), rtol=1e-5)
  for a, b in zip(jax.tree.leaves(jax.device_get(single["state"])), jax.tree.leaves(jax.device_get(looped["state"]))):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def _main(args):
  """ssl_jax.main in a subprocess, with the 8 simulated devices of conftest."""
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
  return subprocess.Popen([sys.executable, "-m", "ssl_jax.main", *args], cwd=REPO, env=env, text=True,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def test_sigterm_saves_and_exits_cleanly(tmp_path):
  workdir = tmp_path / "w"
  proc = _main(["--config=configs/simclr.py:cifar10,tiny", f"--config.data_dir={EMBEDDED_DATA_DIR}",
                f"--workdir={workdir}", "--config.batch_size=16", "--config.model.width=8",
                "--config.total_steps=100000", "--config.log_every_steps=1",
                "--config.checkpoint_every_steps=100000", "--config.shuffle_buffer=256"])
  deadline = time.time() + 300
  for line in proc.stdout:  # wait until training is under way
    if line.startswith("step 2/"):
      break
    assert time.time() < deadline
  proc.send_signal(signal.SIGTERM)
  _, stderr = proc.communicate(timeout=300)
  assert proc.returncode == 0, stderr[-2000:]
  steps = ckpt_lib.Manager(str(workdir), config_lib.resolve(tiny("simclr", EMBEDDED_DATA_DIR), 4000)).all_steps()
  assert len(steps) == 1 and 2 <= steps[0] < 100000
  assert read_metrics(workdir)[-1]["step"] == steps[0]


BAD_INPUTS = [
    (["--config.foo=1"], "unknown config key 'foo'"),
    (["--config.batch_size=12"], "not divisible by the 8 devices"),
    (["--config.method.temperature=0"], "temperature must be > 0"),
    (["--config.optimizer.base_learning_rate=-1"], "base_learning_rate must be > 0"),
    (["--config.dataset=mnist"], "unknown dataset 'mnist'"),
    (["--config.data_dir=/nonexistent/tfds"], "data_dir /nonexistent/tfds does not exist"),
    (["--config=configs/moco_v2.py:cifar10,tiny", "--config.method.queue_size=100", "--config.batch_size=64"],
     "queue_size=100 must be a multiple of batch_size=64"),
    (["--config=configs/simclr.py:cifar11"], "unknown config variant"),
    (["--config.model.conv_impl=cudnn"], "model.conv_impl must be xla, patches, winograd"),
    (["--config.steps_per_loop=3", "--config.log_every_steps=10"], "steps_per_loop=3 must be > 0 and divide"),
    (["--config.steps_per_loop=2", "--config.log_every_steps=10", "--config.checkpoint_every_steps=10"],
     "steps_per_loop=2 with model.conv_impl=xla is ~40x slower on CPU"),
]


@pytest.mark.parametrize("args,message", BAD_INPUTS, ids=[m for _, m in BAD_INPUTS])
def test_bad_input_fails_fast_with_one_line(args, message, tmp_path):
  workdir = tmp_path / "w"
  config = [a for a in args if a.startswith("--config=")] or ["--config=configs/simclr.py:cifar10,tiny"]
  overrides = [a for a in args if not a.startswith("--config=")]
  proc = _main(config + [f"--config.data_dir={EMBEDDED_DATA_DIR}", f"--workdir={workdir}"] + overrides)
  _, stderr = proc.communicate(timeout=120)
  assert proc.returncode == 2
  lines = [line for line in stderr.splitlines() if line.strip()]
  assert len(lines) == 1 and lines[0].startswith("error:") and message in lines[0], stderr[-2000:]
  assert not workdir.exists()  # failed before writing anything
