"""Checkpoints (orbax) with integrity digests, and atomic small-file writes.

Orbax writes each checkpoint into a temporary directory and renames it when complete, so a failure or a
kill during a save leaves the previous checkpoints intact; every process takes part in saves and
restores (multi-host). Paths may be local or gs:// (etils.epath).

A file can still be damaged after it was written (a flipped bit on disk, a bad copy between buckets), and
orbax reads such a file without complaint: a 4 KB run of flipped bytes restored as parameters of 3e38
and NaN. So each save writes, as one more item of the same atomic checkpoint, a digest of every array of
the state (`state_digest`), and each restore recomputes it from what was read and compares. A checkpoint
that fails (a digest mismatch, or files orbax cannot read) is never used silently and never deleted: the
run resuming from it moves it aside to CHECKPOINTS_damaged/ and resumes from the newest intact one with
a loud warning, or stops with one line when none is intact.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any, Dict, List, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from etils import epath
from jax import lax
from jax.experimental import multihost_utils

from ssl_jax.errors import UserError


class CheckpointError(UserError, ValueError):
  pass


class DamagedCheckpointError(CheckpointError):
  """A checkpoint whose files cannot be read or whose arrays do not match the digest saved with them."""


class MismatchedCheckpointError(CheckpointError):
  """An intact checkpoint of another model or method: not a state of this config."""


# The digest: per array, two 32-bit lanes of sum_i mix(word_i, i) over the array's 32-bit words, where mix
# is MurmurHash3's 32-bit finalizer (Appleby) of the word xor a mix of its position. A sum of
# per-position terms does not depend on how the array is split into shards, so XLA computes it on the
# device over the global array (no host copy of the state) and it holds when a checkpoint is restored on
# another number of processes or another sharding; a changed word changes its term pseudo-randomly, so a
# damaged array passes with probability about 2^-64.
DIGEST_FORMAT = ("ssl_jax digest 1: per array, for lane in (0x243F6A88, 0x85A308D3), the uint32 sum over "
                 "32-bit words w_i of fmix32(w_i ^ fmix32(i * 0x9E3779B9 + lane))")
_LANES = (0x243F6A88, 0x85A308D3)


def _fmix32(h):
  h = lax.bitwise_xor(h, lax.shift_right_logical(h, _u32(h, 16)))
  h = lax.mul(h, _u32(h, 0x85EBCA6B))
  h = lax.bitwise_xor(h, lax.shift_right_logical(h, _u32(h, 13)))
  h = lax.mul(h, _u32(h, 0xC2B2AE35))
  return lax.bitwise_xor(h, lax.shift_right_logical(h, _u32(h, 16)))


def _u32(like, value):
  return lax.full_like(like, value, jnp.uint32)


def _words(x) -> jax.Array:
  """The array's bits as a flat uint32 array (8- and 16-bit values widened, 64-bit ones split in two)."""
  if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
    x = jax.random.key_data(x)
  if x.dtype == jnp.bool_:
    x = x.astype(jnp.uint8)
  size = x.dtype.itemsize
  if size in (1, 2):
    x = lax.convert_element_type(lax.bitcast_convert_type(x, jnp.uint8 if size == 1 else jnp.uint16), jnp.uint32)
  else:
    x = lax.bitcast_convert_type(x, jnp.uint32)  # 64-bit values gain a trailing axis of 2
  return lax.reshape(x, (x.size,))


def _array_digest(x) -> jax.Array:
  """[2] uint32: both lanes at once, as rows of a [2, n] array (half the operations to trace and compile
  per array shape)."""
  words = _words(x)
  n = words.shape[0]
  position = lax.broadcasted_iota(jnp.uint32, (2, n), 1)
  lanes = lax.broadcast_in_dim(jnp.asarray(_LANES, jnp.uint32), (2, n), (0,))
  keys = _fmix32(lax.add(lax.mul(position, _u32(position, 0x9E3779B9)), lanes))
  mixed = _fmix32(lax.bitwise_xor(lax.broadcast_in_dim(words, (2, n), (1,)), keys))
  return lax.reduce(mixed, np.uint32(0), lax.add, (1,))


# One jitted computation per array shape and dtype, not one over the whole state: a state's arrays share a
# few dozen shapes (BYOL's tiny ResNet-18 state: 293 arrays, 22 shapes), so a process traces and compiles each shape once,
# for every method and checkpoint it saves, instead of the whole state again for every new structure.
_array_digest_jit = jax.jit(_array_digest)


def _paths(tree) -> List[str]:
  return [jax.tree_util.keystr(path) for path, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]


def state_digest(state: Any) -> Dict[str, str]:
  """{array path: 16 hex digits} for every array of `state` (jax or numpy arrays). Under several
  processes every process must call it (jitted computations over the global arrays, in one order)."""
  # Each result is replicated over every device: each process reads its own copy.
  digests = [np.asarray(_array_digest_jit(x if isinstance(x, jax.Array) else jnp.asarray(x)).addressable_data(0))
             for x in jax.tree.leaves(state)]
  return {path: f"{int(a):08x}{int(b):08x}" for path, (a, b) in zip(_paths(state), digests)}


def _first_line(e: BaseException) -> str:
  text = str(e).strip()
  return f"{type(e).__name__}: {text.splitlines()[0]}" if text else type(e).__name__


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


# Orbax's replica-parallel saving splits every replicated array across its replicas (each device writes a
# slice), slicing on the device with one compiled executable per array shape and slice: for a ResNet-18
# state on 8 devices, 4,618 slices and 191 compilations made the first save take 13 s (2.5 s after). Arrays
# whose slice would be under 1 MiB are written whole by one replica (first save about 3 s, then 1 s); larger
# ones, where writing in parallel pays on a pod, are still split. Registered once, for jax.Array, in
# orbax's global registry of type handlers (StandardCheckpointHandler takes no registry of its own).
MIN_SLICE_BYTES_FOR_REPLICA_PARALLEL = 1 << 20
_registered = []


def _register_array_handler() -> None:
  if not _registered:
    default = ocp.type_handlers.get_type_handler(jax.Array)
    verbosity = logging.get_verbosity()
    logging.set_verbosity(logging.ERROR)  # orbax warns of every override; this one is deliberate
    try:
      # Keeps the default handler's array metadata store (orbax 0.12.8 registers ArrayHandler with one).
      ocp.type_handlers.register_type_handler(jax.Array, ocp.type_handlers.ArrayHandler(
          min_slice_bytes_for_replica_parallel=MIN_SLICE_BYTES_FOR_REPLICA_PARALLEL,
          array_metadata_store=getattr(default, "_array_metadata_store", None)), override=True)
    finally:
      logging.set_verbosity(verbosity)
    _registered.append(True)


class Manager:
  """The workdir's checkpoints: save every N steps and at the end, keep the last k, restore the newest
  intact one."""

  def __init__(self, workdir: str, config, create: bool = True, directory: Optional[str] = None):
    """directory: where the checkpoints go instead of WORKDIR/checkpoints (evaluation runs keep theirs
    under WORKDIR/eval/checkpoints/)."""
    self.config = config
    _register_array_handler()
    # Synchronous saves: with async saves, a checkpoint of this loop was seen still uncommitted minutes
    # after it was started (the background commit starved by the training loop on 2 CPU cores), so a
    # kill in that window would lose it. A save is small next to the steps between saves.
    options = ocp.CheckpointManagerOptions(max_to_keep=config.keep_checkpoints, create=create,
                                           enable_async_checkpointing=False)
    self.directory = checkpoint_dir(workdir) if directory is None else absolute(directory)
    # Handlers named up front (not inferred from the first save's arguments), so that a fresh manager can
    # read a checkpoint's metadata before restoring it.
    self._manager = ocp.CheckpointManager(self.directory, options=options, item_handlers={
        "state": ocp.StandardCheckpointHandler(), "config": ocp.JsonCheckpointHandler(),
        "integrity": ocp.JsonCheckpointHandler()})

  def latest_step(self) -> Optional[int]:
    return self._manager.latest_step()

  def all_steps(self):
    return sorted(self._manager.all_steps())

  def _check_shapes(self, step: int, target: Any) -> None:
    """Raises MismatchedCheckpointError when the checkpoint's arrays are not those `target` has (another
    model, head or optimizer), DamagedCheckpointError when its metadata cannot be read. Compared as
    multisets of (shape, dtype), which do not depend on how orbax names the state's nodes."""
    try:
      saved = self._manager.item_metadata(step)["state"]
      saved = [(tuple(m.shape), np.dtype(m.dtype).name) for m in jax.tree.leaves(
          saved.tree if hasattr(saved, "tree") else saved, is_leaf=lambda m: hasattr(m, "shape"))]
    except Exception as e:  # orbax raises several types for missing or unreadable metadata
      raise DamagedCheckpointError(f"checkpoint step {step} in {self.directory} is damaged: its metadata "
                                   f"cannot be read ({_first_line(e)})")
    wanted = [(tuple(np.shape(x)), np.dtype(x.dtype).name if hasattr(x, "dtype") else "")
              for x in jax.tree.leaves(target)]
    if sorted(saved) != sorted(wanted):
      only_saved = sorted(set(saved) - set(wanted))[:2]
      only_wanted = sorted(set(wanted) - set(saved))[:2]
      raise MismatchedCheckpointError(
          f"checkpoint step {step} in {self.directory} holds a state of another config ({len(saved)} arrays, "
          f"e.g. {only_saved}; this config builds {len(wanted)}, e.g. {only_wanted}), or was written by an "
          "earlier ssl_jax: pass another --workdir, or the config and version that wrote it")

  def restore(self, step: int, target: Any) -> Any:
    """The state saved at `step`, with the structure, dtypes and shardings of `target`, verified against
    the digest saved with it. Raises DamagedCheckpointError or MismatchedCheckpointError."""
    self._check_shapes(step, target)
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
    has_digest = (self.directory / str(step) / "integrity").exists()
    args = dict(state=ocp.args.StandardRestore(abstract))
    if has_digest:
      args["integrity"] = ocp.args.JsonRestore()
    try:
      restored = self._manager.restore(step, args=ocp.args.Composite(**args))
    except Exception as e:  # orbax raises several types for truncated or unreadable files
      if "tree structures do not match" in str(e):
        raise MismatchedCheckpointError(f"checkpoint step {step} in {self.directory} holds a state of another "
                                        "config (its tree structure differs): pass another --workdir")
      raise DamagedCheckpointError(f"checkpoint step {step} in {self.directory} is damaged: {_first_line(e)}")
    if not has_digest:
      logging.warning("checkpoint step %d in %s has no digest (written before ssl_jax saved them): restored "
                      "unverified", step, self.directory)
      return restored.state
    saved = restored.integrity.get("arrays", {})
    computed = state_digest(restored.state)
    bad = [path for path, digest in computed.items() if saved.get(path) != digest]
    if bad or len(saved) != len(computed):
      raise DamagedCheckpointError(
          f"checkpoint step {step} in {self.directory} is damaged: {len(bad)} of {len(computed)} arrays differ "
          f"from the digest saved with them ({', '.join(bad[:3])}{', ...' if len(bad) > 3 else ''})")
    return restored.state

  def restore_latest(self, target: Any, move_damaged: bool = True) -> Tuple[Any, int]:
    """(state, step) of the newest intact checkpoint, or (target, 0) when there is none.

    A damaged checkpoint newer than an intact one is reported loudly and, with move_damaged (a run that
    will save here again), moved to DIRECTORY_damaged/ so that orbax neither resumes from it nor counts
    it among the checkpoints kept; it is never deleted. When no checkpoint is intact, nothing is moved
    and DamagedCheckpointError names them all."""
    damaged = []
    for step in sorted(self.all_steps(), reverse=True):
      try:
        state = self.restore(step, target)
      except DamagedCheckpointError as e:
        damaged.append((step, str(e)))
        continue
      for bad_step, message in damaged:
        where = self._move_aside(bad_step) if move_damaged else None
        _warn(f"{message}; {'moved to ' + str(where) + ', ' if where else ''}not used: resuming from the "
              f"newest intact checkpoint, step {step}")
      return state, step
    if damaged:
      raise DamagedCheckpointError(
          f"no intact checkpoint in {self.directory}: {damaged[0][1]}" +
          (f"; steps {[s for s, _ in damaged[1:]]} are damaged too" if len(damaged) > 1 else "") +
          "; move the directory away to start over")
    return target, 0

  def _move_aside(self, step: int) -> epath.Path:
    """Moves checkpoint `step` to DIRECTORY_damaged/STEP[-k] (process 0; the others wait)."""
    root = self.directory.parent / (self.directory.name + "_damaged")
    target = root / str(step)
    k = 1
    while target.exists():
      target, k = root / f"{step}-{k}", k + 1
    if jax.process_index() == 0:
      root.mkdir(parents=True, exist_ok=True)
      (self.directory / str(step)).rename(target)
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices(f"ssl_jax_move_damaged_{step}")
    self._manager.reload()
    return target

  def save(self, step: int, state: Any) -> None:
    """Saves `state` with its digest, in one atomic checkpoint."""
    digest = {"format": DIGEST_FORMAT, "arrays": state_digest(state)}
    # force: the training loop decides when to save; orbax must not skip a step it was asked to save.
    self._manager.save(step, force=True, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), config=ocp.args.JsonSave(self.config.to_dict()),
        integrity=ocp.args.JsonSave(digest)))

  def wait(self) -> None:
    self._manager.wait_until_finished()


def _warn(message: str) -> None:
  """A warning the user must not miss: on stderr whatever the log verbosity."""
  if jax.process_index() == 0:
    print(f"WARNING: {message}", file=sys.stderr, flush=True)
