"""InstDisc (Wu, Xiong, Yu, Lin 2018, "Unsupervised Feature Learning via Non-Parametric Instance
Discrimination"; official code: zhirongw/lemniscate.pytorch; RECIPES.md section 1).

Every training image is its own class. The encoder's features go through a linear map to 128 dimensions and
are L2-normalized (f); a memory bank holds one such vector per training image (method_state["bank"],
[num_train_examples, 128], in the state and the checkpoint). The "class weight" of image i is its bank row
v_i, so P(i | f) = exp(v_i . f / T) / Z, approximated by NCE against K rows drawn uniformly with
replacement from the whole bank (the positive written into slot 0, so a negative may repeat it), with the
normalizer Z estimated once, on the first step, as mean(exp(v . f / T)) x N over the global batch, and
kept in the state (method_state["z"], -1 until then) so a resumed run never re-estimates it. nce_k = 0 is
the full non-parametric softmax over every row (the official CIFAR recipe). After each step the rows of
the global batch become normalize(m v + (1 - m) f), m = 0.5; no gradient reaches the bank.

Under the mesh: the bank is replicated; each device draws its rows of the global batch's negatives from
the step's key (parallel.this_device_rows: 8 devices draw what 1 draws), Z is the mean over all devices,
and the update scatters the all-gathered indices and features (update_state's per_example), so every
replica writes the same rows.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import ml_collections

from ssl_jax import losses, parallel
from ssl_jax.errors import ConfigError
from ssl_jax.methods import base


def default_config() -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(dict(
      name="instdisc",
      feature_dim=128,       # main.py --low-dim 128: the ResNet's fc replaced by Linear(2048, 128)
      nce_k=4096,            # negatives per example (--nce-k); 0: the full non-parametric softmax
      temperature=0.07,      # --nce-t
      bank_momentum=0.5,     # --nce-m: v <- normalize(m v + (1 - m) f)
      # The paper's proximal term lambda ||f_i - v_i||^2 (section 3.4); the official code has none.
      proximal_lambda=0.0,
  ))


class InstDisc(base.Method):

  default_config = staticmethod(default_config)

  @classmethod
  def check_config(cls, cfg):
    m = cfg.method
    base.check_positive(cfg, "temperature", "feature_dim")
    if not 0.0 <= m.bank_momentum < 1.0:
      raise ConfigError(f"method.bank_momentum must lie in [0, 1), got {m.bank_momentum}")
    if m.nce_k < 0 or m.proximal_lambda < 0:
      raise ConfigError(f"method.nce_k and method.proximal_lambda must be >= 0, got {m.nce_k}, {m.proximal_lambda}")
    base.check_num_views(cfg, 1)

  @classmethod
  def apply_tiny(cls, cfg):
    cfg.method.feature_dim = min(cfg.method.feature_dim, 64)
    if cfg.method.nce_k:
      cfg.method.nce_k = min(cfg.method.nce_k, 1024)

  def __init__(self, config, data=None):
    super().__init__(config, data)
    self.encoder = base.build_encoder(config)
    # lemniscate's models replace the fc with Linear(features, low_dim) (with bias), then Normalize.
    self.network = base.Network(encoder=self.encoder,
                                projector=base.build_head(config, [], config.method.feature_dim,
                                                          use_bn=False, output_bn=False))

  @property
  def bank_size(self) -> int:
    if self.data is None:
      raise ValueError("InstDisc's memory bank has one row per training image: build it with the data's facts "
                       "(methods.get(config, DataFacts(...)))")
    return self.data.num_train_examples

  def init(self, rng, batch):
    rng_net, rng_bank = jax.random.split(rng)
    params, batch_stats = base.init_network(self.network, rng_net, batch["views"][0])
    d = self.config.method.feature_dim
    # NCEAverage.py / LinearAverage.py: uniform in [-stdv, stdv], stdv = 1 / sqrt(d / 3), not normalized.
    stdv = 1.0 / math.sqrt(d / 3.0)
    bank = jax.random.uniform(rng_bank, (self.bank_size, d), minval=-stdv, maxval=stdv)
    return params, batch_stats, {"bank": bank, "z": jnp.full((), -1.0, jnp.float32)}

  def negatives(self, rng, index):
    """[n, K + 1] bank rows compared with this device's n examples: K drawn uniformly with replacement for
    the whole global batch from `rng` (this device's rows taken), slot 0 the example's own index."""
    k = self.config.method.nce_k
    drawn = parallel.this_device_rows(
        lambda size: jax.random.randint(rng, (size, k + 1), 0, self.bank_size), index.shape[0])
    return drawn.at[:, 0].set(index)

  def loss(self, params, batch_stats, method_state, batch, rng, step):
    m = self.config.method
    (h, z, _), batch_stats = base.apply_train(self.network, params, batch_stats, batch["views"][0],
                                              base.dropout_key(rng, 0))
    f = losses.l2_normalize(z.astype(jnp.float32))
    index = batch["index"].astype(jnp.int32)
    bank = method_state["bank"]
    metrics = {}
    if m.nce_k:
      rows = bank[self.negatives(jax.random.fold_in(rng, 1), index)]          # [n, K + 1, d]
      exp_logits = jnp.exp(jnp.einsum("nkd,nd->nk", jax.lax.stop_gradient(rows), f) / m.temperature)
      first = parallel.mean(jnp.mean(jax.lax.stop_gradient(exp_logits))) * self.bank_size
      norm = jnp.where(method_state["z"] < 0, first, method_state["z"])
      loss = losses.instdisc_nce_loss(losses.instdisc_nce_scores(f, rows, m.temperature, norm), self.bank_size)
      metrics["z"] = norm
    else:
      norm = method_state["z"]
      loss = losses.instdisc_softmax_loss(f, bank, index, m.temperature)
    if m.proximal_lambda:
      own = jax.lax.stop_gradient(bank[index])
      loss = loss + m.proximal_lambda * jnp.mean(jnp.sum(jnp.square(f - own), axis=-1))
    return loss, base.LossOutput(batch_stats=batch_stats, metrics=metrics, representation=h, embedding=f,
                                 state_stats={"z": norm},
                                 per_example={"index": index, "features": jax.lax.stop_gradient(f)})

  def update_state(self, method_state, params, state_stats, per_example, step):
    index = per_example["index"]  # [N], the global batch's dataset indices
    bank = method_state["bank"]
    new_rows = losses.memory_bank_update(bank[index], per_example["features"], self.config.method.bank_momentum)
    return {"bank": bank.at[index].set(new_rows), "z": state_stats["z"]}
