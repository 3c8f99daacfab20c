"""MoCo v3 (Chen, Xie, He 2021, "An Empirical Study of Training Self-Supervised Vision Transformers").

A query network (encoder, projector, predictor) and a momentum network (encoder, projector) whose
parameters are an exponential moving average of the query network's; no queue: the keys are those of the
current global batch, gathered from every device without gradient. The loss is the symmetric contrastive
loss ctr(q1, k2) + ctr(q2, k1), each term a cross-entropy over the gathered keys scaled by 2T
(moco/builder.py l.63-73, 96; ssl_jax.losses.moco_v3_loss).

Order of the momentum update. The official forward updates the momentum network with the coefficient of
the current iteration *before* computing the keys (builder.py l.89-94; main_moco.py l.342-345). Here the
update runs after the optimizer step (update_state) with the coefficient of the next step, m(step + 1),
so the keys of step s come from the same momentum parameters as in the official code: m_s mixes the query
parameters as they are at the start of step s. The momentum network is initialized as a copy.

Batch norm in the heads is synchronized over every device (the official code converts the model to
SyncBatchNorm); each view is its own forward pass with its own statistics, and the momentum network keeps
its own running statistics (its buffers are not averaged, only its parameters).
"""

from __future__ import annotations

import jax
import ml_collections

from ssl_jax import losses, optim, parallel
from ssl_jax.methods import base


def default_config() -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(dict(
      name="moco_v3",
      temperature=0.2,          # --moco-t 0.2 (ViT, CONFIG.md); the ResNet recipe uses 1.0.
      base_momentum=0.99,       # --moco-m 0.99 with --moco-m-cos: cosine to 1 (main_moco.py l.431-434).
      cosine_momentum=True,
      # builder.py l.36-52, 99-122: every Linear without bias, hidden layers BN + ReLU; projector 3 layers
      # (ViT) or 2 (ResNet) ending in BN without affine; predictor 2 layers, ending in BN without affine
      # for ViT (pred_output_bn) and without BN for ResNet.
      proj_layers=3,
      proj_hidden_dim=4096,
      proj_dim=256,
      pred_hidden_dim=4096,
      pred_output_bn=True,
  ))


class MoCoV3(base.Method):

  default_config = staticmethod(default_config)

  @classmethod
  def check_config(cls, cfg):
    base.check_positive(cfg, "temperature")
    base.check_fraction(cfg, "base_momentum")
    base.check_heads(cfg, "proj_hidden_dim", "proj_dim", "pred_hidden_dim")
    base.check_num_views(cfg, 2)

  @classmethod
  def apply_tiny(cls, cfg):
    cfg.method.update(proj_hidden_dim=256, proj_dim=64, pred_hidden_dim=256)

  def __init__(self, config, data=None):
    super().__init__(config, data)
    m = config.method
    self.encoder = base.build_encoder(config)
    projector = base.build_head(config, [m.proj_hidden_dim] * (m.proj_layers - 1), m.proj_dim, use_bn=True,
                                output_bn=True, output_bias=False, output_bn_scale=False)
    predictor = base.build_head(config, [m.pred_hidden_dim], m.proj_dim, use_bn=True,
                                output_bn=m.pred_output_bn, output_bias=False, output_bn_scale=False)
    self.online = base.Network(encoder=self.encoder, projector=projector, predictor=predictor)
    self.momentum_network = base.Network(encoder=self.encoder, projector=projector)
    if m.cosine_momentum:
      self.momentum = optim.cosine_increase(m.base_momentum, config.total_steps)
    else:
      self.momentum = lambda step: m.base_momentum

  def init(self, rng, batch):
    return base.init_with_target(self.online, rng, batch["views"][0])

  def loss(self, params, batch_stats, method_state, batch, rng, step):
    x1, x2 = batch["views"]
    n = x1.shape[0]
    (h1, z1, q1), batch_stats = base.apply_train(self.online, params, batch_stats, x1, base.dropout_key(rng, 0))
    (_, _, q2), batch_stats = base.apply_train(self.online, params, batch_stats, x2, base.dropout_key(rng, 1))
    target_params, target_stats = method_state["target_params"], method_state["target_batch_stats"]
    (_, k1, _), target_stats = base.apply_train(self.momentum_network, target_params, target_stats, x1,
                                                base.dropout_key(rng, 2))
    (_, k2, _), target_stats = base.apply_train(self.momentum_network, target_params, target_stats, x2,
                                                base.dropout_key(rng, 3))
    # The keys of every device (concat_all_gather, builder.py l.66), without gradient.
    k1_all = jax.lax.stop_gradient(parallel.all_gather(k1))
    k2_all = jax.lax.stop_gradient(parallel.all_gather(k2))
    loss = losses.moco_v3_loss(q1, q2, k1_all, k2_all, parallel.device_index() * n,
                               self.config.method.temperature)
    return loss, base.LossOutput(batch_stats=batch_stats, metrics={"momentum": self.momentum(step)},
                                 representation=h1, embedding=z1,
                                 state_stats={"target_batch_stats": target_stats})

  def update_state(self, method_state, params, state_stats, per_example, step):
    # m(step + 1): the coefficient the official code applies at the start of the next step (docstring).
    m = self.momentum(step + 1)
    target = {k: params[k] for k in method_state["target_params"]}
    return {"target_params": base.ema(method_state["target_params"], target, m),
            "target_batch_stats": state_stats["target_batch_stats"]}
