"""The interface every method implements, and the pieces methods share.

The generic trainer (ssl_jax/train.py) knows nothing about any method. It asks the method for
* `views()`: the augmentation recipe of each view (one dict per view; several sizes for multi-crop,
  a single view for masked-image methods),
* `init(rng, batch)`: the initial (params, batch_stats, method_state),
* `loss(...)`: called per device inside `shard_map` over the "data" axis, on this device's slice of the
  global batch; cross-device communication goes through ssl_jax.parallel,
* `update_state(...)`: after the optimizer step, outside the sharded region: EMA targets, queues,
  memory banks, centers.

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


def dtype_of(config):
  return {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[config.model.dtype]


def build_encoder(config, bn_axis_name: Optional[str] = DATA) -> nn.Module:
  """The encoder named by config.model.name."""
  m = config.model
  if m.name == "resnet":
    return models.create_resnet(m.depth, width=m.width, width_multiplier=m.width_multiplier,
                                cifar_stem=m.cifar_stem, dtype=dtype_of(config), bn_axis_name=bn_axis_name,
                                bn_momentum=m.bn_momentum, conv_impl=m.conv_impl)
  raise ValueError(f"unknown model.name {m.name!r}")


def build_head(config, hidden_dims: Sequence[int], output_dim: int, use_bn: bool, output_bn: bool,
               output_bias: Optional[bool] = None, bn_axis_name: Optional[str] = DATA) -> models.MLPHead:
  return models.MLPHead(hidden_dims=tuple(hidden_dims), output_dim=output_dim, use_bn=use_bn,
                        output_bn=output_bn, output_bias=output_bias, dtype=dtype_of(config),
                        bn_axis_name=bn_axis_name, bn_momentum=config.model.bn_momentum)


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


def ema(target, online, decay):
  """target <- decay * target + (1 - decay) * online, leaf by leaf."""
  return jax.tree.map(lambda t, o: decay * t + (1.0 - decay) * o, target, online)


class Method:
  """Base class; see the module docstring for the contract."""

  encoder: nn.Module  # set by subclasses; its variables live under params["encoder"]

  def __init__(self, config):
    self.config = config

  def views(self) -> Sequence[Mapping[str, Any]]:
    """One augmentation recipe per view, expanded from config.views (`num` copies of each)."""
    out = []
    for view in self.config.views.values():
      settings = {k: v for k, v in view.items() if k != "num"}
      out.extend(dict(settings) for _ in range(view.num))
    return out

  def init(self, rng, batch: Batch):
    raise NotImplementedError

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
