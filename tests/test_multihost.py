"""Several processes on 127.0.0.1 (the stand-in for TPU pod hosts), each with 4 simulated devices."""

import json
import os
import pathlib
import shutil
import socket
import subprocess
import sys

import jax
import ml_collections
import numpy as np
import pytest

from conftest import REPO, set_keys, xla_flags
from ssl_jax import checkpoint as ckpt_lib
from ssl_jax import config as config_lib
from ssl_jax import methods, optim, parallel, train
from ssl_jax.data.datasets import EMBEDDED_DATA_DIR
from ssl_jax.evaluate import run as eval_run

CONFIG = "configs/simclr.py:cifar10,tiny"
OVERRIDES = {"data_dir": EMBEDDED_DATA_DIR, "batch_size": 16, "model.width": 8, "total_steps": 4, "log_every_steps": 1,
             "checkpoint_every_steps": 2, "shuffle_buffer": 256}
TRAIN_ARGS = [f"--config={CONFIG}"] + [f"--config.{key}={value}" for key, value in OVERRIDES.items()]
TIMEOUT = 600


def _free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _env(devices):
  return dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", XLA_FLAGS=xla_flags(devices))


def run_processes(module, args, num_processes=2, devices=4, timeout=TIMEOUT):
  """Runs `python -m module args` as num_processes processes joined through a coordinator on loopback."""
  port = _free_port()
  procs = [subprocess.Popen(
      [sys.executable, "-m", module, *args, f"--coordinator_address=127.0.0.1:{port}",
       f"--num_processes={num_processes}", f"--process_id={i}"],
      cwd=REPO, env=_env(devices), text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
      for i in range(num_processes)]
  outs = []
  try:
    for p in procs:
      outs.append(p.communicate(timeout=timeout))
  finally:
    for p in procs:
      p.kill()
  for p, (_, err) in zip(procs, outs):
    assert p.returncode == 0, err[-3000:]
  return outs


def losses(workdir):
  return [(r["step"], r["total_loss"]) for r in
          map(json.loads, (pathlib.Path(workdir) / "metrics.jsonl").read_text().splitlines())]


def final_params(workdir):
  cfg = ml_collections.ConfigDict(json.loads((pathlib.Path(workdir) / "config.json").read_text()))
  method = methods.get(cfg)
  state, _ = train.create_train_state(cfg, method, optim.warmup_cosine(1.0, 0, 1), 10)
  state = parallel.replicate(parallel.make_mesh(), state)
  manager = ckpt_lib.Manager(str(workdir), cfg, create=False)
  return jax.device_get(manager.restore(manager.latest_step(), state).params)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  """A two-process run stopped at step 2 and resumed to step 4, and an uninterrupted one-process run on
  8 devices reading the same 2 input shards. The two-process run resumes fully sharded (config.sharding=
  "fsdp"): its replicated checkpoint restores into the split layout across the processes, and its steps
  must still equal the replicated one-process run's. (Each multi-process launch costs about a minute of the
  2 cores, so one pair of runs serves the three checks below.)"""
  root = tmp_path_factory.mktemp("multihost")
  run_processes("ssl_jax.main", TRAIN_ARGS + [f"--workdir={root / 'two'}", "--stop_at_step=2"])
  root.joinpath("steps_after_stop").write_text(json.dumps(
      ckpt_lib.Manager(str(root / "two"), config_lib.load(f"{REPO}/configs/simclr.py:cifar10,tiny"),
                       create=False).all_steps()))
  outs = run_processes("ssl_jax.main", TRAIN_ARGS + [f"--workdir={root / 'two'}", "--config.sharding=fsdp",
                                                     "--config.fsdp_min_size=256"])
  root.joinpath("resume_log").write_text(outs[0][1])
  # The one-process run in this (8-device) process: the same train.train as `python -m ssl_jax.main`, without
  # another interpreter's start-up.
  train.train(set_keys(config_lib.load(f"{REPO}/{CONFIG}"), dict(OVERRIDES, data_shards=2)), str(root / "one"))
  return root


def test_two_processes_equal_one_process_with_eight_devices(runs):
  two, one = losses(runs / "two"), losses(runs / "one")
  assert [s for s, _ in two] == [1, 2, 3, 4]
  assert json.loads((runs / "two" / "config.json").read_text())["sharding"] == "fsdp"
  np.testing.assert_allclose([l for _, l in two], [l for _, l in one], rtol=1e-5)
  for a, b in zip(jax.tree.leaves(final_params(runs / "two")), jax.tree.leaves(final_params(runs / "one"))):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_two_processes_stop_and_resume(runs):
  """The two-process run was stopped at step 2 (a checkpoint there, nothing later) and resumed from it;
  its losses over all 4 steps match the uninterrupted run (checked above)."""
  assert json.loads((runs / "steps_after_stop").read_text()) == [2]
  assert "resumed from step 2" in (runs / "resume_log").read_text()


def test_knn_and_semi_supervised_over_two_processes_equal_one_process(runs):
  """One launch of both protocols per side (--protocol=knn,semi). kNN: every test image once. Semi:
  fine-tuning on 10% of the labels (class-balanced subset, 2 input shards in both runs: the saved config
  has data_shards=2), batch norm over the global batch, test batches padded and masked."""
  settings = {"eval.baselines": False, "eval.semi.label_fractions": (0.1,), "eval.semi.epochs": (1.0,),
              "eval.semi.batch_size": 32, "eval.semi.total_steps": 2}
  workdir = str(runs / "one")

  def one_process():  # in this 8-device process, as `python -m ssl_jax.evaluate` runs them
    cfg = set_keys(eval_run.load_config(workdir), settings)
    for protocol in ("knn", "semi"):
      eval_run.evaluate(workdir, protocol, cfg=cfg)

  def two_processes():
    run_processes("ssl_jax.evaluate", [f"--workdir={workdir}", "--protocol=knn,semi"] +
                  [f"--config.{key}={value}" for key, value in settings.items()])

  knns, semis = [], []
  for launch in (one_process, two_processes):
    shutil.rmtree(runs / "one" / "eval", ignore_errors=True)  # no earlier results; semi trains afresh
    launch()
    knns.append(json.loads((runs / "one" / "eval" / "knn_4.json").read_text()))
    semis.append(json.loads((runs / "one" / "eval" / "semi_4.json").read_text())["results"]["ssl"])
  assert knns[1]["results"] == knns[0]["results"]
  assert knns[1]["num_test"] == knns[0]["num_test"] == 1000
  single, double = semis
  assert double["runs"][0]["num_labelled"] == single["runs"][0]["num_labelled"] == 400
  assert double["top1"] == single["top1"] and double["top5"] == single["top5"]
  np.testing.assert_allclose(double["runs"][0]["final_train_loss"], single["runs"][0]["final_train_loss"],
                             rtol=1e-5)


def test_missing_peer_fails_with_clear_error_in_bounded_time():
  proc = subprocess.run(
      [sys.executable, "-m", "ssl_jax.main", *TRAIN_ARGS, "--workdir=/tmp/never_written",
       f"--coordinator_address=127.0.0.1:{_free_port()}", "--num_processes=2", "--process_id=0",
       "--initialization_timeout=15"], cwd=REPO, env=_env(4), text=True, capture_output=True, timeout=120)
  assert proc.returncode == 2
  errors = [l for l in proc.stderr.splitlines() if l.startswith("error:")]
  assert len(errors) == 1 and "did not all join within 15s" in errors[0], proc.stderr[-2000:]
