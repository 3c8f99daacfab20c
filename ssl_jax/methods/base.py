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
from typing import Any, Callable, Mapping, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from ssl_jax import models
from ssl_jax.errors import ConfigError
from ssl_jax import parallel
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
  state_updates: new values of the method_state entries named by the method's `updated_in_loss`, each in
    its layout of `state_specs` (InstDisc's sharded memory bank, of whose rows a device holds a slice);
    the trainer puts them into method_state before `update_state`.
  """

  batch_stats: Any
  metrics: Mapping[str, jax.Array]
  representation: jax.Array
  embedding: jax.Array
  state_stats: Any = dataclasses.field(default_factory=dict)
  per_example: Mapping[str, jax.Array] = dataclasses.field(default_factory=dict)
  state_updates: Mapping[str, jax.Array] = dataclasses.field(default_factory=dict)


jax.tree_util.register_dataclass(
    LossOutput,
    data_fields=["batch_stats", "metrics", "representation", "embedding", "state_stats", "per_example",
                 "state_updates"],
    meta_fields=[])


def head_input(encoder: nn.Module, h):
  """What the heads read of the representation `h`: the encoder's own `head_input` where it has one (a ViT
  evaluated on the concatenated class tokens of its last blocks trains its heads on the last one's),
  else `h` itself."""
  return encoder.head_input(h) if hasattr(encoder, "head_input") else h


class Network(nn.Module):
  """Encoder followed by a projector and optionally a predictor; returns (representation, projection,
  prediction or None)."""

  encoder: nn.Module
  projector: nn.Module
  predictor: Optional[nn.Module] = None

  def __call__(self, x, train: bool = True):
    h = self.encoder(x, train=train)
    z = self.projector(head_input(self.encoder, h), train=train)
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


def check_positive(cfg, *keys: str) -> None:
  """One-line ConfigError unless every method.<key> is > 0 (temperatures)."""
  for k in keys:
    if not cfg.method[k] > 0:
      raise ConfigError(f"method.{k} must be > 0, got {cfg.method[k]}")


def check_fraction(cfg, *keys: str) -> None:
  """One-line ConfigError unless every method.<key> is in [0, 1] (EMA rates, momenta)."""
  for k in keys:
    if not 0 <= cfg.method[k] <= 1:
      raise ConfigError(f"method.{k} must be in [0, 1], got {cfg.method[k]}")


def check_num_views(cfg, count: int) -> None:
  """One-line ConfigError unless the config defines exactly `count` views."""
  n = len(view_crop_sizes(cfg))
  if n != count:
    raise ConfigError(f"{cfg.method.name} takes {count} views, the config defines {n}")


def dtype_of(config):
  return models.DTYPES[config.model.dtype]


def build_encoder(config, bn_axis_name: Optional[str] = DATA, **overrides) -> nn.Module:
  """The encoder named by config.model.name (ssl_jax/models); overrides: `model.*` settings replaced for
  this instance (a teacher without drop path, an evaluation's representation)."""
  m = config.model
  if overrides:
    m = ml_collections.ConfigDict(dict(m.to_dict(), **overrides))
  return models.build(m, bn_axis_name)


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


def init_with_target(network: Network, rng, x, parts: Sequence[str] = ("encoder", "projector")):
  """(params, batch_stats, method_state) of a network with an EMA target (BYOL, MoCo v3): the target starts
  as a copy of the online network's `parts`, with their own batch-norm statistics."""
  params, batch_stats = init_network(network, rng, x)
  target = {k: params[k] for k in parts}
  target_stats = {k: batch_stats[k] for k in parts if k in batch_stats}
  return params, batch_stats, {"target_params": target, "target_batch_stats": target_stats}


def apply_train(network: nn.Module, params, batch_stats, x, rng=None):
  """Training-mode forward: returns (output, new_batch_stats). rng: the key of dropout and drop path, for
  networks that have them; a network without batch norm returns its empty statistics unchanged."""
  out, updates = network.apply({"params": params, "batch_stats": batch_stats}, x, train=True,
                               mutable=["batch_stats"], rngs=None if rng is None else {"dropout": rng})
  return out, updates.get("batch_stats", batch_stats)


def dropout_key(rng, index: int):
  """The dropout / drop-path key of forward pass `index` of a step on this device (inside shard_map): the
  step's key is the same on every device, and each device's examples need their own masks."""
  return jax.random.fold_in(jax.random.fold_in(rng, parallel.device_index()), index)


def forward_crops(network: nn.Module, params, batch_stats, crops: Sequence[jax.Array], rng=None):
  """Training-mode forward of `network` over multi-crop views: one call per run of consecutive crops of the
  same resolution, concatenated over the batch (so batch norm sees all of them at once), as the official
  multi-crop wrappers do (SwAV main_swav.py / DINO utils.MultiCropWrapper). rng: dropout / drop path key,
  a different one per call. Returns (one output pytree per crop, new batch_stats)."""
  outputs, start = [], 0
  while start < len(crops):
    end = start
    while end < len(crops) and crops[end].shape[1:] == crops[start].shape[1:]:
      end += 1
    n = [c.shape[0] for c in crops[start:end]]
    key = None if rng is None else dropout_key(rng, start)
    out, batch_stats = apply_train(network, params, batch_stats, jnp.concatenate(crops[start:end], axis=0), key)
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
  has_heads = True    # heads on the encoder's head_input (a ViT's class token)

  def __init__(self, config, data: Optional[DataFacts] = None):
    """data: the training data's facts; None where only the networks are needed (evaluation)."""
    self.config = config
    self.data = data
    self._evaluation_encoders = {}

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

  # method_state entries the per-device loss returns new values of (LossOutput.state_updates).
  updated_in_loss: Sequence[str] = ()

  def state_specs(self) -> Mapping[str, Any]:
    """PartitionSpecs of method_state entries (by top-level key) split over the devices: inside the
    per-device loss each device sees only its part (an InstDisc memory bank split by rows is P("data")),
    and the train state keeps them in that layout. Entries not named are replicated (or laid out by
    config.sharding)."""
    return {}

  @classmethod
  def check_mesh(cls, cfg, num_devices: int) -> None:
    """Raises ConfigError for settings this method cannot run on `num_devices` devices."""

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

  def encoder_variables(self, params, batch_stats, method_state):
    """The {"params", "batch_stats"} of the encoder that evaluation reads: the online encoder by default
    (DINO evaluates its teacher). A model without batch norm has empty statistics."""
    return {"params": params["encoder"], "batch_stats": batch_stats.get("encoder", {})}

  def evaluation_encoder(self, representation: Optional[str] = None,
                         drop_path_rate: Optional[float] = None) -> nn.Module:
    """The encoder in the global view (no mesh axis: under plain jit batch statistics over the global batch
    are global), with the representation `representation` and a ViT's stochastic depth `drop_path_rate`
    (None: config.model's). Same parameters as self.encoder."""
    overrides = {k: v for k, v in (("representation", representation), ("drop_path_rate", drop_path_rate))
                 if v is not None and v != ""}
    key = tuple(sorted(overrides.items()))
    if key not in self._evaluation_encoders:
      self._evaluation_encoders[key] = build_encoder(self.config, bn_axis_name=None, **overrides)
    return self._evaluation_encoders[key]

  def represent(self, variables, x, representation: Optional[str] = None):
    """Inference-mode representation (encoder output before any head, running BN statistics) of the
    encoder `variables` (encoder_variables): x [n, h, w, 3] -> [n, feat]. What the online probe's size,
    kNN and every linear protocol read; representation: a ViT's choice for this protocol (None: the
    config's)."""
    return self.evaluation_encoder(representation).apply(variables, x, train=False)

  def represent_train(self, variables, x, rng, representation: Optional[str] = None,
                      drop_path_rate: Optional[float] = None):
    """Training-mode representation for protocols that train the encoder (fine-tuning): (features, new
    batch_stats); rng drives dropout and drop path (a ViT's, drop_path_rate; None: the config's)."""
    return apply_train(self.evaluation_encoder(representation, drop_path_rate), variables["params"],
                       variables.get("batch_stats", {}), x, rng)

  def initial_pass(self) -> Optional[Callable]:
    """None, or fn(params, batch_stats, x [n, h, w, 3]) -> [n, d]: values this method needs of every
    training image before its first step (InstDisc's memory bank written by the initial network), computed
    once by train.run_initial_pass over the training split with the evaluation preprocessing; row i is
    the example whose batch["index"] is i. They reach fill_state."""
    return None

  def fill_state(self, values) -> Mapping[str, Any]:
    """The method_state entries (full global numpy arrays, each of its entry's shape) made from the
    initial pass's values [num_train_examples, d]; the rest of method_state is kept."""
    return {}

  def log_warnings(self, row) -> Sequence[str]:
    """Warnings about a logged metrics row (host side, one line each; DINO's collapse guard)."""
    return []

  def update_state(self, method_state, params, state_stats, per_example, step):
    """After the optimizer step, in the global view. `params` are the updated online parameters,
    `state_stats` the device-averaged LossOutput.state_stats, `per_example` the global arrays, `step` the
    step that was just taken."""
    return method_state
