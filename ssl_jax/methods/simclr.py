"""SimCLR (Chen et al. 2020, "A Simple Framework for Contrastive Learning of Visual Representations";
v2: Chen et al. 2020, "Big Self-Supervised Models are Strong Semi-Supervised Learners").

Two views per image, one encoder and projection head with global batch norm, NT-Xent over the whole
global batch: each device gathers every device's projections and contrasts its own anchors against all
2N-2 negatives. The gather keeps its gradient (its transpose is a reduce-scatter), so each device's
projections receive the gradient of every other device's loss terms, exactly as on one device.
"""

from __future__ import annotations

import jax.numpy as jnp
import ml_collections

from ssl_jax import losses, parallel
from ssl_jax.errors import ConfigError
from ssl_jax.methods import base


def default_config() -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(dict(
      name="simclr",
      temperature=0.1,          # Table 5 / B.7: 0.1 for batch 4096 on ImageNet.
      proj_hidden_dim=2048,
      proj_dim=128,             # Section 4.2 / Figure 8: output size does not matter much; 128 is used.
      proj_layers=2,            # v1: 2 layers (one hidden); v2: 3.
  ))


class SimCLR(base.Method):

  default_config = staticmethod(default_config)

  @classmethod
  def check_config(cls, cfg):
    if cfg.method.temperature <= 0:
      raise ConfigError(f"method.temperature must be > 0, got {cfg.method.temperature}")
    if cfg.method.proj_layers < 1:
      raise ConfigError(f"method.proj_layers must be >= 1, got {cfg.method.proj_layers}")

  @classmethod
  def apply_tiny(cls, cfg):
    cfg.method.proj_hidden_dim = 256
    cfg.method.proj_dim = min(cfg.method.proj_dim, 64)

  def __init__(self, config, data=None):
    super().__init__(config, data)
    m = config.method
    self.encoder = base.build_encoder(config)
    self.network = base.Network(
        encoder=self.encoder,
        projector=base.build_head(config, [m.proj_hidden_dim] * (m.proj_layers - 1), m.proj_dim,
                                  use_bn=True, output_bn=True))

  def loss(self, params, batch_stats, method_state, batch, rng, step):
    x1, x2 = batch["views"]
    n = x1.shape[0]
    # One forward pass over both views, as the official code does, so batch norm sees all 2N views.
    (h, z, _), new_batch_stats = base.apply_train(self.network, params, batch_stats,
                                                  jnp.concatenate([x1, x2], axis=0), base.dropout_key(rng, 0))
    z1, z2 = z[:n], z[n:]
    z1_all, z2_all = parallel.all_gather(z1), parallel.all_gather(z2)
    loss = losses.nt_xent(z1, z2, z1_all, z2_all, parallel.device_index() * n, self.config.method.temperature)
    return loss, base.LossOutput(batch_stats=new_batch_stats, metrics={}, representation=h[:n], embedding=z1)
