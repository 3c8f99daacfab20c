"""The one train-state pytree: everything a checkpoint holds."""

from __future__ import annotations

from typing import Any

import flax
import jax


@flax.struct.dataclass
class TrainState:
  """step: int32 scalar, the number of optimizer steps taken.
  params: trainable parameters ({"encoder", "projector", ..., "online_probe"}).
  batch_stats: batch-norm running statistics of the online network.
  method_state: what the method keeps between steps (EMA target params and statistics, queue, memory
    bank, centers).
  opt_state: optimizer state.
  rng: uint32 [2] raw PRNG key data; the key of step s is fold_in(rng, s).
  """

  step: jax.Array
  params: Any
  batch_stats: Any
  method_state: Any
  opt_state: Any
  rng: jax.Array
