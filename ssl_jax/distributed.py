"""Process-level set-up: jax.distributed initialization and turning user errors into one-line exits."""

from __future__ import annotations

import contextlib
import os
import sys
import threading

from absl import flags

from ssl_jax.errors import UserError

_COORDINATOR = None
_NUM_PROCESSES = None
_PROCESS_ID = None
_TIMEOUT = None


def define_flags():
  global _COORDINATOR, _NUM_PROCESSES, _PROCESS_ID, _TIMEOUT
  _COORDINATOR = flags.DEFINE_string(
      "coordinator_address", None, "host:port of process 0, for multi-process runs outside Cloud TPU")
  _NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "number of processes (with coordinator)")
  _PROCESS_ID = flags.DEFINE_integer("process_id", None, "this process's index (with coordinator)")
  _TIMEOUT = flags.DEFINE_integer("initialization_timeout", 120,
                                  "seconds to wait for every process to join before failing")


def _on_multihost_tpu() -> bool:
  """A Cloud TPU VM that is one worker of several (its metadata lists the other workers)."""
  hosts = os.environ.get("TPU_WORKER_HOSTNAMES", "")
  return len([h for h in hosts.split(",") if h]) > 1


def initialize_from_flags() -> None:
  """Joins the processes of a multi-process run: explicitly with --coordinator_address (any cluster, or
  processes on one machine), automatically on a multi-host Cloud TPU slice, not at all otherwise.

  A process that cannot reach the coordinator, or a coordinator whose peers never arrive, fails with one
  line and exit code 2 after --initialization_timeout seconds (JAX itself would abort the process)."""
  explicit = _COORDINATOR is not None and _COORDINATOR.value is not None
  if not explicit and not _on_multihost_tpu():
    return
  import jax
  timeout = _TIMEOUT.value if _TIMEOUT is not None else 120
  if explicit:
    if _NUM_PROCESSES.value is None or _PROCESS_ID.value is None:
      _exit_with("--coordinator_address needs --num_processes and --process_id")
    if not 0 <= _PROCESS_ID.value < _NUM_PROCESSES.value:
      _exit_with(f"--process_id={_PROCESS_ID.value} is not in [0, --num_processes={_NUM_PROCESSES.value})")
    kwargs = dict(coordinator_address=_COORDINATOR.value, num_processes=_NUM_PROCESSES.value,
                  process_id=_PROCESS_ID.value)
    where = f"coordinator {_COORDINATOR.value}, {_NUM_PROCESSES.value} processes"
  else:
    kwargs, where = {}, "Cloud TPU slice"
  # JAX aborts the whole process (no exception) when peers do not arrive in time; a watchdog a little
  # shorter than that timeout turns it into a readable error.
  watchdog = threading.Timer(max(timeout - 5, 1), lambda: _exit_now(
      f"processes did not all join within {timeout}s ({where}); check that every process was started "
      "with the same --num_processes and can reach the coordinator"))
  watchdog.daemon = True
  watchdog.start()
  try:
    jax.distributed.initialize(initialization_timeout=timeout, **kwargs)
  except Exception as e:  # e.g. an unparsable address or a refused connection
    _exit_with(f"jax.distributed.initialize failed ({where}): {_first_line(e)}")
  finally:
    watchdog.cancel()


def _exit_now(message: str):
  print(f"error: {message}", file=sys.stderr, flush=True)
  os._exit(2)


def parse_flags_or_exit(argv):
  """absl flag parsing, with a bad flag, a bad config file or variant, or an override of a key that does
  not exist reported as one line and exit code 2 (ml_collections raises AttributeError for unknown keys,
  which absl would show as a traceback)."""
  overrides = [a.split("=", 1)[0][2:] for a in argv[1:] if a.startswith("--config.")]
  for arg in argv[1:]:
    if arg.startswith("--config="):
      path = arg.split("=", 1)[1].split(":", 1)[0]
      if not os.path.isfile(path):
        _exit_with(f"config file {path} not found (expected configs/<method>.py[:variant])")
  try:
    return flags.FLAGS(argv)
  except (flags.Error, AttributeError, KeyError, ValueError, TypeError) as e:
    if isinstance(e, (AttributeError, KeyError)):
      _exit_with(f"unknown config key {_first_line(e).strip(chr(34))} (overrides given: {', '.join(overrides)})")
    lines = [line for line in str(e).splitlines() if line.strip()]
    if "Traceback" in str(e):
      # A config file that raised: report the flag and the exception's own last line.
      exc_type, _, exc_message = lines[-1].partition(": ")
      _exit_with(f"{lines[0].rstrip(':')}: {exc_message or exc_type}")
    _exit_with(_first_line(e))


def _first_line(e) -> str:
  text = str(e).strip()
  return text.splitlines()[0] if text else type(e).__name__


def _exit_with(message: str):
  print(f"error: {message}", file=sys.stderr, flush=True)
  sys.exit(2)


@contextlib.contextmanager
def user_errors_exit():
  """Errors caused by the user's input (config, data, checkpoints, a diverging loss) end the program with
  one line on stderr and exit code 2 instead of a traceback."""
  try:
    yield
  except UserError as e:
    _exit_with(str(e))
