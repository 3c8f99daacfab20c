"""SimSiam (Chen & He 2021, "Exploring Simple Siamese Representation Learning").

One encoder and projector applied to two views, a predictor on top, and a symmetric negative cosine in
which each view's projection is a constant target for the other view's prediction (the stop-gradient is
what prevents collapse, section 4.1). No negatives, no momentum encoder; batch norm synchronized over all
devices, as the official code converts every BN to SyncBatchNorm (main_simsiam.py l.161). Each view is its
own forward pass, with its own batch statistics, as in the official builder (builder.py l.57-60).
"""

from __future__ import annotations

import ml_collections

from ssl_jax import losses
from ssl_jax.methods import base


def default_config() -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(dict(
      name="simsiam",
      # Official builder.py l.27-42 (RECIPES.md section 5): projector 3 layers of 2048, the last followed by
      # BN without affine; predictor 2048 -> 512 -> 2048 (the bottleneck of section 4.4).
      proj_hidden_dim=2048,
      proj_dim=2048,
      proj_layers=3,
      pred_hidden_dim=512,
  ))


class SimSiam(base.Method):

  default_config = staticmethod(default_config)

  @classmethod
  def check_config(cls, cfg):
    base.check_heads(cfg, "proj_hidden_dim", "proj_dim", "pred_hidden_dim")
    base.check_num_views(cfg, 2)

  @classmethod
  def apply_tiny(cls, cfg):
    cfg.method.update(proj_hidden_dim=256, proj_dim=256, pred_hidden_dim=64)

  def __init__(self, config, data=None):
    super().__init__(config, data)
    m = config.method
    self.encoder = base.build_encoder(config)
    # Hidden layers Linear(bias=False)-BN-ReLU; the last Linear's bias is frozen in the official code and
    # sits before a BN that removes any offset, so it is left out; the last BN has no affine parameters.
    projector = base.build_head(config, [m.proj_hidden_dim] * (m.proj_layers - 1), m.proj_dim, use_bn=True,
                                output_bn=True, output_bias=False, output_bn_scale=False)
    # Linear(bias=False)-BN-ReLU, then Linear with a bias and no BN (builder.py l.39-42).
    predictor = base.build_head(config, [m.pred_hidden_dim], m.proj_dim, use_bn=True, output_bn=False,
                                output_bias=True)
    self.network = base.Network(encoder=self.encoder, projector=projector, predictor=predictor)

  def loss(self, params, batch_stats, method_state, batch, rng, step):
    x1, x2 = batch["views"]
    (h1, z1, p1), batch_stats = base.apply_train(self.network, params, batch_stats, x1, base.dropout_key(rng, 0))
    (_, z2, p2), batch_stats = base.apply_train(self.network, params, batch_stats, x2, base.dropout_key(rng, 1))
    loss = losses.simsiam_loss(p1, p2, z1, z2)
    return loss, base.LossOutput(batch_stats=batch_stats, metrics={}, representation=h1, embedding=z1)
