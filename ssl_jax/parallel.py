"""The device mesh, shardings, and every collective the library uses.

The train step is written for one device's slice of the global batch and run under `jax.shard_map` over a
one-axis mesh ("data") spanning every device of every process. Collectives are therefore explicit, and
they all live here:

* `all_gather`: gathers a per-device array into the global one. Its transpose is a reduce-scatter, so a
  loss over gathered negatives sends gradient back to the device that produced them (SimCLR's
  `tpu_cross_replica_concat` does the same with a one-hot psum).
* `mean`: cross-device mean of metrics and of per-device batch-norm running statistics.
* `sum`: cross-device sum (psum), for losses built on global sums: Barlow Twins' batch statistics and
  cross-correlation, SwAV's Sinkhorn marginals. Unlike torch.distributed.all_reduce it is
  differentiable, so such a loss gets its true gradient.
* Batch norm itself: layers built with `bn_axis_name=DATA` reduce their moments over this axis, which
  makes the statistics global over all devices and processes; layers built with None keep per-device
  statistics (MoCo's shuffle BN).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

DATA = "data"


def make_mesh(devices=None) -> Mesh:
  """A one-axis data-parallel mesh over all devices of all processes (Auto axis type).

  `jax.make_mesh` would make an Explicit axis in JAX 0.10, which changes how jit propagates shardings; the
  plain constructor keeps the Auto behaviour the rest of the code assumes.
  """
  devices = jax.devices() if devices is None else devices
  return Mesh(np.asarray(devices), (DATA,))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_sharded(mesh: Mesh, stacked: bool = False) -> NamedSharding:
  """Examples split over the data axis: axis 0, or with `stacked` axis 1 (steps stacked on axis 0)."""
  return NamedSharding(mesh, P(None, DATA) if stacked else P(DATA))


def local_batch_size(global_batch: int) -> int:
  """The part of the global batch this process reads."""
  return global_batch // jax.process_count()


def to_global(mesh: Mesh, local_tree: Any, stacked: bool = False) -> Any:
  """Assembles process-local numpy batches (leading axis = this process's examples; with `stacked`, the
  axis after a leading axis of steps) into global arrays sharded over the data axis."""
  sharding = batch_sharded(mesh, stacked)
  return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), local_tree)


SHARDINGS = ("replicated", "fsdp")


def fsdp_spec(shape, num_devices: int, min_size: int) -> P:
  """Where fully sharded data parallelism (ZeRO-3 / FSDP) puts one array: split over the data axis along
  its largest dimension divisible by the number of devices, or replicated when it has fewer than min_size
  elements (biases, norms, scalars: gathering them costs more than holding them) or no such dimension."""
  if int(np.prod(shape, dtype=np.int64)) < min_size:
    return P()
  axes = [a for a in np.argsort(shape, kind="stable")[::-1] if shape[a] % num_devices == 0]
  if not axes:
    return P()
  return P(*([None] * int(axes[0])), DATA)


def state_shardings(mesh: Mesh, tree: Any, mode: str = "replicated", min_size: int = 2**14) -> Any:
  """One NamedSharding per leaf of `tree` (arrays or shape structs): every leaf replicated, or with
  mode="fsdp" laid out by fsdp_spec. Under "fsdp" the train step's collectives stay where they are: the
  shard_map region takes the parameters replicated, so XLA gathers them (all-gather) on entry, and the
  gradients leave it constrained to this layout (a reduce-scatter), so the optimizer's state and math are
  split over the devices."""
  if mode not in SHARDINGS:
    raise ValueError(f"sharding must be one of {SHARDINGS}, got {mode!r}")
  if mode == "replicated":
    return jax.tree.map(lambda _: replicated(mesh), tree)
  return jax.tree.map(lambda x: NamedSharding(mesh, fsdp_spec(tuple(x.shape), mesh.size, min_size)), tree)


def place(tree: Any, shardings: Any) -> Any:
  """Places a pytree on the devices with one sharding per leaf (state_shardings). Every leaf gets its own
  buffer, so leaves that started as the same array (a target network initialized from the online one, a
  classifier's frozen copy of a restored encoder) can all be donated: host arrays and arrays this process
  holds whole go through a host copy; arrays split over several processes (an FSDP state restored on a
  pod) are copied on the devices."""
  leaves, treedef = jax.tree.flatten(tree)
  targets = treedef.flatten_up_to(shardings)
  out = [None] * len(leaves)
  split = [i for i, x in enumerate(leaves) if isinstance(x, jax.Array) and not x.is_fully_addressable]
  for i, x in enumerate(leaves):
    if i not in split:
      out[i] = jax.device_put(np.array(x), targets[i])
  if split:
    copies = jax.jit(lambda xs: [jnp.copy(x) for x in xs], out_shardings=[targets[i] for i in split])(
        [leaves[i] for i in split])
    for i, x in zip(split, copies):
      out[i] = x
  return treedef.unflatten(out)


def replicate(mesh: Mesh, tree: Any) -> Any:
  """Places a pytree on every device (identical on every process). Each leaf gets its own buffer (via
  a host copy), so leaves that started as the same array (a target network initialized from the online
  one) can both be donated to the step."""
  return jax.device_put(jax.tree.map(np.array, tree), replicated(mesh))


def all_gather(x: jax.Array) -> jax.Array:
  """[local, ...] on each device -> [global, ...], ordered by device index along the data axis."""
  return jax.lax.all_gather(x, DATA, axis=0, tiled=True)


def mean(tree: Any) -> Any:
  """Cross-device mean; used for metrics and per-device BN running statistics."""
  return jax.lax.pmean(tree, DATA)


def sum(tree: Any) -> Any:
  """Cross-device sum over the data axis. Differentiable: the gradient of a loss built on global sums is
  the gradient of that loss on the global batch. Losses take it as their `global_sum` argument.
  (The name shadows the builtin inside this module, which does not use it, to read as `parallel.mean`.)"""
  return jax.lax.psum(tree, DATA)


def device_index() -> jax.Array:
  return jax.lax.axis_index(DATA)


def this_device_rows(make_global, n: int) -> jax.Array:
  """Rows [i n, (i + 1) n) of the global array `make_global(num_devices * n)` on device i: per-example
  random draws (MAE's masks) made for the whole global batch from a key shared by every device, so that
  they do not depend on how the batch is split (8 devices draw what 1 device draws)."""
  full = make_global(jax.lax.axis_size(DATA) * n)
  return jax.lax.dynamic_slice_in_dim(full, device_index() * n, n, axis=0)


def row_sharded_take(local_rows: jax.Array, indices: jax.Array) -> jax.Array:
  """Rows of a table split by rows over the data axis (device i holds rows [i R, (i + 1) R) as
  `local_rows` [R, ...]): this device's lookups `indices` [n, ...] (global row numbers) -> [n, ..., row].
  Every device's requests are gathered (all_gather), each device answers those it owns (zeros elsewhere),
  and the answers are summed back to the device that asked (psum_scatter): the table is never gathered."""
  wanted = all_gather(indices)                                   # [D n, ...]
  local = wanted - device_index() * local_rows.shape[0]
  mine = (local >= 0) & (local < local_rows.shape[0])
  rows = row_sharded_local(local_rows, wanted)
  rows = jnp.where(mine.reshape(mine.shape + (1,) * (rows.ndim - mine.ndim)), rows, 0)
  return jax.lax.psum_scatter(rows, DATA, scatter_dimension=0, tiled=True)


def row_sharded_local(local_rows: jax.Array, indices: jax.Array) -> jax.Array:
  """local_rows[indices - first row of this device] for the global row numbers `indices` [m] this device
  owns (whatever for the others, which row_sharded_set drops): the current rows to update."""
  per_device = local_rows.shape[0]
  return jnp.take(local_rows, jnp.clip(indices - device_index() * per_device, 0, per_device - 1), axis=0)


def row_sharded_set(local_rows: jax.Array, indices: jax.Array, values: jax.Array) -> jax.Array:
  """`local_rows` [R, ...] (this device's slice of a row-split table) with the rows among the global
  `indices` [m] that it owns replaced by `values` [m, ...]; indices and values must be the same on every
  device (the global batch's, all-gathered). Rows owned elsewhere are dropped, not written."""
  per_device = local_rows.shape[0]
  local = indices - device_index() * per_device
  local = jnp.where((local >= 0) & (local < per_device), local, per_device)  # out of range: dropped
  return local_rows.at[local].set(values.astype(local_rows.dtype), mode="drop")


def global_std_of_normalized(z: jax.Array) -> jax.Array:
  """Collapse indicator: mean over dimensions of the per-dimension std of L2-normalized embeddings.

  z: [global_batch, dim]. About 1/sqrt(dim) for well-spread embeddings and 0 under complete collapse
  (SimSiam, Chen & He 2021, section 4.1).
  """
  z = z / jnp.linalg.norm(z, axis=-1, keepdims=True).clip(1e-12)
  return jnp.mean(jnp.std(z, axis=0))
