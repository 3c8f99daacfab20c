"""What a failure leaves behind: the non-finite guard over the whole state, checkpoint digests (a damaged
checkpoint is never used silently and never deleted), and bad workdirs rejected up front in one line."""

import json
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from conftest import REPO, flip_bytes
from ssl_jax import checkpoint as ckpt_lib
from ssl_jax import config as config_lib
from ssl_jax import guard, metrics, parallel, train
from ssl_jax.data.datasets import EMBEDDED_DATA_DIR
from test_train import tiny


def _all_finite(tree) -> bool:
  return all(np.all(np.isfinite(x)) for x in jax.tree.leaves(jax.device_get(tree))
             if np.issubdtype(np.asarray(x).dtype, np.floating))


# --- the non-finite guard ---------------------------------------------------------------------------

def test_diverging_run_keeps_only_finite_checkpoints(tmp_path):
  """The issue's recipe (LARS at lr 1e9, a checkpoint every step): the old guard read only the loss, so
  it saved states whose batch-norm variances and moments were already infinite. Now the run stops at the
  first step with anything non-finite, naming it, and every checkpoint kept restores finite."""
  cfg = tiny("simclr", EMBEDDED_DATA_DIR, total_steps=15, checkpoint_every_steps=1, keep_checkpoints=3)
  cfg.optimizer.base_learning_rate = 1e9
  with pytest.raises(train.NonFiniteError, match=r"non-finite values at step (\d+) in ") as info:
    train.train(cfg, str(tmp_path))
  bad_step = int(info.value.args[0].split("at step ")[1].split()[0])
  resolved = config_lib.resolve(cfg, 4000)
  manager = ckpt_lib.Manager(str(tmp_path), resolved, create=False)
  kept = manager.all_steps()
  assert kept and max(kept) == bad_step - 1, (kept, info.value)
  target, _ = train.create_train_state(resolved, train.methods.get(resolved), lambda s: 0.0, 10)
  target = parallel.replicate(parallel.make_mesh(), target)
  for step in kept:
    assert _all_finite(manager.restore(step, target)), f"checkpoint {step} holds non-finite values"


def test_nonfinite_update_is_skipped_when_asked():
  """skip_nonfinite_steps: a step whose loss, gradients or new state are not finite (here: NaN pixels)
  leaves parameters, optimizer state and batch statistics as they were; the step still counts, and the
  next good batch updates as usual."""
  cfg = tiny("simclr", EMBEDDED_DATA_DIR, skip_nonfinite_steps=3)
  mesh = parallel.make_mesh()
  cfg, method, state, step_fn, _, _ = train.build(cfg, mesh, 4000, 10)
  shape = (cfg.batch_size, 32, 32, 3)
  rng = np.random.default_rng(0)
  good = {"views": tuple(rng.normal(size=shape).astype(np.float32) for _ in range(2)),
          "label": np.arange(cfg.batch_size, dtype=np.int32) % 10,
          "index": np.arange(cfg.batch_size, dtype=np.int64)}
  bad = dict(good, views=tuple(np.full(shape, np.nan, np.float32) for _ in range(2)))
  before = jax.device_get(state)
  names = guard.names(None, state.params, state)
  state, m = step_fn(state, parallel.to_global(mesh, bad))
  after_bad = jax.device_get(state)
  assert int(after_bad.step) == 1
  flags = dict(zip(names, np.asarray(jax.device_get(m[train.FINITE]))))
  # The loss stays finite here (NaN features vanish behind the projector's batch norm), while the
  # encoder's gradients and statistics are NaN: the case a loss-only guard let through.
  assert not flags["gradient of params.encoder"] and not flags["batch_stats.encoder"], flags
  for field in ("params", "batch_stats", "opt_state"):
    for a, b in zip(jax.tree.leaves(getattr(before, field)), jax.tree.leaves(getattr(after_bad, field))):
      if np.issubdtype(a.dtype, np.floating):  # the optimizer's step count advances with the step
        np.testing.assert_array_equal(a, b)
  state, m = step_fn(state, parallel.to_global(mesh, good))
  assert np.all(jax.device_get(m[train.FINITE]))
  moved = jax.device_get(state.params["encoder"])
  assert any(not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(before.params["encoder"]),
                                                     jax.tree.leaves(moved)))


def _flags(names, bad=()):
  return {train.FINITE: np.array([n not in bad for n in names])}


def test_finite_watch_names_the_first_bad_part_and_counts_skips():
  names = ["loss", "gradient of params.encoder", "params.encoder", "batch_stats.encoder", "opt_state"]
  stop = train._FiniteWatch(names, skip_limit=0, workdir="W")
  assert stop.check([_flags(names), _flags(names)], step=12, last_saved=10) == 0
  fetched = [_flags(names), _flags(names, bad=("batch_stats.encoder", "opt_state"))]
  with pytest.raises(train.NonFiniteError, match=r"at step 14 in batch_stats\.encoder \(also opt_state\);"
                     r".*last good checkpoint \(step 12\) is kept in W"):
    stop.check(fetched, step=14, last_saved=12)
  skip = train._FiniteWatch(names, skip_limit=2, workdir="W")
  assert skip.check([_flags(names, bad=("loss",)), _flags(names)], step=2, last_saved=0) == 1
  assert skip.check([_flags(names, bad=("gradient of params.encoder",))], step=3, last_saved=0) == 1
  with pytest.raises(train.NonFiniteError, match=r"2 steps in a row \(steps 3-4\).*first in gradient of "
                     r"params\.encoder"):
    skip.check([_flags(names, bad=("loss",))], step=4, last_saved=0)


# --- checkpoint digests ------------------------------------------------------------------------------

def test_digest_is_layout_independent_and_sees_one_changed_word():
  mesh = parallel.make_mesh()
  x = np.random.default_rng(0).normal(size=(64, 48)).astype(np.float32)
  tree = {"w": x, "b": np.arange(5, dtype=np.int32), "h": jnp.asarray(x[:3], jnp.bfloat16)}
  plain = ckpt_lib.state_digest(tree)
  replicated = ckpt_lib.state_digest(parallel.replicate(mesh, tree))
  sharded = dict(tree, w=jax.device_put(x, parallel.batch_sharded(mesh)))
  assert plain == replicated == ckpt_lib.state_digest(sharded)
  y = x.copy()
  y[17, 3] = np.nextafter(y[17, 3], np.float32(np.inf))  # one bit of one value
  changed = ckpt_lib.state_digest(dict(tree, w=y))
  assert changed["['w']"] != plain["['w']"] and changed["['b']"] == plain["['b']"]
  swapped = x.copy()
  swapped[[0, 1]] = swapped[[1, 0]]  # same values, other places
  assert ckpt_lib.state_digest(dict(tree, w=swapped))["['w']"] != plain["['w']"]


def _manager(path, keep=3):
  return ckpt_lib.Manager(None, ml_collections.ConfigDict({"keep_checkpoints": keep}), directory=str(path))


def _state(seed):
  rng = np.random.default_rng(seed)  # random, so the stored chunks do not compress away
  return {"w": rng.normal(size=(256, 256)).astype(np.float32), "step": np.asarray(seed, np.int32)}


def test_damaged_checkpoint_is_named_moved_aside_and_the_newest_intact_one_used(tmp_path, capsys):
  manager = _manager(tmp_path / "ckpt")
  for step in (1, 2, 3):
    manager.save(step, _state(step))
  flip_bytes(tmp_path / "ckpt" / "3")
  fresh = _manager(tmp_path / "ckpt")
  with pytest.raises(ckpt_lib.DamagedCheckpointError, match="step 3 .* is damaged"):
    fresh.restore(3, _state(0))
  state, step = fresh.restore_latest(_state(0))
  assert step == 2 and np.array_equal(state["w"], _state(2)["w"])
  warning = capsys.readouterr().err
  assert "WARNING: checkpoint step 3" in warning and "resuming from the newest intact checkpoint, step 2" in warning
  # Kept, out of the way of the manager (which would otherwise resume from it, or keep it instead of a
  # good one when it prunes to keep_checkpoints).
  assert fresh.all_steps() == [1, 2]
  assert (tmp_path / "ckpt_damaged" / "3" / "state").is_dir()


def test_no_intact_checkpoint_stops_in_one_line_and_moves_nothing(tmp_path):
  manager = _manager(tmp_path / "ckpt")
  for step in (1, 2):
    manager.save(step, _state(step))
  for step in (1, 2):
    flip_bytes(tmp_path / "ckpt" / str(step))
  with pytest.raises(ckpt_lib.DamagedCheckpointError, match=r"no intact checkpoint .* steps \[1\] are damaged too") as info:
    _manager(tmp_path / "ckpt").restore_latest(_state(0))
  assert "\n" not in str(info.value)
  assert sorted(p.name for p in (tmp_path / "ckpt").iterdir() if p.name.isdigit()) == ["1", "2"]


def test_checkpoint_of_another_config_is_a_mismatch_not_damage(tmp_path):
  manager = _manager(tmp_path / "ckpt")
  manager.save(1, _state(1))
  other = {"w": np.zeros((256, 128), np.float32), "step": np.asarray(0, np.int32)}
  with pytest.raises(ckpt_lib.MismatchedCheckpointError, match="another config"):
    _manager(tmp_path / "ckpt").restore_latest(other)
  assert (tmp_path / "ckpt" / "1").is_dir() and not (tmp_path / "ckpt_damaged").exists()


def test_metrics_rows_survive_a_partial_last_line(tmp_path):
  path = tmp_path / "metrics.jsonl"
  path.write_text(json.dumps({"step": 1, "loss": 1.0}) + "\n" + json.dumps({"step": 2, "loss": 0.5}) + "\n"
                  + '{"step": 3, "lo')  # a process killed mid-write
  metrics.Writer(str(tmp_path), resume_step=2).close()
  assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [1, 2]


# --- workdirs and paths, up front ---------------------------------------------------------------------

def _main(args, timeout=120):
  env = dict(os.environ)
  env.pop("TF_CPP_MIN_LOG_LEVEL", None)  # what a user's shell has: the libraries' own defaults
  return subprocess.run([sys.executable, "-m", "ssl_jax.main", *args], cwd=REPO, env=env, text=True,
                        capture_output=True, timeout=timeout)


TINY = ["--config=configs/simclr.py:cifar10,tiny", f"--config.data_dir={EMBEDDED_DATA_DIR}"]


def _only_error_line(proc, message):
  assert proc.returncode == 2, proc.stderr[-2000:]
  lines = [line for line in proc.stderr.splitlines() if line.strip()]
  assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], proc.stderr[-2000:]


def _byol_config_json(workdir):
  saved = config_lib.resolve(config_lib.load(f"{REPO}/configs/byol.py:cifar10,tiny"), 4000).to_dict()
  workdir.mkdir()
  (workdir / "config.json").write_text(json.dumps(saved, default=str))


@pytest.mark.parametrize("case", ["file", "under_file", "read_only", "other_method", "missing"])
def test_bad_workdir_stops_in_one_line_before_the_state_is_built(case, tmp_path):
  if case == "file":
    (tmp_path / "w").write_text("x")
    args, message = [f"--workdir={tmp_path / 'w'}"], "is a file, not a directory"
  elif case == "under_file":
    (tmp_path / "f").write_text("x")
    args, message = [f"--workdir={tmp_path / 'f' / 'w'}"], "which is a file, not a directory"
  elif case == "read_only":
    # Root writes through permission bits, so as root a directory of procfs stands in for a read-only one.
    ro = pathlib.Path("/proc/1") if os.geteuid() == 0 else tmp_path / "ro"
    if os.geteuid() != 0:
      ro.mkdir()
      ro.chmod(0o555)
    args, message = [f"--workdir={ro}"], "is not writable"
  elif case == "other_method":
    _byol_config_json(tmp_path / "w")
    args, message = [f"--workdir={tmp_path / 'w'}"], "holds a byol run on cifar10"
  else:
    args, message = [], "--workdir is required"
  proc = _main(TINY + args)
  _only_error_line(proc, message)
  assert not (tmp_path / "w" / "checkpoints").exists()


def test_unknown_nested_key_is_one_plain_line(tmp_path):
  proc = _main(TINY + [f"--workdir={tmp_path / 'w'}", "--config.optimizer.learning_rate=1"])
  _only_error_line(proc, "unknown config key 'learning_rate'; Did you mean \"end_learning_rate\"")
  assert "\\n" not in proc.stderr and "\\'" not in proc.stderr
