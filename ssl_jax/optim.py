"""Optimizers as one optax transformation built from a config section, and schedules as pure functions of
the step.

`build(opt, params, learning_rate, ...)` serves pre-training (opt = cfg.optimizer) and the evaluation
protocols (opt = cfg.eval.<protocol>) alike; config.optimizer_settings documents the keys it reads.
Settings are chosen per parameter by its "/"-joined path through opt.groups, a tuple of (regex, settings)
pairs in which the first regex that fully matches wins (the parameter groups of big_vision's optax.make and
of PyTorch's optimizers): a learning-rate multiplier or a fixed rate, a weight-decay multiplier, and
freezing until a step.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, NamedTuple, Optional, Tuple, Union

import jax
import jax.numpy as jnp
import optax

from ssl_jax import config as config_lib
from ssl_jax.registry import Registry

Schedule = Callable[[jax.Array], jax.Array]


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


def warmup_cosine(peak: float, warmup_steps: int, total_steps: int, end_value: float = 0.0,
                  start_value: float = 0.0) -> Callable:
  """Linear warm-up from `start_value` (0; SwAV's 800-epoch recipe starts at 0.3, main_swav.py l.178-182)
  to `peak` over `warmup_steps`, then cosine decay to `end_value` at `total_steps` (SGDR without restarts,
  Loshchilov & Hutter 2017), the schedule of SimCLR, BYOL and MoCo v2."""

  def schedule(step):
    step = jnp.asarray(step, jnp.float32)
    warm = start_value + (peak - start_value) * step / max(warmup_steps, 1)
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


def learning_rate(opt, peak: float, total_steps: int, steps_per_epoch: float, end_value: float = 0.0,
                  start_value: float = 0.0) -> Schedule:
  """The learning-rate schedule an optimizer section names (opt.schedule, for pre-training and the
  evaluation protocols alike), as a function of the step:
    "cosine": linear warm-up over opt.warmup_epochs, then cosine to end_value, evaluated every step (most
      recipes: SimCLR, BYOL, Barlow Twins, VICReg, SwAV, DINO, MoCo v3);
    "cosine_per_epoch": the same curve held constant through each epoch at the value of the epoch's start,
      SimSiam's adjust_learning_rate (main_simsiam.py l.257, 359-366);
    "steps": peak, x0.1 at each of opt.lr_drop_epochs (MoCo v1 and InstDisc pre-training, MoCo's linear
      classification)."""
  if opt.schedule == "steps":
    return step_decay(peak, [int(round(e * steps_per_epoch)) for e in opt.lr_drop_epochs])
  curve = warmup_cosine(peak, int(round(opt.warmup_epochs * steps_per_epoch)), total_steps, end_value,
                        start_value)
  if opt.schedule == "cosine_per_epoch":
    return lambda step: curve(jnp.floor(jnp.asarray(step, jnp.float32) / steps_per_epoch) * steps_per_epoch)
  return curve


def cosine_increase(base: float, total_steps: int, final: float = 1.0) -> Callable:
  """BYOL's target decay (Grill et al. 2020, section 3.2): tau_k = 1 - (1 - tau_base)(cos(pi k / K) + 1) / 2,
  rising from `base` at step 0 to `final` (1) at step K. Also used for MoCo v3 / DINO teacher momentum."""

  def schedule(step):
    progress = jnp.clip(jnp.asarray(step, jnp.float32) / max(total_steps, 1), 0.0, 1.0)
    return final - (final - base) * (jnp.cos(jnp.pi * progress) + 1.0) / 2.0

  return schedule


def weight_decay_schedule(opt, total_steps: Optional[int] = None) -> Union[float, Schedule]:
  """opt.weight_decay as a constant, or (weight_decay_schedule="cosine") the cosine from weight_decay at
  step 0 to weight_decay_end at total_steps, per iteration, without warm-up: DINO's wd schedule
  (utils.cosine_scheduler, utils.py l.187-198, used at main_dino.py l.309-312: 0.04 -> 0.4)."""
  if opt.weight_decay_schedule == "constant":
    return float(opt.weight_decay)
  if (total_steps or 0) <= 0:
    raise config_lib.ConfigError("weight_decay_schedule=cosine needs the run's total_steps (> 0)")
  return warmup_cosine(opt.weight_decay, 0, total_steps, opt.weight_decay_end)


def clip_per_param(max_norm: float) -> optax.GradientTransformation:
  """Each parameter's gradient rescaled to norm <= max_norm on its own, as DINO's utils.clip_gradients
  (utils.py l.132-141: coefficient max_norm / (norm + 1e-6), applied when below 1). Not global-norm
  clipping: a large gradient in one parameter leaves the others alone."""

  def update_fn(updates, state, params=None):
    del params

    def clip(g):
      coef = max_norm / (jnp.linalg.norm(g.ravel()) + 1e-6)
      return g * jnp.minimum(coef, 1.0).astype(g.dtype)

    return jax.tree.map(clip, updates), state

  return optax.GradientTransformation(optax.init_empty_state, update_fn)


@dataclasses.dataclass(frozen=True)
class ParamSettings:
  """What the optimizer does to one parameter (static: known when the optimizer is built).

  path: its "/"-joined path; group: the index of the opt.groups rule that took it, -1 for none.
  lr_mult: x the learning-rate schedule; fixed_lr: a constant rate replacing the schedule (None: schedule).
  wd_mult: x the weight decay (0: not decayed). trust_ratio: LARS adapts it.
  frozen_until_step: not updated while step < this (0: never frozen).
  """

  path: str
  group: int
  lr_mult: float
  fixed_lr: Optional[float]
  wd_mult: float
  trust_ratio: bool
  frozen_until_step: int


def _path_name(keypath) -> str:
  """"encoder/Conv_0/kernel" for the key path of params["encoder"]["Conv_0"]["kernel"]."""
  parts = []
  for k in keypath:
    for attr in ("key", "name", "idx"):  # DictKey, GetAttrKey, SequenceKey
      if hasattr(k, attr):
        parts.append(str(getattr(k, attr)))
        break
  return "/".join(parts)


def param_settings(opt, params: Any, batch_size: Optional[int] = None, where: str = "optimizer",
                   steps_per_epoch: Optional[float] = None) -> Any:
  """A ParamSettings per parameter (a pytree of the structure of `params`) from the section `opt`.

  Weight decay and the LARS trust ratio skip the parameters with at most one dimension when
  opt.exclude_bias_and_norm (SimCLR, BYOL, Barlow Twins main.py l.90-97, DINO utils.py l.632-643), and
  those with a path component in opt.no_decay_names; a group's wd_mult multiplies the decay of the others.
  batch_size: the batch a group's fixed_lr is scaled by (opt.lr_scaling), needed when one sets it.
  steps_per_epoch: converts a group's frozen_until_epoch to steps, needed when one sets it.
  Raises ConfigError (one line) for bad groups, and for a required group that takes no parameter."""
  groups = config_lib.optimizer_groups(opt.groups, where)
  no_decay = set(opt.no_decay_names)
  taken = [0] * len(groups)

  def settings(keypath, p):
    path = _path_name(keypath)
    decayed = not (opt.exclude_bias_and_norm and jnp.ndim(p) <= 1) and not no_decay & set(path.split("/"))
    group = next((i for i, (_, regex, _) in enumerate(groups) if regex.fullmatch(path)), -1)
    g = groups[group][2] if group >= 0 else dict(lr_mult=1.0, fixed_lr=None, wd_mult=1.0, frozen_until_step=0,
                                                  frozen_until_epoch=None)
    frozen_until = g["frozen_until_step"]
    if g["frozen_until_epoch"] is not None:
      if steps_per_epoch is None:
        raise config_lib.ConfigError(f"{where}.groups[{group}] sets frozen_until_epoch: pass steps_per_epoch "
                                     "to optim.build")
      frozen_until = int(round(g["frozen_until_epoch"] * steps_per_epoch))
    if group >= 0:
      taken[group] += 1
    fixed = g["fixed_lr"]
    if fixed is not None:
      if batch_size is None:
        raise config_lib.ConfigError(f"{where}.groups[{group}] sets fixed_lr, which is scaled by the batch: "
                                     "pass batch_size to optim.build")
      fixed = scaled_learning_rate(fixed, opt.lr_scaling, batch_size)
    return ParamSettings(path=path, group=group, lr_mult=g["lr_mult"], fixed_lr=fixed,
                         wd_mult=g["wd_mult"] if decayed else 0.0, trust_ratio=decayed,
                         frozen_until_step=frozen_until)

  out = jax.tree_util.tree_map_with_path(settings, params)
  for i, (pattern, _, g) in enumerate(groups):
    if g["required"] and not taken[i]:
      raise config_lib.ConfigError(
          f"{where}.groups[{i}]: regex {pattern!r} takes no parameter (none fully matches, or an earlier "
          f"group took them); paths look like {jax.tree.leaves(out)[0].path!r}. Fix it, or set "
          "required=False")
  return out


class OptimizerState(NamedTuple):
  """count: int32, the updates applied so far, the step the schedules read (it advances for frozen
  parameters too, so every group follows the global step). moments: per freeze partition (the parameters
  sharing a frozen_until_step), the momentum trace or Adam state of its parameters, held still while the
  partition is frozen; Adam's count is per partition, so a parameter's bias correction starts when it
  starts training, as PyTorch creates a parameter's state at its first gradient."""

  count: jax.Array
  moments: Tuple[Any, ...]


@dataclasses.dataclass(frozen=True)
class Rule:
  """What makes an optimizer of the registry: its moment transformation (built from the section's
  settings) and the order in which an update goes through the shared pieces: "decay" (coupled weight
  decay, + wd w), "trust" (LARS's trust ratio), "clipped_trust" (coupled decay and the clipped trust ratio
  of PyTorch Lightning Bolts' LARS), "moments", "lr" (x the group's rate); "decay" after "moments" is
  decoupled weight decay."""

  moment: Callable[[Any], optax.GradientTransformation]
  order: Tuple[str, ...]


def _momentum(opt) -> optax.GradientTransformation:
  return optax.trace(decay=opt.momentum, nesterov=opt.nesterov) if opt.momentum else optax.identity()


OPTIMIZERS: Registry[Rule] = Registry("optimizer")
# You et al. 2017, as optax.lars and SimCLR's LARSOptimizer: the momentum accumulates the scaled update.
OPTIMIZERS.register("lars")(Rule(lambda opt: optax.trace(decay=opt.momentum, nesterov=opt.nesterov),
                                 ("decay", "trust", "lr", "moments")))
# PyTorch Lightning Bolts' LARS with clip_lars_lr and exclude_bias_n_norm_lars, as solo-learn's CIFAR
# recipes run it (solo/utils/lars.py): trust and decay before PyTorch SGD's momentum, then the rate.
OPTIMIZERS.register("lars_clip")(Rule(_momentum, ("clipped_trust", "moments", "lr")))
# PyTorch's SGD: momentum over the decayed gradient, then the rate.
OPTIMIZERS.register("sgd")(Rule(_momentum, ("decay", "moments", "lr")))
# Loshchilov & Hutter 2019, PyTorch's AdamW: Adam moments, then decoupled decay, then the rate.
OPTIMIZERS.register("adamw")(Rule(lambda opt: optax.scale_by_adam(b1=opt.b1, b2=opt.b2),
                                  ("moments", "decay", "lr")))
# PyTorch's Adam: the weight decay is an L2 term added to the gradient before the moments (coupled), as
# lightly's CIFAR-10 SwAV benchmark trains it.
OPTIMIZERS.register("adam")(Rule(lambda opt: optax.scale_by_adam(b1=opt.b1, b2=opt.b2),
                                 ("decay", "moments", "lr")))


def build(opt, params: Any, learning_rate: Schedule, *, batch_size: Optional[int] = None,
          total_steps: Optional[int] = None, weight_decay: Union[None, float, Schedule] = None,
          where: str = "optimizer", steps_per_epoch: Optional[float] = None) -> optax.GradientTransformation:
  """The optimizer of the section `opt` (cfg.optimizer, or an evaluation protocol cfg.eval.<name>) for
  `params` (their structure and shapes choose the groups and masks; values are not read).

  learning_rate: the schedule of the step (peak already scaled by the batch); a group's lr_mult multiplies
    it, a group's fixed_lr (scaled by batch_size like the base rate) replaces it.
  weight_decay: a float or a schedule of the step; None: weight_decay_schedule(opt, total_steps).
  where: the section's name in error messages.

  Per step, in order: the gradients of parameters frozen at this step are dropped; clipping
  (clip_per_param or clip_global_norm) of the rest; then
    lars:  g + wd w (coupled, masked), x trust ratio eta |w| / |g + wd w| (masked; 1 where either norm is
           0), x lr, momentum trace: You et al. 2017 as optax.lars and SimCLR's LARSOptimizer (momentum
           accumulates the scaled update);
    lars_clip: where the trust ratio applies and |w|, |g| > 0: (g + wd w) x min(r / rate, 1) with
           r = eta |w| / (|g| + wd |w| + 1e-8) and rate the parameter's learning rate at the step (its
           update is at most eta |w| / |g| x g, at most the plain rate); elsewhere g unchanged; momentum
           trace, x lr: PyTorch Lightning Bolts' LARS with clip_lars_lr (solo-learn's CIFAR recipes);
    sgd:   g + wd w (coupled), momentum trace (Nesterov optional; none at momentum 0), x lr (PyTorch SGD);
    adamw: Adam moments, + wd w (decoupled), x lr (Loshchilov & Hutter 2019; PyTorch AdamW);
    adam:  g + wd w (coupled), Adam moments, x lr (PyTorch Adam).
  Frozen parameters (step < frozen_until_step) get a zero update and keep their moments: PyTorch's
  grad = None (DINO utils.py l.144-149, SwAV main_swav.py l.325-328), not a zero gradient, which would
  still decay the weight and advance the moments. With no groups, clipping or weight-decay schedule the
  updates are bit-identical to optax.lars / sgd (+ add_decayed_weights) / adamw with the same masks."""
  config_lib.check_optimizer(opt, where)
  name = opt[config_lib.optimizer_name_key(opt)]
  leaves = param_settings(opt, params, batch_size, where, steps_per_epoch)
  wd = weight_decay_schedule(opt, total_steps) if weight_decay is None else weight_decay
  frozen_untils = sorted({s.frozen_until_step for s in jax.tree.leaves(leaves)})
  any_frozen = frozen_untils != [0]
  # Constant zero decay is skipped altogether, as optax.add_decayed_weights does.
  decays = callable(wd) or wd != 0.0

  rule = OPTIMIZERS.get(name)
  moment = rule.moment(opt)
  # One moment transformation per freeze partition, each seeing only its own parameters.
  partitions = [(until, optax.masked(moment, jax.tree.map(lambda s, until=until: s.frozen_until_step == until, leaves)))
                for until in frozen_untils]
  clip = (clip_per_param(opt.clip_per_param) if opt.clip_per_param
          else optax.clip_by_global_norm(opt.clip_global_norm) if opt.clip_global_norm else None)
  trust = optax.masked(optax.scale_by_trust_ratio(trust_coefficient=opt.trust_coefficient, eps=0.0),
                       jax.tree.map(lambda s: s.trust_ratio, leaves))

  def init_fn(params):
    return OptimizerState(count=jnp.zeros([], jnp.int32),
                          moments=tuple(t.init(params) for _, t in partitions))

  def update_fn(updates, state, params=None):
    if params is None:
      raise ValueError("optim.build's optimizer needs the parameters: call update(grads, state, params)")
    step = state.count

    def drop_frozen(tree):
      return jax.tree.map(lambda x, s: jnp.where(step < s.frozen_until_step, jnp.zeros_like(x), x)
                          if s.frozen_until_step else x, tree, leaves)

    if any_frozen:
      # Dropped before clipping, so that a frozen parameter's gradient does not count in the global norm.
      updates = drop_frozen(updates)
    if clip is not None:
      updates, _ = clip.update(updates, clip.init(params))

    wd_now = wd(step) if callable(wd) else wd
    lr_now = learning_rate(step)

    def add_decay(u, p, s):
      if not decays or s.wd_mult == 0.0:
        return u
      return u + (wd_now if s.wd_mult == 1.0 else wd_now * s.wd_mult) * p

    def rate_of(s):
      return s.fixed_lr if s.fixed_lr is not None else lr_now if s.lr_mult == 1.0 else lr_now * s.lr_mult

    def scale_by_lr(u, s):
      return jnp.array(-rate_of(s), dtype=u.dtype) * u

    def clipped_trust(g, p, s):
      if not s.trust_ratio:
        return g
      wd_p = (wd_now * s.wd_mult) if decays else 0.0
      p_norm, g_norm = jnp.linalg.norm(p.ravel()), jnp.linalg.norm(g.ravel())
      ratio = opt.trust_coefficient * p_norm / (g_norm + p_norm * wd_p + 1e-8)
      rate = jnp.asarray(rate_of(s), jnp.float32)
      # At rate 0 (the first warm-up step) Bolts' ratio / rate is inf, clipped to 1.
      ratio = jnp.where(rate > 0, jnp.minimum(ratio / jnp.where(rate > 0, rate, 1.0), 1.0), 1.0)
      scaled = (g + wd_p * p) * ratio.astype(g.dtype)
      return jnp.where((p_norm > 0) & (g_norm > 0), scaled, g)

    def moments(u):
      new = []
      for (until, t), old in zip(partitions, state.moments):
        u, s = t.update(u, old, params)
        if until:  # the whole partition state, Adam's count included, stays while it is frozen
          s = jax.tree.map(lambda n, o, until=until: jnp.where(step < until, o, n), s, old)
        new.append(s)
      return u, tuple(new)

    new_moments = state.moments
    for piece in rule.order:
      if piece == "decay":
        updates = jax.tree.map(add_decay, updates, params, leaves)
      elif piece == "trust":
        updates, _ = trust.update(updates, trust.init(params), params)
      elif piece == "clipped_trust":
        updates = jax.tree.map(clipped_trust, updates, params, leaves)
      elif piece == "lr":
        updates = jax.tree.map(scale_by_lr, updates, leaves)
      else:
        updates, new_moments = moments(updates)
    if any_frozen:
      updates = drop_frozen(updates)
    return updates, OptimizerState(count=optax.safe_increment(step), moments=new_moments)

  return optax.GradientTransformation(init_fn, update_fn)


def create_optimizer(config, schedule: Callable, params: Any,
                     steps_per_epoch: Optional[float] = None) -> optax.GradientTransformation:
  """The pre-training optimizer: build(config.optimizer, ...) with the run's batch and total_steps
  (config resolved, see config.resolve, when the weight decay follows a cosine) and the data's steps per
  epoch (for groups frozen for a number of epochs)."""
  return build(config.optimizer, params, schedule, batch_size=config.batch_size,
               total_steps=config.total_steps, steps_per_epoch=steps_per_epoch)
