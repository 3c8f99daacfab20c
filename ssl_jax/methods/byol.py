"""BYOL (Grill et al. 2020, "Bootstrap Your Own Latent").

An online network (encoder, projector, predictor) regresses the projection of a target network whose
parameters are an exponential moving average of the online ones. The target parameters and the target's
own batch-norm statistics live in `method_state`; the target runs in training mode (batch statistics),
as in the official code, and no gradient reaches it.
"""

from __future__ import annotations

import jax
import ml_collections

from ssl_jax import losses, optim
from ssl_jax.methods import base


def default_config() -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(dict(
      name="byol",
      base_ema=0.996,           # tau_base, section 3.2.
      proj_hidden_dim=4096,     # Section 3.3: MLP 4096 -> 256 with BN, for projector and predictor.
      proj_dim=256,
      pred_hidden_dim=4096,
  ))


class BYOL(base.Method):

  default_config = staticmethod(default_config)

  @classmethod
  def check_config(cls, cfg):
    base.check_fraction(cfg, "base_ema")

  @classmethod
  def apply_tiny(cls, cfg):
    cfg.method.proj_hidden_dim = 256
    cfg.method.proj_dim = min(cfg.method.proj_dim, 64)
    cfg.method.pred_hidden_dim = 256

  def __init__(self, config, data=None):
    super().__init__(config, data)
    m = config.method
    self.encoder = encoder = base.build_encoder(config)
    # Section 3.3 / the official MLP: Linear -> BN -> ReLU -> Linear without bias, no output BN.
    projector = base.build_head(config, [m.proj_hidden_dim], m.proj_dim, use_bn=True, output_bn=False,
                                output_bias=False)
    predictor = base.build_head(config, [m.pred_hidden_dim], m.proj_dim, use_bn=True, output_bn=False,
                                output_bias=False)
    self.online = base.Network(encoder=encoder, projector=projector, predictor=predictor)
    self.target = base.Network(encoder=encoder, projector=projector)
    self.ema_schedule = optim.cosine_increase(m.base_ema, config.total_steps)

  def init(self, rng, batch):
    return base.init_with_target(self.online, rng, batch["views"][0])

  def loss(self, params, batch_stats, method_state, batch, rng, step):
    x1, x2 = batch["views"]
    # Each view is its own forward pass (own BN statistics), as in the official code.
    (h1, z1, p1), batch_stats = base.apply_train(self.online, params, batch_stats, x1, base.dropout_key(rng, 0))
    (_, _, p2), batch_stats = base.apply_train(self.online, params, batch_stats, x2, base.dropout_key(rng, 1))
    target_params, target_stats = method_state["target_params"], method_state["target_batch_stats"]
    (_, t1, _), target_stats = base.apply_train(self.target, target_params, target_stats, x1,
                                                base.dropout_key(rng, 2))
    (_, t2, _), target_stats = base.apply_train(self.target, target_params, target_stats, x2,
                                                base.dropout_key(rng, 3))
    loss = losses.byol_loss(p1, p2, jax.lax.stop_gradient(t1), jax.lax.stop_gradient(t2))
    return loss, base.LossOutput(batch_stats=batch_stats, metrics={}, representation=h1, embedding=z1,
                                 state_stats={"target_batch_stats": target_stats})

  def update_state(self, method_state, params, state_stats, per_example, step):
    tau = self.ema_schedule(step)
    target = {k: params[k] for k in method_state["target_params"]}
    return {"target_params": base.ema(method_state["target_params"], target, tau),
            "target_batch_stats": state_stats["target_batch_stats"]}
