"""The interface every method implements, and the pieces methods share.

The generic trainer (ssl_jax/train.py) knows nothing about any method. It asks the method for
* `views()`: the augmentation recipe of each view (one dict per view; several sizes for multi-crop,
  a single view for masked-image methods),
* `init(rng, batch)`: the initial (params, batch_stats, method_state),
* `loss(...)`: called per device inside `shard_map` over the "data" axis, on this device's slice of the
  global batch; cross-device communication goes through ssl_jax.parallel,
* `update_state(...)`: after the optimizer step, outside the sharded region: EMA targets, queues,
  memory banks, centers,
* `after_update(params, step)`: a change of the parameters after the optimizer step (SwAV renormalizes
  its prototypes).
A method also owns its configuration: `default_config()` (every `method.*` key), `check_config(cfg)`
(one-line ConfigErrors for impossible settings, before anything compiles) and `apply_tiny(cfg)` (its part
of the `tiny` variant). It knows the data's facts (`self.data`: training examples, steps per epoch) for
schedules and events counted in epochs.

`method_state` is a pytree the method owns (target params, a queue, a memory bank of per-example
features, running centers); the trainer keeps it in the one TrainState and checkpoints it.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from ssl_jax import models
from ssl_jax.errors import ConfigError
from ssl_jax.parallel import DATA

Batch = Mapping[str, Any]  # {"views": tuple of [n, h, w, 3] float arrays, "label": [n] int, "index": [n] int}


@dataclasses.dataclass
class LossOutput:
  """What `Method.loss` returns besides the loss, all per device.

  batch_stats: the new batch-norm running statistics (the trainer averages them over devices).
  metrics: scalars to log (averaged over devices).
  representation: [n, feat] encoder output of the first view, before any head; the online linear
    probe and the evaluation protocols read this.
  embedding: [n, dim] the output the loss acts on (projection); feeds the collapse indicator.
  state_stats: per-device statistics for `update_state`, averaged over devices by the trainer (e.g. the
    target network's new batch-norm statistics, DINO's batch center).
  per_example: [n, ...] arrays handed to `update_state` as global arrays (e.g. MoCo's keys).
  """

  batch_stats: Any
  metrics: Mapping[str, jax.Array]
  representation: jax.Array
  embedding: jax.Array
  state_stats: Any = dataclasses.field(default_factory=dict)
  per_example: Mapping[str, jax.Array] = dataclasses.field(default_factory=dict)


jax.tree_util.register_dataclass(
    LossOutput,
    data_fields=["batch_stats", "metrics", "representation", "embedding", "state_stats", "per_example"],
    meta_fields=[])


class Network(nn.Module):
  """Encoder followed by a projector and optionally a predictor; returns (representation, projection,
  prediction or None)."""

  encoder: nn.Module
  projector: nn.Module
  predictor: Optional[nn.Module] = None

  def __call__(self, x, train: bool = True):
    h = self.encoder(x, train=train)
    z = self.projector(h, train=train)
    p = None if self.predictor is None else self.predictor(z, train=train)
    return h, z, p


@dataclasses.dataclass(frozen=True)
class DataFacts:
  """What a method may need to know of its training data: schedules and events counted in epochs
  (SwAV's queue start, freezes counted in epochs) need the steps per epoch."""

  num_train_examples: int
  batch_size: int  # global

  @property
  def steps_per_epoch(self) -> float:
    return self.num_train_examples / self.batch_size

  def steps(self, epochs: float) -> int:
    """`epochs` as a number of steps (rounded)."""
    return int(round(epochs * self.steps_per_epoch))


def ordered_views(cfg) -> list:
  """config.views in the views' `order` (config_lib.add_view numbers them; a config.json sorts its keys, so
  their order there is not the views' order), global crops before local ones as multi-crop methods index
  them. Configs written before views were numbered keep their keys' order."""
  entries = list(cfg.views.values())
  return sorted(entries, key=lambda v: v.get("order", entries.index(v)))


def view_crop_sizes(cfg) -> list:
  """The crop size of every view (`num` copies of each), in order: for methods' checks of their views
  before anything is built."""
  return [v.crop_size for v in ordered_views(cfg) for _ in range(v.num)]


def check_heads(cfg, *size_keys: str) -> None:
  """One-line ConfigError unless method.proj_layers (where the method has it) is >= 1 and every
  method.<size_key> > 0."""
  m = cfg.method
  sizes = [m[k] for k in size_keys]
  if m.get("proj_layers", 1) < 1 or min(sizes) <= 0:
    raise ConfigError(f"method.proj_layers must be >= 1 and the head sizes > 0, got proj_layers="
                      f"{m.get('proj_layers', 1)}, " + ", ".join(f"{k}={v}" for k, v in zip(size_keys, sizes)))


def check_num_views(cfg, count: int) -> None:
  """One-line ConfigError unless the config defines exactly `count` views."""
  n = len(view_crop_sizes(cfg))
  if n != count:
    raise ConfigError(f"{cfg.method.name} takes {count} views, the config defines {n}")


def dtype_of(config):
  return models.DTYPES[config.model.dtype]


def build_encoder(config, bn_axis_name: Optional[str] = DATA) -> nn.Module:
  """The encoder named by config.model.name (ssl_jax/models)."""
  return models.build(config.model, bn_axis_name)


def build_head(config, hidden_dims: Sequence[int], output_dim: int, use_bn: bool, output_bn: bool,
               output_bias: Optional[bool] = None, bn_axis_name: Optional[str] = DATA,
               **options) -> models.MLPHead:
  """options: further MLPHead fields (hidden_bias, output_bn_scale)."""
  return models.MLPHead(hidden_dims=tuple(hidden_dims), output_dim=output_dim, use_bn=use_bn,
                        output_bn=output_bn, output_bias=output_bias, dtype=dtype_of(config),
                        bn_axis_name=bn_axis_name, bn_momentum=config.model.bn_momentum, **options)


def init_network(network: Network, rng, x):
  """(params, batch_stats) of `network` for inputs shaped like x. Inference mode, so no mesh axis is
  needed; the variables are the same as in training mode."""
  variables = network.init(rng, x, train=False)
  return variables["params"], variables.get("batch_stats", {})


def apply_train(network: Network, params, batch_stats, x):
  """Training-mode forward: returns ((h, z, p), new_batch_stats)."""
  out, updates = network.apply({"params": params, "batch_stats": batch_stats}, x, train=True,
                               mutable=["batch_stats"])
  return out, updates["batch_stats"]


def forward_crops(network: nn.Module, params, batch_stats, crops: Sequence[jax.Array]):
  """Training-mode forward of `network` over multi-crop views: one call per run of consecutive crops of the
  same resolution, concatenated over the batch (so batch norm sees all of them at once), as the official
  multi-crop wrappers do (SwAV main_swav.py / DINO utils.MultiCropWrapper). Returns (one output pytree per
  crop, new batch_stats)."""
  outputs, start = [], 0
  while start < len(crops):
    end = start
    while end < len(crops) and crops[end].shape[1:] == crops[start].shape[1:]:
      end += 1
    n = [c.shape[0] for c in crops[start:end]]
    out, batch_stats = apply_train(network, params, batch_stats, jnp.concatenate(crops[start:end], axis=0))
    bounds = [sum(n[:i]) for i in range(len(n) + 1)]
    outputs.extend(jax.tree.map(lambda t, a=a, b=b: t[a:b], out) for a, b in zip(bounds[:-1], bounds[1:]))
    start = end
  return outputs, batch_stats


def ema(target, online, decay):
  """target <- decay * target + (1 - decay) * online, leaf by leaf."""
  return jax.tree.map(lambda t, o: decay * t + (1.0 - decay) * o, target, online)


class Method:
  """Base class; see the module docstring for the contract."""

  encoder: nn.Module  # set by subclasses; its variables live under params["encoder"]

  def __init__(self, config, data: Optional[DataFacts] = None):
    """data: the training data's facts; None where only the networks are needed (evaluation)."""
    self.config = config
    self.data = data

  @staticmethod
  def default_config():
    """Every `method.*` key of this method, with the defaults of its paper."""
    raise NotImplementedError

  @classmethod
  def check_config(cls, cfg) -> None:
    """Raises ConfigError (one line) for settings of this method that cannot run."""

  @classmethod
  def apply_tiny(cls, cfg) -> None:
    """This method's part of the `tiny` variant (smaller heads, queues); the model's is the model's."""

  def views(self) -> Sequence[Mapping[str, Any]]:
    """One augmentation recipe per view, expanded from config.views (`num` copies of each), in order
    (ordered_views)."""
    out = []
    for view in ordered_views(self.config):
      settings = {k: v for k, v in view.items() if k not in ("num", "order")}
      out.extend(dict(settings) for _ in range(view.num))
    return out

  def after_update(self, params, step):
    """The parameters after the optimizer step, changed as the method needs (identity by default)."""
    return params

  def init(self, rng, batch: Batch):
    """(params, batch_stats, method_state); by default those of `self.network` and no method state."""
    params, batch_stats = init_network(self.network, rng, batch["views"][0])
    return params, batch_stats, {}

  def loss(self, params, batch_stats, method_state, batch: Batch, rng, step):
    """Per device, inside shard_map. Returns (scalar loss, LossOutput)."""
    raise NotImplementedError

  def represent(self, params, batch_stats, x):
    """Inference-mode representation (encoder output before any head, running BN statistics):
    x [n, h, w, 3] -> [n, feat]. What the online probe and every evaluation protocol read."""
    return self.encoder.apply({"params": params["encoder"], "batch_stats": batch_stats["encoder"]}, x,
                              train=False)

  def update_state(self, method_state, params, state_stats, per_example, step):
    """After the optimizer step, in the global view. `params` are the updated online parameters,
    `state_stats` the device-averaged LossOutput.state_stats, `per_example` the global arrays, `step` the
    step that was just taken."""
    return method_state
