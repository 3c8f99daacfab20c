"""Process-level set-up: jax.distributed initialization and turning user errors into one-line exits."""

from __future__ import annotations

import contextlib
import os
import sys

from absl import flags

_COORDINATOR = None
_NUM_PROCESSES = None
_PROCESS_ID = None


def define_flags():
  global _COORDINATOR, _NUM_PROCESSES, _PROCESS_ID
  _COORDINATOR = flags.DEFINE_string(
      "coordinator_address", None, "host:port of process 0, for multi-process runs outside Cloud TPU")
  _NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "number of processes (with coordinator)")
  _PROCESS_ID = flags.DEFINE_integer("process_id", None, "this process's index (with coordinator)")


def initialize_from_flags() -> None:
  """Initializes jax.distributed when --coordinator_address is given. (Automatic Cloud TPU pod
  initialization is issue #4.)"""
  if _COORDINATOR is None or _COORDINATOR.value is None:
    return
  import jax
  jax.distributed.initialize(coordinator_address=_COORDINATOR.value, num_processes=_NUM_PROCESSES.value,
                             process_id=_PROCESS_ID.value)


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
  from ssl_jax.checkpoint import CheckpointError
  from ssl_jax.config import ConfigError
  from ssl_jax.data.pipeline import DataError
  from ssl_jax.evaluate.run import EvalError
  from ssl_jax.train import NonFiniteLossError
  try:
    yield
  except (ConfigError, DataError, CheckpointError, NonFiniteLossError, EvalError) as e:
    _exit_with(str(e))
