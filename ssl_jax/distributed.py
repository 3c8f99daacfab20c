"""Process-level set-up: jax.distributed initialization and turning user errors into one-line exits.

Exit codes of the entry points: 0 done, 2 bad input (one `error:` line), 3 a process of a multi-process
run vanished (one `error:` line naming it and the last checkpoint; see ssl_jax/peers.py)."""

from __future__ import annotations

import contextlib
import os
import sys
import threading
from typing import Optional

from absl import flags

from ssl_jax import peers
from ssl_jax.errors import UserError

_COORDINATOR = None
_NUM_PROCESSES = None
_PROCESS_ID = None
_TIMEOUT = None
_PEER_TIMEOUT = None
DEFAULT_PEER_TIMEOUT = 60


def define_flags():
  global _COORDINATOR, _NUM_PROCESSES, _PROCESS_ID, _TIMEOUT, _PEER_TIMEOUT
  _COORDINATOR = flags.DEFINE_string(
      "coordinator_address", None, "host:port of process 0, for multi-process runs outside Cloud TPU")
  _NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "number of processes (with coordinator)")
  _PROCESS_ID = flags.DEFINE_integer("process_id", None, "this process's index (with coordinator)")
  _TIMEOUT = flags.DEFINE_integer("initialization_timeout", 120,
                                  "seconds to wait for every process to join before failing")
  # At least 5 s: the watchdog's heartbeat period is a tenth of it, and a verdict needs several periods.
  _PEER_TIMEOUT = flags.DEFINE_integer(
      "peer_timeout", DEFAULT_PEER_TIMEOUT, "multi-process runs: seconds after which the other processes stop "
      "(exit code 3) when one process vanished (killed, host lost)", lower_bound=5)


def _on_multihost_tpu() -> bool:
  """A Cloud TPU VM that is one worker of several (its metadata lists the other workers)."""
  hosts = os.environ.get("TPU_WORKER_HOSTNAMES", "")
  return len([h for h in hosts.split(",") if h]) > 1


def initialize_from_flags() -> None:
  """Joins the processes of a multi-process run: explicitly with --coordinator_address (any cluster, or
  processes on one machine), automatically on a multi-host Cloud TPU slice, not at all otherwise.

  A process that cannot reach the coordinator, or a coordinator whose peers never arrive, fails with one
  line and exit code 2 after --initialization_timeout seconds (JAX itself would abort the process). Once
  joined, a watchdog thread (ssl_jax/peers.py) ends the run with exit code 3 within --peer_timeout seconds
  of one process vanishing; JAX's heartbeat timeout is set longer, so that its abort does not come first."""
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
  peer_timeout = _PEER_TIMEOUT.value if _PEER_TIMEOUT is not None else DEFAULT_PEER_TIMEOUT
  try:
    jax.distributed.initialize(initialization_timeout=timeout,
                               heartbeat_timeout_seconds=peers.heartbeat_timeout(peer_timeout), **kwargs)
  except Exception as e:  # e.g. an unparsable address or a refused connection
    _exit_with(f"jax.distributed.initialize failed ({where}): {_first_line(e)}")
  finally:
    watchdog.cancel()
  peers.start_watchdog(peer_timeout)


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
      # A KeyError's str() is the repr of its message ('\'key\'\nDid you mean ...'): use the message itself,
      # its lines joined, so the error reads as one plain line.
      # ml_collections wraps the KeyError in an AttributeError: unwrap it.
      while e.args and isinstance(e.args[0], BaseException):
        e = e.args[0]
      message = str(e.args[0]) if e.args else type(e).__name__
      message = "; ".join(line.strip() for line in message.splitlines() if line.strip()).strip(chr(34))
      _exit_with(f"unknown config key {message} (overrides given: {', '.join(overrides)})")
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


exit_with_error = _exit_with  # for the entry points: bad input is one line on stderr and exit code 2


_HELD_VERBOSITY = None


def hold_library_logs() -> None:
  """Holds back the libraries' start-up logs (JAX's backend probing, TensorFlow's C++ lines, TFDS and orbax
  INFO lines) until the input has been checked (release_library_logs), so that bad input prints its one
  error line and nothing else (TensorFlow's C++ lines: ssl_jax/__init__.py)."""
  global _HELD_VERBOSITY
  from absl import logging
  if _HELD_VERBOSITY is None:
    _HELD_VERBOSITY = logging.get_verbosity()
    logging.set_verbosity(logging.ERROR)


def release_library_logs() -> None:
  """Back to the verbosity before hold_library_logs (a no-op when nothing is held)."""
  global _HELD_VERBOSITY
  if _HELD_VERBOSITY is not None:
    from absl import logging
    logging.set_verbosity(_HELD_VERBOSITY)
    _HELD_VERBOSITY = None


def note_step(step: int) -> None:
  """The training loop's current step, for the line that reports a vanished process ("... at step N")."""
  peers.note_step(step)


@contextlib.contextmanager
def user_errors_exit(workdir: Optional[str] = None):
  """Errors caused by the user's input (config, data, checkpoints, a diverging loss) end the program with
  one line on stderr and exit code 2 instead of a traceback.

  In a multi-process run, a process that vanishes makes the others' next collective fail at once (JAX's
  Gloo "Connection reset by peer" on CPU); any other exception is therefore held until every peer has
  shown a sign of life (a few seconds; the exception is then re-raised as it was) or the watchdog has
  found one gone: then one line names it and the last checkpoint in `workdir`/checkpoints, and the
  process exits with code 3 without the atexit shutdown, which would hang for the vanished process."""
  peers.set_workdir(workdir)
  try:
    yield
  except UserError as e:
    _exit_with(str(e))
  except Exception:
    peers.after_exception()
    raise
