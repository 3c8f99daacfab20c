"""Checkpoints (orbax) and atomic small-file writes.

Orbax writes each checkpoint into a temporary directory and renames it when complete, so a failure or a
kill during a save leaves the previous checkpoints intact; every process takes part in saves and
restores (multi-host). Paths may be local or gs:// (etils.epath).
"""

from __future__ import annotations

import json
import os
from typing import Any, Optional, Tuple

import jax
import orbax.checkpoint as ocp
from etils import epath

from ssl_jax.errors import UserError


class CheckpointError(UserError, ValueError):
  pass


def write_json_atomic(path: str, obj: Any) -> None:
  """Writes JSON to path via a temporary file and a rename, so readers never see a partial file."""
  path = epath.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.parent / (path.name + ".tmp")
  tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, default=str))
  tmp.replace(path)


def absolute(path: str) -> epath.Path:
  """`path` made absolute: orbax's tensorstore writer rejects a relative path (`--workdir=workdirs/x` failed
  at the first save). Paths with a scheme (gs://) are left as they are."""
  if "://" not in str(path):
    path = os.path.abspath(path)
  return epath.Path(path)


def checkpoint_dir(workdir: str) -> epath.Path:
  return absolute(workdir) / "checkpoints"


class Manager:
  """The workdir's checkpoints: save every N steps and at the end, keep the last k, restore the latest."""

  def __init__(self, workdir: str, config, create: bool = True, directory: Optional[str] = None):
    """directory: where the checkpoints go instead of WORKDIR/checkpoints (evaluation runs keep theirs
    under WORKDIR/eval/checkpoints/)."""
    self.config = config
    # Synchronous saves: with async saves, a checkpoint of this loop was seen still uncommitted minutes
    # after it was started (the background commit starved by the training loop on 2 CPU cores), so a
    # kill in that window would lose it. A save is small next to the steps between saves.
    options = ocp.CheckpointManagerOptions(max_to_keep=config.keep_checkpoints, create=create,
                                           enable_async_checkpointing=False)
    path = checkpoint_dir(workdir) if directory is None else absolute(directory)
    self._manager = ocp.CheckpointManager(path, options=options,
                                          item_names=("state", "config"))

  def latest_step(self) -> Optional[int]:
    return self._manager.latest_step()

  def all_steps(self):
    return list(self._manager.all_steps())

  def restore(self, step: int, target: Any) -> Any:
    """The state saved at `step`, with the structure, dtypes and shardings of `target`."""
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
    try:
      restored = self._manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract)))
    except Exception as e:  # orbax raises several types for truncated or mismatched files
      raise CheckpointError(f"cannot restore checkpoint step {step} in {self._manager.directory}: "
                            f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
    return restored.state

  def restore_latest(self, target: Any) -> Tuple[Any, int]:
    """(state, step) of the latest checkpoint, or (target, 0) when there is none."""
    step = self.latest_step()
    if step is None:
      return target, 0
    return self.restore(step, target), step

  def save(self, step: int, state: Any) -> None:
    # force: the training loop decides when to save; orbax must not skip a step it was asked to save.
    self._manager.save(step, force=True, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), config=ocp.args.JsonSave(self.config.to_dict())))

  def wait(self) -> None:
    self._manager.wait_until_finished()
