"""VICReg (Bardes, Ponce, LeCun 2022, "VICReg: Variance-Invariance-Covariance Regularization").

Two views through one encoder and expander (projector); the loss is 25 x invariance (mean squared error
between the views' embeddings, on each device's own examples, as the official code) + 25 x variance
(a hinge keeping each dimension's std over the global batch near 1) + 1 x covariance (off-diagonal
covariance over the global batch), losses.py vicreg_loss. The global terms read the embeddings gathered
from every device with their gradient (the official FullGatherLayer, main_vicreg.py l.307-323).
"""

from __future__ import annotations

import ml_collections

from ssl_jax import losses, parallel
from ssl_jax.errors import ConfigError
from ssl_jax.methods import base


def default_config() -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(dict(
      name="vicreg",
      # main_vicreg.py l.44-63 / l.254-266: expander 8192-8192-8192, Linear (with bias)-BN-ReLU twice, then
      # a Linear without bias; coefficients 25 / 25 / 1.
      proj_hidden_dim=8192,
      proj_dim=8192,
      proj_layers=3,
      sim_coeff=25.0,
      std_coeff=25.0,
      cov_coeff=1.0,
  ))


class VICReg(base.Method):

  default_config = staticmethod(default_config)

  @classmethod
  def check_config(cls, cfg):
    m = cfg.method
    if min(m.sim_coeff, m.std_coeff, m.cov_coeff) < 0:
      raise ConfigError(f"method.sim_coeff, std_coeff and cov_coeff must be >= 0, got {m.sim_coeff}, "
                        f"{m.std_coeff}, {m.cov_coeff}")
    base.check_heads(cfg, "proj_hidden_dim", "proj_dim")
    if cfg.batch_size < 2:
      raise ConfigError("vicreg needs batch_size >= 2 (its variance and covariance are over the batch)")
    base.check_num_views(cfg, 2)

  @classmethod
  def apply_tiny(cls, cfg):
    cfg.method.update(proj_hidden_dim=256, proj_dim=256)

  def __init__(self, config, data=None):
    super().__init__(config, data)
    m = config.method
    self.encoder = base.build_encoder(config)
    projector = base.build_head(config, [m.proj_hidden_dim] * (m.proj_layers - 1), m.proj_dim, use_bn=True,
                                output_bn=False, output_bias=False, hidden_bias=True)
    self.network = base.Network(encoder=self.encoder, projector=projector)

  def loss(self, params, batch_stats, method_state, batch, rng, step):
    x1, x2 = batch["views"]
    (h1, z1, _), batch_stats = base.apply_train(self.network, params, batch_stats, x1, base.dropout_key(rng, 0))
    (_, z2, _), batch_stats = base.apply_train(self.network, params, batch_stats, x2, base.dropout_key(rng, 1))
    m = self.config.method
    loss, terms = losses.vicreg_loss(z1, z2, parallel.all_gather(z1), parallel.all_gather(z2),
                                     m.sim_coeff, m.std_coeff, m.cov_coeff)
    return loss, base.LossOutput(batch_stats=batch_stats, metrics=terms, representation=h1, embedding=z1)
