"""The non-finite guard of the train step: which parts of a step's result are finite, computed on the device.

A diverging run rarely announces itself in the loss first: an infinite batch-norm variance, a NaN
gradient or an overflowing optimizer moment can sit in the state for steps while the loss still reads
finite, and a checkpoint saved then carries it. So every step reduces the loss, the gradients (per
parameter group) and the updated state (parameters, batch statistics and method state per group, the
optimizer state) to a few booleans, fetched with the metrics; the trainer never saves a state whose
flags are not all set, and can drop such an update instead (optax's apply_if_finite, for low-precision
runs that meet transient NaNs).
"""

from __future__ import annotations

from typing import Any, List, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from ssl_jax.errors import UserError


class NonFiniteError(UserError, RuntimeError):
  """The loss, a gradient or the updated state went NaN or infinite."""


def _all_finite(tree) -> jax.Array:
  """True when every floating-point leaf of `tree` is finite (integer leaves always are)."""
  flags = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)
           if jnp.issubdtype(jnp.asarray(x).dtype, jnp.inexact)]
  return jnp.all(jnp.stack(flags)) if flags else jnp.array(True)


all_finite = jax.jit(_all_finite)  # for loops that check only before a save (evaluation protocols)


def _groups(prefix: str, tree) -> List[Tuple[str, Any]]:
  """(name, subtree) per top-level entry of a dict-like tree ("params.encoder", ...), or the whole tree."""
  if isinstance(tree, dict) or hasattr(tree, "items"):
    return [(f"{prefix}.{k}", v) for k, v in sorted(tree.items())]
  return [(prefix, tree)]


def named_parts(loss, grads, state) -> List[Tuple[str, Any]]:
  """The parts a step's flags cover, in the order a report names them: the loss, then the gradient of
  each parameter group, then the updated parameters, batch statistics and method state per group, then
  the optimizer state."""
  parts = [("loss", loss)]
  parts += [(f"gradient of {name}", g) for name, g in _groups("params", grads)]
  parts += _groups("params", state.params) + _groups("batch_stats", state.batch_stats)
  parts += _groups("method_state", state.method_state) + [("opt_state", state.opt_state)]
  return parts


def finite_flags(loss, grads, state) -> jax.Array:
  """bool [len(named_parts)]: whether each part is finite. Traced inside the step."""
  return jnp.stack([_all_finite(t) for _, t in named_parts(loss, grads, state)])


def names(loss, grads, state) -> List[str]:
  """The names of finite_flags' entries (static: from the trees' structure only)."""
  return [name for name, _ in named_parts(loss, grads, state)]


def keep_if(ok: jax.Array, new, old, advance_counters: bool = False):
  """`new` where ok, else `old`, leaf by leaf (the skip of a non-finite update). advance_counters: integer
  leaves (an optimizer's step counts) take `new` regardless, so that schedules driven by them stay
  functions of the global step, as DINO's per-iteration schedules and PyTorch's scheduler under a skipped
  GradScaler step have it; the moments and everything else keep `old`."""
  def pick(n, o):
    if advance_counters and jnp.issubdtype(jnp.asarray(n).dtype, jnp.integer):
      return n
    return jnp.where(ok, n, o)
  return jax.tree.map(pick, new, old)


def describe(part_names: Sequence[str], flags) -> str:
  """The parts whose flag is False, the first (in named_parts' order) named first: "batch_stats.encoder"
  or "params.encoder (also params.projector, opt_state)"."""
  bad = [n for n, f in zip(part_names, np.asarray(flags)) if not f]
  more = f" (also {', '.join(bad[1:5])}{', ...' if len(bad) > 5 else ''})" if len(bad) > 1 else ""
  return (bad[0] if bad else "nothing") + more
