"""Process-level set-up: jax.distributed initialization and turning user errors into one-line exits."""

from __future__ import annotations

import contextlib
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


@contextlib.contextmanager
def user_errors_exit():
  """Errors caused by the user's input (config, data, checkpoints, a diverging loss) end the program with
  one line on stderr and exit code 2 instead of a traceback."""
  from ssl_jax.checkpoint import CheckpointError
  from ssl_jax.config import ConfigError
  from ssl_jax.data.pipeline import DataError
  from ssl_jax.train import NonFiniteLossError
  try:
    yield
  except (ConfigError, DataError, CheckpointError, NonFiniteLossError) as e:
    print(f"error: {e}", file=sys.stderr, flush=True)
    sys.exit(2)
