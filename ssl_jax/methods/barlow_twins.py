"""Barlow Twins (Zbontar et al. 2021, "Barlow Twins: Self-Supervised Learning via Redundancy Reduction").

Two views through one encoder and projector; the loss drives the cross-correlation matrix of the two
views' embeddings, each batch-normalized over the global batch, towards the identity (losses.py,
barlow_twins_loss). The statistics and the matrix are sums over every device (parallel.sum), so each
device's loss is the loss of the global batch and the step's gradient is its true gradient.

The official code's gradient is not: its all_reduce of the matrix is invisible to autograd and DDP then
averages over the GPUs, so its effective gradient is the true one divided by the number of GPUs
(RECIPES.md section 7; barlowtwins#8). LARS cancels a global factor for the adapted weights but not for
the biases and BN parameters, which are excluded from adaptation and get their own learning rate.
`method.official_gradient_gpus = G` reproduces the official effective gradient of a G-GPU run (the loss
is multiplied by 1/G; the logged `barlow_loss` stays unscaled); 0 (the default) keeps the true gradient.
The published run used 16 GPUs (official README: "approximately 7 days on 16 V100 GPUs").
`method.loss_scale` multiplies the loss the gradient comes from as solo-learn's `scale_loss` (0.1 in its
CIFAR recipe, solo/losses/barlow.py); the official code has none (1.0).
"""

from __future__ import annotations

import ml_collections

from ssl_jax import losses, parallel
from ssl_jax.errors import ConfigError
from ssl_jax.methods import base


def default_config() -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(dict(
      name="barlow_twins",
      # main.py l.29-42 / l.185-196: projector 8192-8192-8192, Linear(bias=False)-BN-ReLU twice, then a
      # Linear(bias=False); lambda 0.0051.
      proj_hidden_dim=8192,
      proj_dim=8192,
      proj_layers=3,
      lambd=0.0051,
      official_gradient_gpus=0,  # 0: true gradient; G: the official DDP code's gradient at G GPUs (1/G)
      loss_scale=1.0,            # x the loss behind the gradient (solo-learn's scale_loss); logged unscaled
  ))


class BarlowTwins(base.Method):

  default_config = staticmethod(default_config)

  @classmethod
  def check_config(cls, cfg):
    m = cfg.method
    if m.lambd < 0 or m.official_gradient_gpus < 0:
      raise ConfigError(f"method.lambd and method.official_gradient_gpus must be >= 0, got {m.lambd}, "
                        f"{m.official_gradient_gpus}")
    base.check_positive(cfg, "loss_scale")
    base.check_heads(cfg, "proj_hidden_dim", "proj_dim")
    base.check_num_views(cfg, 2)

  @classmethod
  def apply_tiny(cls, cfg):
    cfg.method.update(proj_hidden_dim=256, proj_dim=256)

  def __init__(self, config, data=None):
    super().__init__(config, data)
    m = config.method
    self.encoder = base.build_encoder(config)
    projector = base.build_head(config, [m.proj_hidden_dim] * (m.proj_layers - 1), m.proj_dim, use_bn=True,
                                output_bn=False, output_bias=False)
    self.network = base.Network(encoder=self.encoder, projector=projector)

  def loss(self, params, batch_stats, method_state, batch, rng, step):
    x1, x2 = batch["views"]
    (h1, z1, _), batch_stats = base.apply_train(self.network, params, batch_stats, x1, base.dropout_key(rng, 0))
    (_, z2, _), batch_stats = base.apply_train(self.network, params, batch_stats, x2, base.dropout_key(rng, 1))
    m = self.config.method
    loss = losses.barlow_twins_loss(z1, z2, m.lambd, global_sum=parallel.sum)
    scaled = (loss / m.official_gradient_gpus if m.official_gradient_gpus else loss) * m.loss_scale
    return scaled, base.LossOutput(batch_stats=batch_stats, metrics={"barlow_loss": loss}, representation=h1,
                                   embedding=z1)
