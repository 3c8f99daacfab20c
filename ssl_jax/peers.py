"""Noticing that a process of a multi-process run vanished (killed, its host lost) and stopping the others
within --peer_timeout seconds with one line on stderr and exit code 3.

Left to JAX (0.10.2), a survivor's next collective fails at once (a Gloo "Connection reset by peer"
JaxRuntimeError, shown as a traceback), and the process then hangs in the shutdown barrier of its atexit
`jax.distributed.shutdown` until the coordination service's heartbeat timeout (100 s by default), when the
service's error, polled by a C++ thread, aborts it ("Fatal Python error: Aborted", exit 134). JAX's own
means of finding out do not help: get_live_nodes is a collective that blocks until that same timeout, and
jaxlib's Python hook for the service's errors (missed_heartbeat_callback) cannot be called (std::bad_cast,
then abort). So each process keeps its own heartbeat in the coordination service's key-value store, a
watchdog thread reads everyone's, and jax.distributed.initialize is given a heartbeat timeout longer than
--peer_timeout, so that this verdict comes before JAX's abort.

Not covered: the death of process 0. It hosts the coordination service, and JAX aborts every other process
within a second of losing it, before any Python code can run.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from typing import Dict, Optional, Tuple

EXIT_CODE = 3  # a peer process vanished (bad input is 2)
_PREFIX = "ssl_jax/peers/"
_FAST_PERIOD = 0.25
_EXIT_LOCK = threading.Lock()

_watchdog: Optional["Watchdog"] = None
_workdir: Optional[str] = None
_step: Optional[int] = None


def heartbeat_timeout(peer_timeout: int) -> int:
  """The heartbeat timeout for jax.distributed.initialize: JAX aborts the survivors that much after a peer's
  last heartbeat, so it must come well after the watchdog's verdict (at most peer_timeout)."""
  return peer_timeout + max(30, peer_timeout // 2)


def set_workdir(workdir: Optional[str]) -> None:
  global _workdir
  if workdir:
    _workdir = workdir


def note_step(step: int) -> None:
  global _step
  _step = int(step)


def last_checkpoint(workdir: str) -> Tuple[str, Optional[int]]:
  """(WORKDIR/checkpoints, the newest complete step in it or None). Orbax writes a checkpoint under a
  temporary name and renames it when complete, so on a local disk an integer name means complete; on
  object stores (no rename) it writes commit_success.txt last, which is required there."""
  from etils import epath
  local = "://" not in workdir
  directory = epath.Path(os.path.abspath(workdir) if local else workdir) / "checkpoints"
  steps = []
  try:
    for child in directory.iterdir():
      if child.name.isdigit() and (local or (child / "commit_success.txt").exists()):
        steps.append(int(child.name))
  except OSError:
    pass
  return str(directory), max(steps, default=None)


def _describe(lost, num_processes: int, silent_s: float, peer_timeout: int) -> str:
  names = ", ".join(str(p) for p in lost)
  who = f"process {names}" if len(lost) == 1 else f"processes {names}"
  at = f" at step {_step}" if _step is not None else ""
  message = (f"{who} of {num_processes} stopped responding{at} (no heartbeat for {silent_s:.0f}s, "
             f"--peer_timeout={peer_timeout})")
  if _workdir is None:
    return message
  directory, step = last_checkpoint(_workdir)
  if step is None:
    return f"{message}; no checkpoint was saved yet in {directory}"
  return (f"{message}; the last checkpoint is step {step} in {directory} (re-run the same command on every "
          "process to resume)")


def exit_peer_lost(message: str) -> None:
  """One line on stderr and exit code 3, at once: os._exit skips the atexit `jax.distributed.shutdown`,
  whose barrier would wait for the vanished process until JAX aborts. Nothing is left half-written:
  orbax renames a checkpoint only when complete and metrics.jsonl is appended a line at a time."""
  with _EXIT_LOCK:  # one line even when the watchdog and the main thread get here together
    try:
      sys.stdout.flush()
    except Exception:  # a closed or broken stdout must not keep the process alive
      pass
    print(f"error: {message}", file=sys.stderr, flush=True)
    os._exit(EXIT_CODE)


class Watchdog:
  """A daemon thread that writes this process's heartbeat to the coordination service's key-value store
  every `interval` seconds and reads everyone's; a process whose heartbeat has not changed for `threshold`
  seconds is declared gone. With the reading and writing periods and the time process 0 lingers (see
  _declare), the verdict comes at most peer_timeout seconds after the death.

  A heartbeat is "BEAT ECHO": a counter, and for each process the latest question (ASK, see
  wait_for_signs_of_life) read from it. An answered question proves that the peer was alive after it was
  asked; a changed counter alone does not (it may have been written just before the peer died and read
  just after).

  A live process is declared gone only when its watchdog thread cannot run for about threshold - interval
  seconds (40 s with the default --peer_timeout=60): JAX releases the GIL while it computes, compiles and
  waits on devices."""

  def __init__(self, client, process_id: int, num_processes: int, peer_timeout: int):
    self.client = client
    self.process_id = process_id
    self.num_processes = num_processes
    self.peer_timeout = peer_timeout
    self.interval = min(5.0, max(0.5, peer_timeout / 10))
    self.threshold = peer_timeout - 3 * self.interval
    now = time.monotonic()
    self.peers = [p for p in range(num_processes) if p != process_id]
    # peer -> (its last heartbeat seen, when it changed by this process's clock: no clock sync needed)
    self.seen: Dict[int, Tuple[Optional[str], float]] = {p: (None, now) for p in self.peers}
    self.answered = {p: 0 for p in self.peers}  # the latest of this process's questions each peer echoed
    self.asks = [0] * num_processes  # the latest question read from each process (the echo)
    self.question = 0  # this process's latest question (0: none)
    self.last_read = now
    self.changed = threading.Condition()
    self.stopped = threading.Event()
    self.waiting = 0  # main-thread callers of wait_for_signs_of_life: beat and read faster for them
    self.wake = threading.Event()
    self.thread = threading.Thread(target=self._run, name="ssl_jax_peer_watchdog", daemon=True)

  def start(self):
    self.thread.start()
    return self

  def _client_alive(self) -> bool:
    # jax.distributed.shutdown (atexit) drops its client once every process has passed the shutdown
    # barrier; from then on peers leave normally and their silence means nothing.
    from jax._src import distributed as jax_distributed
    return jax_distributed.global_state.client is self.client

  def _run(self):
    beat = 0
    while not self.stopped.is_set() and self._client_alive():
      beat += 1
      try:
        if self.question:
          self.client.key_value_set(f"{_PREFIX}ask/{self.process_id}", str(self.question),
                                    allow_overwrite=True)
        # Read, then write: the heartbeat echoes the questions read just now.
        entries = dict(self.client.key_value_dir_get(_PREFIX))
        for q in range(self.num_processes):
          ask = entries.get(f"{_PREFIX}ask/{q}", "0")
          self.asks[q] = int(ask) if ask.isdigit() else 0
        self.client.key_value_set(f"{_PREFIX}alive/{self.process_id}",
                                  f"{beat} {','.join(map(str, self.asks))}", allow_overwrite=True)
      except Exception:
        # The client is shutting down, or the coordination service is gone, and then JAX ends this process
        # itself: no verdict from here.
        entries = None
      if entries is not None and self._client_alive():
        self._update(entries)
      # A process held in wait_for_signs_of_life beats every quarter second: when a genuine error stops
      # every process at once, each answers the others' questions at once and they re-raise without delay.
      self.wake.wait(_FAST_PERIOD if self.waiting else self.interval)
      self.wake.clear()

  def _update(self, entries: Dict[str, str]):
    verdict = entries.get(f"{_PREFIX}lost")
    if verdict is not None:  # another survivor decided first: the same line, so all logs agree
      exit_peer_lost(verdict)
    now = time.monotonic()
    with self.changed:
      if now - self.last_read > 3 * self.interval:
        # This thread itself could not run for a while (a starved process): the peers' silence over that
        # gap was not observed, so it does not count.
        self.seen = {p: (value, max(since, now - self.interval)) for p, (value, since) in self.seen.items()}
      self.last_read = now
      for p, (value, since) in self.seen.items():
        current = entries.get(f"{_PREFIX}alive/{p}")
        if current != value:
          self.seen[p] = (current, now)
          self.answered[p] = max(self.answered[p], self._echo(current))
      self.changed.notify_all()
      lost = sorted(p for p, (_, since) in self.seen.items() if now - since > self.threshold)
    if lost:
      self._declare(lost, now)

  def _echo(self, heartbeat: Optional[str]) -> int:
    """This process's question as echoed in a peer's heartbeat ("BEAT ASK0,ASK1,..."); 0 when unreadable."""
    try:
      return int(heartbeat.split(" ")[1].split(",")[self.process_id])
    except (AttributeError, IndexError, ValueError):
      return 0

  def _declare(self, lost, now: float):
    silent = min(now - self.seen[p][1] for p in lost)
    message = _describe(lost, self.num_processes, silent, self.peer_timeout)
    try:
      self.client.key_value_set(f"{_PREFIX}lost", message, allow_overwrite=True)
    except Exception:
      pass
    if self.process_id == 0 and self.num_processes - 1 > len(lost):
      # Process 0 hosts the coordination service, and its exit makes JAX abort every other process at
      # once: give the other survivors one reading period to see the verdict and print it themselves.
      time.sleep(self.interval + 0.5)
    exit_peer_lost(message)

  def wait_for_signs_of_life(self) -> None:
    """Asks every other process a question (a new number under ask/THIS_PROCESS) and returns once all
    have echoed it, which proves them alive now: within about `interval` seconds (a quarter second when
    they are waiting here too). A process found gone in the meantime ends this one (exit code 3) instead;
    after peer_timeout + interval seconds without either (a watchdog that stopped reading), it returns."""
    deadline = time.monotonic() + self.peer_timeout + self.interval
    with self.changed:
      self.question += 1
      question = self.question
      self.waiting += 1
      self.wake.set()
      try:
        while any(self.answered[p] < question for p in self.peers):
          remaining = deadline - time.monotonic()
          if remaining <= 0 or not self.thread.is_alive():
            return
          self.changed.wait(min(remaining, self.interval))
      finally:
        self.waiting -= 1


def start_watchdog(peer_timeout: int) -> None:
  """Starts the watchdog of this process (after jax.distributed.initialize; a no-op in a one-process run)."""
  global _watchdog
  import jax
  from jax._src import distributed as jax_distributed
  client = jax_distributed.global_state.client
  if client is None or jax.process_count() < 2 or _watchdog is not None:
    return
  _watchdog = Watchdog(client, jax.process_index(), jax.process_count(), peer_timeout).start()


def after_exception() -> None:
  """Called with an exception on its way out of a multi-process run: when it came from a peer's death (a
  collective that lost its peer fails at once), this waits for the watchdog's verdict and the process exits
  with code 3; when every peer is alive, it returns within about one heartbeat period (--peer_timeout / 10,
  at most 5 s; a quarter second when the peers failed too) and the caller re-raises."""
  if _watchdog is not None:
    _watchdog.wait_for_signs_of_life()
