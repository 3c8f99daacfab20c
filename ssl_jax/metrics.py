"""Metric writing (TensorBoard through clu, DIR/metrics.jsonl, the console) and the progress line.

Only process 0 writes; the others construct a disabled Writer so every process runs the same code.
"""

from __future__ import annotations

import json
import sys
import time
from typing import Any, Dict, Mapping

import numpy as np
from clu import metric_writers
from etils import epath


def _scalars(metrics: Mapping[str, Any]) -> Dict[str, float]:
  return {k: float(np.asarray(v)) for k, v in metrics.items()}


class Progress:
  """Throughput and ETA between successive updates."""

  def __init__(self, total_steps: int, start_step: int, global_batch: int):
    self.total_steps = total_steps
    self.global_batch = global_batch
    self._start_time = self._last_time = time.time()
    self._start_step = self._last_step = start_step

  def update(self, step: int) -> Dict[str, float]:
    now = time.time()
    images_per_sec = (step - self._last_step) * self.global_batch / max(now - self._last_time, 1e-9)
    steps_per_sec = (step - self._start_step) / max(now - self._start_time, 1e-9)
    self._last_time, self._last_step = now, step
    return {"images_per_sec": images_per_sec,
            "eta_seconds": (self.total_steps - step) / max(steps_per_sec, 1e-9),
            "elapsed_seconds": now - self._start_time}


def _duration(seconds: float) -> str:
  seconds = int(seconds)
  return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m{seconds % 60:02d}s" if seconds >= 3600 else \
      f"{seconds // 60}m{seconds % 60:02d}s"


def _step_of(line: str) -> float:
  """The step of a metrics.jsonl row; infinity for a blank or partial one (a process killed mid-write),
  which is then dropped with the rows past the restored step."""
  try:
    return json.loads(line)["step"]
  except (ValueError, KeyError, TypeError):
    return float("inf")


class Writer:
  """Writes each logged step to TensorBoard (workdir), metrics.jsonl and a console progress line.

  On resume, rows of metrics.jsonl past the restored step (logged after the last checkpoint of the
  interrupted run) are dropped, so the file reads as one uninterrupted run."""

  def __init__(self, workdir: str, enabled: bool = True, resume_step: int = 0):
    self.enabled = enabled
    if not enabled:
      return
    self.path = epath.Path(workdir) / "metrics.jsonl"
    epath.Path(workdir).mkdir(parents=True, exist_ok=True)
    if self.path.exists():
      rows = [line for line in self.path.read_text().splitlines() if _step_of(line) <= resume_step]
      tmp = self.path.parent / "metrics.jsonl.tmp"
      tmp.write_text("".join(r + "\n" for r in rows))
      tmp.replace(self.path)
    self._tb = metric_writers.SummaryWriter(str(epath.Path(workdir) / "tensorboard"))

  def write(self, step: int, metrics: Mapping[str, Any], progress: Mapping[str, float], total_steps: int):
    if not self.enabled:
      return
    row = {"step": int(step), **_scalars(metrics), **{k: float(v) for k, v in progress.items()}}
    self._tb.write_scalars(step, {k: v for k, v in row.items() if k != "step"})
    with self.path.open("a") as f:
      f.write(json.dumps(row) + "\n")
    shown = [f"loss {row['loss']:.4f}"]
    if "probe_accuracy" in row:
      shown.append(f"probe_acc {row['probe_accuracy']:.3f}")
    shown += [f"lr {row['learning_rate']:.4g}", f"emb_std {row['embedding_std']:.4f}",
              f"{row['images_per_sec']:.0f} img/s"]
    print(f"step {step}/{total_steps} ({100 * step / max(total_steps, 1):.0f}%) " + " | ".join(shown) +
          f" | elapsed {_duration(row['elapsed_seconds'])} ETA {_duration(row['eta_seconds'])}",
          flush=True, file=sys.stdout)

  def close(self):
    if self.enabled:
      self._tb.flush()
      self._tb.close()
