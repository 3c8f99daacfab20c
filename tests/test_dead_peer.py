"""A process of a two-process run killed mid-run (SIGKILL): the survivor stops within --peer_timeout seconds
with one `error:` line naming the vanished process and the last checkpoint, exit code 3, and leaves only
complete checkpoints (ssl_jax/peers.py). Without the watchdog it printed a Gloo traceback, hung about 80 s
in JAX's shutdown barrier and aborted (exit 134)."""

import pathlib
import re
import signal
import subprocess
import sys
import time

from conftest import REPO
from test_multihost import TRAIN_ARGS, _env, _free_port

PEER_TIMEOUT = 20
# The verdict comes within PEER_TIMEOUT by design; the margin absorbs a loaded machine (other test workers
# on the same cores) delaying the watchdog thread and the exit.
MARGIN = 10


def _wait_for(condition, timeout, what, procs, logs):
  deadline = time.monotonic() + timeout
  while not condition():
    for i, p in enumerate(procs):
      assert p.poll() is None, f"process {i} ended (rc {p.returncode}) before {what}: " + \
          logs[i].read_text()[-3000:]
    assert time.monotonic() < deadline, f"no {what} after {timeout}s: " + logs[0].read_text()[-3000:]
    time.sleep(0.2)


def _complete_steps(checkpoints: pathlib.Path):
  """The step directories, each required to be complete: orbax writes a checkpoint under a temporary name
  (STEP.orbax-checkpoint-tmp*) and renames it after writing its metadata and commit marker. (Restoring one
  would cost this test another 20 s; resuming from a checkpoint is tested in test_multihost.py.)"""
  steps = []
  for child in checkpoints.iterdir():
    if child.name.isdigit():
      assert (child / "_CHECKPOINT_METADATA").is_file() and (child / "commit_success.txt").is_file(), \
          f"{child} is incomplete: {sorted(c.name for c in child.iterdir())}"
      steps.append(int(child.name))
  return sorted(steps)


def test_killed_peer_stops_survivor_with_one_line(tmp_path):
  workdir = tmp_path / "run"
  checkpoints = workdir / "checkpoints"
  args = [a for a in TRAIN_ARGS if not a.startswith("--config.total_steps=")]
  args += ["--config.total_steps=100000", f"--workdir={workdir}", f"--peer_timeout={PEER_TIMEOUT}"]
  port = _free_port()
  outs = [tmp_path / f"out{i}.txt" for i in range(2)]
  errs = [tmp_path / f"err{i}.txt" for i in range(2)]
  procs = []
  try:
    for i in range(2):
      # Files, not pipes: orbax's INFO lines would fill a pipe nobody reads while the test waits.
      with outs[i].open("w") as out, errs[i].open("w") as err:
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "ssl_jax.main", *args, f"--coordinator_address=127.0.0.1:{port}",
             "--num_processes=2", f"--process_id={i}"], cwd=REPO, env=_env(4), text=True, stdout=out,
            stderr=err))
    # Only process 0 prints the step lines; the first checkpoint (step 2) follows its step 2 line.
    _wait_for(lambda: "step 2/" in outs[0].read_text(), 300, "step 2 line", procs, errs)
    _wait_for(lambda: checkpoints.is_dir() and any(c.name.isdigit() for c in checkpoints.iterdir()), 120,
              "checkpoint", procs, errs)
    killed_at = time.monotonic()
    procs[1].send_signal(signal.SIGKILL)
    try:
      procs[0].wait(timeout=PEER_TIMEOUT + 60)
    except subprocess.TimeoutExpired:
      raise AssertionError("survivor still running 60 s after --peer_timeout: " + errs[0].read_text()[-3000:])
    elapsed = time.monotonic() - killed_at
  finally:
    for p in procs:
      p.kill()
      p.wait()

  stderr = errs[0].read_text()
  assert procs[0].returncode == 3, stderr[-3000:]
  assert elapsed < PEER_TIMEOUT + MARGIN, f"survivor took {elapsed:.1f}s: " + stderr[-3000:]
  assert "Traceback" not in stderr and "Fatal Python error" not in stderr, stderr[-3000:]
  errors = [line for line in stderr.splitlines() if line.startswith("error:")]
  assert len(errors) == 1, stderr[-3000:]
  steps = _complete_steps(checkpoints)
  assert steps, "no complete checkpoint"
  assert re.search(r"\bprocess 1 of 2 stopped responding\b", errors[0]), errors[0]
  assert f"last checkpoint is step {steps[-1]} in {checkpoints}" in errors[0], (errors[0], steps)
