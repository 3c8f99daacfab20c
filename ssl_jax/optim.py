"""Optimizers as optax chains, and learning-rate schedules as pure functions of the step."""

from __future__ import annotations

import math
from typing import Any, Callable

import jax.numpy as jnp
import optax
from flax import traverse_util


def peak_learning_rate(config) -> float:
  """config.optimizer.base_learning_rate scaled by the global batch (see scaled_learning_rate)."""
  return scaled_learning_rate(config.optimizer.base_learning_rate, config.optimizer.lr_scaling,
                              config.batch_size)


def scaled_learning_rate(base: float, scaling: str, batch: int) -> float:
  """`linear` -> base * B / 256 (Goyal et al. 2017; SimCLR, BYOL), `sqrt` -> base * sqrt(B) (SimCLR
  appendix B.1, for small batches), `none` -> base."""
  if scaling == "linear":
    return base * batch / 256
  if scaling == "sqrt":
    return base * math.sqrt(batch)
  if scaling == "none":
    return base
  raise ValueError(f"lr_scaling must be linear, sqrt or none, got {scaling!r}")


def warmup_cosine(peak: float, warmup_steps: int, total_steps: int, end_value: float = 0.0) -> Callable:
  """Linear warm-up from 0 to `peak` over `warmup_steps`, then cosine decay to `end_value` at `total_steps`
  (SGDR without restarts, Loshchilov & Hutter 2017), the schedule of SimCLR, BYOL and MoCo v2."""

  def schedule(step):
    step = jnp.asarray(step, jnp.float32)
    warm = peak * step / max(warmup_steps, 1)
    progress = jnp.clip((step - warmup_steps) / max(total_steps - warmup_steps, 1), 0.0, 1.0)
    cosine = end_value + (peak - end_value) * 0.5 * (1.0 + jnp.cos(jnp.pi * progress))
    return jnp.where(step < warmup_steps, warm, cosine)

  return schedule


def step_decay(peak: float, drop_steps, factor: float = 0.1) -> Callable:
  """`peak`, multiplied by `factor` at each of `drop_steps` (MoCo's linear classification: x0.1 at
  epochs 60 and 80 of 100)."""
  drops = jnp.asarray(sorted(drop_steps) or [2**31 - 1], jnp.float32)

  def schedule(step):
    return peak * factor ** jnp.sum(jnp.asarray(step, jnp.float32) >= drops)

  return schedule


def cosine_increase(base: float, total_steps: int, final: float = 1.0) -> Callable:
  """BYOL's target decay (Grill et al. 2020, section 3.2): tau_k = 1 - (1 - tau_base)(cos(pi k / K) + 1) / 2,
  rising from `base` at step 0 to `final` (1) at step K. Also used for MoCo v3 / DINO teacher momentum."""

  def schedule(step):
    progress = jnp.clip(jnp.asarray(step, jnp.float32) / max(total_steps, 1), 0.0, 1.0)
    return final - (final - base) * (jnp.cos(jnp.pi * progress) + 1.0) / 2.0

  return schedule


def decay_mask(params: Any, exclude_bias_and_norm: bool = True, exclude_names=()) -> Any:
  """True for parameters that get weight decay and LARS adaptation.

  With `exclude_bias_and_norm`, biases and normalization parameters (every parameter with at most one
  dimension) are excluded, as in the SimCLR and BYOL code (MoCo decays everything); `exclude_names` adds
  parameters by name (e.g. a ViT's `pos_embed`)."""
  flat = traverse_util.flatten_dict(params)
  mask = {path: (not (exclude_bias_and_norm and jnp.ndim(p) <= 1) and not set(path) & set(exclude_names))
          for path, p in flat.items()}
  return traverse_util.unflatten_dict(mask)


def create_optimizer(config, schedule: Callable, params: Any) -> optax.GradientTransformation:
  """The optimizer named by config.optimizer.name: lars, sgd or adamw."""
  opt = config.optimizer
  mask = decay_mask(params, opt.exclude_bias_and_norm, tuple(opt.no_decay_names))
  if opt.name == "lars":
    # You et al. 2017, as in SimCLR's LARSOptimizer: weight decay is added to the gradient before the trust
    # ratio eta * |w| / |g + wd w| (1 where either norm is 0), and momentum accumulates lr * ratio * update.
    return optax.lars(schedule, weight_decay=opt.weight_decay, weight_decay_mask=mask,
                      trust_coefficient=opt.trust_coefficient, eps=0.0, trust_ratio_mask=mask,
                      momentum=opt.momentum)
  if opt.name == "sgd":
    return optax.chain(
        optax.add_decayed_weights(opt.weight_decay, mask),
        optax.sgd(schedule, momentum=opt.momentum or None, nesterov=opt.nesterov),
    )
  if opt.name == "adamw":
    return optax.adamw(schedule, b1=opt.b1, b2=opt.b2, weight_decay=opt.weight_decay, mask=mask)
  raise ValueError(f"optimizer.name must be lars, sgd or adamw, got {opt.name!r}")
