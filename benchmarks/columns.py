r"""Benchmark columns in subprocesses, shared by simclr_step.py and vit_step.py.

Each column (one implementation of a train step) is built and compiled once, in a long-lived subprocess of
its own: its peak RSS is its own, and no thread pool is shared with another column. The columns then take
turns in rounds, each turn some untimed steps and then the timed ones: this machine's speed drifts by
10-30% between minutes, so only steps taken close together compare, and the untimed steps absorb the page
faults of a process that sat idle while another column ran (the host took its freed memory back).

A worker is the benchmark script itself run with --worker NAME; it speaks to the driver in lines:

  worker -> driver  READY {json}     built: the column's setup (name, compile seconds, ...), sent once
                    RESULT {json}    the answer to a turn ({"times": [...], "peak_rss_mib": ...}), or the
                                     only output of a one-shot column (spawn)
                    PROGRESS text    relayed to the driver's output as it comes
                    anything else    kept (the last 15 lines) for the report should the worker fail
  driver -> worker  steps W S        W untimed and S timed steps, then RESULT; any other line, or EOF, ends it

Also shared: compiling an ssl_jax step with XLA's memory analysis (compile_jax_step) and, on the driver's
side, the turns (take_turns), each column's median round (median_rounds) and the closing markdown table
(print_table).
"""

from __future__ import annotations

import importlib.util
import json
import os
import pathlib
import resource
import statistics
import subprocess
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))
from ssl_jax import host_memory  # noqa: E402  (imports nothing heavy: no jax)

READY_PREFIX, RESULT_PREFIX, PROGRESS_PREFIX = "READY ", "RESULT ", "PROGRESS "


def pin_threads(threads: int):
  """For the driver and every worker, first thing: restricting the process's CPUs sizes every thread pool
  (XLA's, tf.data's, torch's) to `threads`; TensorFlow's C++ info lines stay out of the output."""
  os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[:threads])
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


# ------------------------------------------------------------------------------------------------ worker


def progress(message: str):
  """A worker's progress line; the driver relays these and keeps the rest for error reports."""
  print(PROGRESS_PREFIX + message, flush=True)


def report(result: dict):
  """A worker's RESULT line: one turn's timings, or a one-shot column's whole result."""
  print(RESULT_PREFIX + json.dumps(result), flush=True)


def peak_rss_mib() -> float:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def serve(setup: dict, run_step, timing_line: str = "step {i}/{n}: {seconds:.2f} s") -> None:
  """The worker side of a step column once its step is built (and compiled, and perhaps run once): prints
  READY with `setup`, then answers each "steps W S" line on stdin by running W untimed and S timed calls of
  run_step() (which blocks until done; with setup["steps_per_call"] = K > 1 each call is K steps, and W and S
  are divided by K, at least one call each) and reporting the seconds per step of each timed call; any other
  line ends it. Each timed call prints a progress line, `timing_line` formatted with i, n and seconds."""
  print(READY_PREFIX + json.dumps(setup), flush=True)
  per_call = setup.get("steps_per_call", 1)
  for line in sys.stdin:
    command = line.split()
    if not command or command[0] != "steps":
      return
    warmup, calls = (max(1, round(int(n) / per_call)) if int(n) else 0 for n in command[1:3])
    for _ in range(warmup):
      run_step()
    times = []
    for i in range(calls):
      start = time.perf_counter()
      run_step()
      times.append((time.perf_counter() - start) / per_call)
      progress(timing_line.format(i=i + 1, n=calls, seconds=times[-1])
               + (f" ({per_call} steps)" if per_call > 1 else ""))
    report({"times": times, "peak_rss_mib": peak_rss_mib()})


def step_and_batch(mesh, step_fn, loop_fn, batch, steps_per_loop: int):
  """The function a step column times and its global batch: the jitted step on `batch` (process-local numpy),
  or, when train.build made a loop (loop_fn, steps_per_loop > 1), the loop on a stack of steps_per_loop
  copies of it (the same batch every step of the loop)."""
  import jax
  import numpy as np

  from ssl_jax import parallel
  if loop_fn is None:
    return step_fn, parallel.to_global(mesh, batch)
  return loop_fn, parallel.to_global(mesh, jax.tree.map(lambda x: np.stack([x] * steps_per_loop), batch), stacked=True)


def compile_jax_step(step_fn, state, batch):
  """Compiles an ssl_jax train step (step_fn, jitted) for `state` and `batch`. Returns the column's setup
  entries (compile_s, and xla_peak_mib and xla_temp_mib from XLA's memory analysis), the compiled step, and
  run_step(): one step on `batch` from the last step's state, blocking until done; it returns the metrics."""
  import jax
  start = time.perf_counter()
  compiled = step_fn.lower(state, batch).compile()
  compile_s = time.perf_counter() - start
  memory = compiled.memory_analysis()
  # Live at once during the step: inputs, outputs not aliased to (donated) inputs, and XLA's temporaries.
  # (peak_memory_in_bytes leaves the temporaries out on XLA:CPU.)
  xla_bytes = (memory.argument_size_in_bytes + memory.output_size_in_bytes - memory.alias_size_in_bytes
               + memory.temp_size_in_bytes)

  holder = {"state": state}

  def run_step():
    holder["state"], metrics = compiled(holder["state"], batch)
    jax.block_until_ready(metrics)
    return metrics

  setup = {"compile_s": compile_s, "xla_peak_mib": xla_bytes / 2**20, "xla_temp_mib": memory.temp_size_in_bytes / 2**20}
  return setup, compiled, run_step


# ------------------------------------------------------------------------------------------------ driver


def _worker_command(script: str, argv, worker: str, extra=(), python: str = ""):
  """The command line of `script` (a benchmark's __file__) running column `worker` with the driver's own
  flags, so that the worker sees the same sizes; `extra`: flags for the worker alone; `python`: the
  interpreter (default: this one)."""
  return [python or sys.executable, str(pathlib.Path(script).resolve()), *argv, "--worker", worker, *extra]


def _relay(proc, prefix: str, tail: list):
  """Relays proc's progress lines until a line starting with `prefix`; returns its JSON (None at EOF)."""
  for line in proc.stdout:
    if line.startswith(prefix):
      return json.loads(line[len(prefix):])
    if line.startswith(PROGRESS_PREFIX):
      print("  " + line[len(PROGRESS_PREFIX):], end="", flush=True)
    else:
      tail[:] = (tail + [line.rstrip()])[-15:]
  return None


def spawn(script: str, argv, worker: str):
  """Runs a one-shot column (it reports one RESULT and exits) in a fresh process, relaying its progress
  lines; returns its result dict, or None with the reason printed."""
  proc = subprocess.Popen(_worker_command(script, argv, worker), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True)
  tail = []
  result = _relay(proc, RESULT_PREFIX, tail)
  if proc.wait() != 0 or result is None:
    print(f"  {worker} failed (exit {proc.returncode}):\n    " + "\n    ".join(tail), flush=True)
  return result


class StepWorker:
  """A step column in its own process (its own peak RSS, no thread pools shared with other columns), kept
  alive between rounds so that the columns' steps can alternate: the machine's speed drifts between
  minutes, so only steps taken close together compare. Construction returns once the column is built;
  `setup` is then its READY dict, or None (with the reason printed) if it failed."""

  def __init__(self, script: str, argv, worker: str, extra=(), python: str = "", huge_pages: bool = False):
    self.worker, self.tail = worker, []
    env = host_memory.with_huge_pages(os.environ) if huge_pages else None
    self.proc = subprocess.Popen(_worker_command(script, argv, worker, extra, python), env=env, stdin=subprocess.PIPE,
                                 stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    self.setup = _relay(self.proc, READY_PREFIX, self.tail)
    if self.setup is None:
      self.fail()

  def run(self, warmup: int, steps: int):
    """{"times": [...], "peak_rss_mib": ...} of `steps` timed steps after `warmup` untimed ones, or None."""
    if self.setup is None:
      return None
    self.proc.stdin.write(f"steps {warmup} {steps}\n")
    self.proc.stdin.flush()
    result = _relay(self.proc, RESULT_PREFIX, self.tail)
    if result is None:
      self.fail()
    return result

  def fail(self):
    self.setup = None
    print(f"  {self.worker} failed (exit {self.proc.wait()}):\n    " + "\n    ".join(self.tail), flush=True)

  def close(self):
    if self.proc.poll() is None:
      self.proc.stdin.close()
      self.proc.wait()


def check_turns(args):
  """Exits with a message unless take_turns can do what args (--rounds, --steps, --warmup) ask."""
  if args.rounds < 1 or args.steps < 1 or args.warmup < 0:
    sys.exit(f"error: --rounds and --steps must be at least 1 and --warmup at least 0, got {args.rounds}, "
             f"{args.steps} and {args.warmup}")


def add_torch_args(parser, install: str = "torch"):
  """--no_torch, --huge_pages and --torch_python: the columns' switches, shared by the step benchmarks."""
  parser.add_argument("--no_torch", action="store_true", help="skip the PyTorch column")
  parser.add_argument("--huge_pages", default="jax", choices=("jax", "both", "none"),
                      help="which columns run with glibc's huge-page tunable (ssl_jax.host_memory): ssl_jax's "
                           "(as its entry points do; default), both, or none")
  parser.add_argument("--torch_python", default="",
                      help=f"a Python interpreter with torch ({install}) for the PyTorch column, e.g. a venv of its "
                           "own (its column imports only torch and numpy); default: this one")


def torch_wanted(args, install: str = "torch") -> bool:
  """Whether to run the PyTorch column: not with --no_torch, nor where torch is missing (the library does not
  need it; `install` is what to pip install); prints the skip line when not."""
  if args.no_torch:
    print("PyTorch: skipped (--no_torch)")
    return False
  if args.torch_python:
    try:
      has_torch = subprocess.run([args.torch_python, "-c", "import torch, numpy"], capture_output=True).returncode == 0
    except OSError:  # no such interpreter
      has_torch = False
  else:
    has_torch = importlib.util.find_spec("torch") is not None
  if not has_torch:
    print(f"PyTorch: skipped: torch is not importable by {args.torch_python or sys.executable} "
          f"(pip install {install} to add this column, or name a Python that has it with --torch_python)")
  return has_torch


def take_turns(workers, args, label, per_round: list):
  """Has the workers take turns, args.rounds rounds of args.warmup untimed and args.steps timed steps each,
  printing a heading per turn (label(worker name), and the round when there are several). Yields
  (worker, r) after each turn that ran, r being the worker's setup with the turn's step_s (median),
  best_step_s, peak_rss_mib and images_per_s (args.batch_size images a step); r is in per_round first,
  which gets a dict per round, by worker name."""
  for round_index in range(args.rounds):
    per_round.append({})
    for w in workers:
      print(f"{label(w.worker)}" + (f" (round {round_index + 1}/{args.rounds})" if args.rounds > 1 else "")
            + ":", flush=True)
      timed = w.run(args.warmup, args.steps)
      if not timed:
        continue
      r = dict(w.setup, step_s=statistics.median(timed["times"]), best_step_s=min(timed["times"]),
               peak_rss_mib=timed["peak_rss_mib"])
      r["images_per_s"] = args.batch_size / r["step_s"]
      per_round[-1][w.worker] = r
      yield w, r


def speed(r: dict) -> str:
  """How fast a turn of take_turns went, for its report line."""
  return f"{r['images_per_s']:.1f} images/s (median step {r['step_s']:.2f} s, best {r['best_step_s']:.2f} s)"


def median_rounds(names, per_round: list) -> list:
  """Per column (in `names` order, those that ran at all), its round with the median step (the faster
  middle one for an even count): the figures for the table."""
  results = []
  for name in names:
    runs = sorted((rnd[name] for rnd in per_round if name in rnd), key=lambda r: r["step_s"])
    if runs:
      results.append(runs[(len(runs) - 1) // 2])
  return results


STEP_TABLE = ("column", "images/s (median)", "images/s (best step)", "compile (s)", "peak RSS (MiB)",
              "XLA memory (MiB)")


def print_table(results, batch_size: int, headings=STEP_TABLE, extra_cells=lambda r: {}):
  """The markdown table of `results` (median_rounds'), a row each, under `headings`: the cells of STEP_TABLE's
  headings are filled in here, any others by extra_cells(r), a dict by heading. A PyTorch column has no
  compile time (eager) and no XLA memory."""
  print("\n| " + " | ".join(headings) + " |")
  print("|" + "---|" * len(headings))
  for r in results:
    cells = {"column": r["column"], "images/s (median)": f"{r['images_per_s']:.1f}",
             "images/s (best step)": f"{batch_size / r['best_step_s']:.1f}",
             "compile (s)": f"{r['compile_s']:.0f}" if "compile_s" in r else "- (eager)",
             "peak RSS (MiB)": f"{r['peak_rss_mib']:.0f}",
             "XLA memory (MiB)": f"{r['xla_peak_mib']:.0f}" if "xla_peak_mib" in r else "-", **extra_cells(r)}
    print("| " + " | ".join(cells[h] for h in headings) + " |")
