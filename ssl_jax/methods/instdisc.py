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

Under the mesh: each device draws its rows of the global batch's negatives from the step's key
(parallel.this_device_rows: 8 devices draw what 1 draws) and Z is the mean over all devices. The bank is
padded to a multiple of 4096 rows (never drawn; left out of the softmax) and laid out by
method.bank_sharding:
  "replicated" (default): every device holds it; the update scatters the all-gathered indices and
    features (update_state's per_example), so every replica writes the same rows;
  "sharded" (NCE only): device i holds rows [i R, (i + 1) R); lookups and updates go to the owner
    (parallel.row_sharded_take / row_sharded_set, inside the loss: LossOutput.state_updates), for banks
    larger than a chip wants to hold. Both layouts give the same step (tested).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import PartitionSpec as P

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
      # The paper's proximal term lambda ||f_i - v_i||^2 (Eq. 9, "Proximal Regularization"), off as in the
      # official code. The paper's text gives no value of lambda (the section and Figure 3's caption show
      # only that it smooths training), and the first author calls the bank momentum above the code's
      # equivalent of it, "more intuitive and easier to tune" (zhirongw/lemniscate.pytorch issue #11).
      proximal_lambda=0.0,
      bank_sharding="replicated",  # or "sharded": each device holds a slice of the rows (NCE only)
      # "random": lemniscate's uniform rows; "encoder": every row the initial network's feature of its
      # un-augmented image, one inference pass before step 0 (not in the paper or its code; for short runs).
      bank_init="random",
  ))

# Bank rows are padded to a multiple of this, so that a sharded bank splits evenly over any mesh of up to
# this many devices (a power of two) and the bank's shape does not depend on the mesh.
BANK_ROW_MULTIPLE = 4096


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
    if m.bank_sharding not in ("replicated", "sharded"):
      raise ConfigError(f"method.bank_sharding must be replicated or sharded, got {m.bank_sharding!r}")
    if m.bank_init not in ("random", "encoder"):
      raise ConfigError(f"method.bank_init must be random or encoder, got {m.bank_init!r}")
    if m.bank_sharding == "sharded" and not m.nce_k:
      raise ConfigError("method.bank_sharding=sharded needs NCE (nce_k > 0): the full softmax (nce_k 0) reads "
                        "every row on every device")

  @classmethod
  def check_mesh(cls, cfg, num_devices):
    if cfg.method.bank_sharding == "sharded" and BANK_ROW_MULTIPLE % num_devices:
      raise ConfigError(f"method.bank_sharding=sharded splits the bank's rows (a multiple of {BANK_ROW_MULTIPLE}) "
                        f"over the devices: use a power-of-two number of devices, not {num_devices}")

  @classmethod
  def apply_tiny(cls, cfg):
    cfg.method.feature_dim = min(cfg.method.feature_dim, 64)
    # Short CPU runs see each image a few times: lemniscate's random rows, rewritten once per epoch, leave
    # every positive a random target for the whole first epoch (figures: docs/cifar10_suite.md).
    cfg.method.bank_init = "encoder"
    if cfg.method.nce_k:
      cfg.method.nce_k = min(cfg.method.nce_k, 1024)

  def __init__(self, config, data=None):
    super().__init__(config, data)
    self.sharded = config.method.bank_sharding == "sharded"
    self.updated_in_loss = ("bank",) if self.sharded else ()
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

  def state_specs(self):
    return {"bank": P(parallel.DATA)} if self.sharded else {}

  def init(self, rng, batch):
    rng_net, rng_bank = jax.random.split(rng)
    params, batch_stats = base.init_network(self.network, rng_net, batch["views"][0])
    d = self.config.method.feature_dim
    # NCEAverage.py / LinearAverage.py: uniform in [-stdv, stdv], stdv = 1 / sqrt(d / 3), not normalized.
    stdv = 1.0 / math.sqrt(d / 3.0)
    rows = -(-self.bank_size // BANK_ROW_MULTIPLE) * BANK_ROW_MULTIPLE
    bank = jax.random.uniform(rng_bank, (rows, d), minval=-stdv, maxval=stdv)
    return params, batch_stats, {"bank": bank, "z": jnp.full((), -1.0, jnp.float32)}

  def initial_pass(self):
    """bank_init="encoder": the initial network's L2-normalized feature of each training image."""
    if self.config.method.bank_init != "encoder":
      return None

    def features(params, batch_stats, x):
      parts = ("encoder", "projector")  # the train state's params also hold the online probe
      variables = {"params": {k: params[k] for k in parts},
                   "batch_stats": {k: batch_stats[k] for k in parts if k in batch_stats}}
      _, z, _ = self.network.apply(variables, x, train=False)
      return losses.l2_normalize(z.astype(jnp.float32))
    return features

  def fill_state(self, values):
    """The bank with row i = values[i] (the padding rows, never read, zero)."""
    rows = -(-self.bank_size // BANK_ROW_MULTIPLE) * BANK_ROW_MULTIPLE
    bank = np.zeros((rows, self.config.method.feature_dim), np.float32)
    bank[:self.bank_size] = values
    return {"bank": bank}

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
    bank = method_state["bank"]  # sharded: this device's rows
    take = (lambda idx: parallel.row_sharded_take(bank, idx)) if self.sharded else (lambda idx: bank[idx])
    metrics, updates = {}, {}
    if m.nce_k:
      rows = take(self.negatives(jax.random.fold_in(rng, 1), index))          # [n, K + 1, d]
      exp_logits = jnp.exp(jnp.einsum("nkd,nd->nk", jax.lax.stop_gradient(rows), f) / m.temperature)
      first = parallel.mean(jnp.mean(jax.lax.stop_gradient(exp_logits))) * self.bank_size
      norm = jnp.where(method_state["z"] < 0, first, method_state["z"])
      loss = losses.instdisc_nce_loss(losses.instdisc_nce_scores(f, rows, m.temperature, norm), self.bank_size)
      metrics["z"] = norm
    else:
      norm = method_state["z"]
      loss = losses.instdisc_softmax_loss(f, bank[:self.bank_size], index, m.temperature)
    if m.proximal_lambda:
      own = jax.lax.stop_gradient(take(index))
      loss = loss + m.proximal_lambda * jnp.mean(jnp.sum(jnp.square(f - own), axis=-1))
    features = jax.lax.stop_gradient(f)
    if self.sharded:
      # Each device writes the rows it owns among the global batch's (update_state does this for a
      # replicated bank).
      all_index, all_features = parallel.all_gather(index), parallel.all_gather(features)
      owned = parallel.row_sharded_local(bank, all_index)
      updates["bank"] = parallel.row_sharded_set(
          bank, all_index, losses.memory_bank_update(owned, all_features, m.bank_momentum))
    return loss, base.LossOutput(batch_stats=batch_stats, metrics=metrics, representation=h, embedding=f,
                                 state_stats={"z": norm}, state_updates=updates,
                                 per_example={} if self.sharded else {"index": index, "features": features})

  def update_state(self, method_state, params, state_stats, per_example, step):
    if self.sharded:  # the bank was updated in the loss
      return {"bank": method_state["bank"], "z": state_stats["z"]}
    index = per_example["index"]  # [N], the global batch's dataset indices
    bank = method_state["bank"]
    new_rows = losses.memory_bank_update(bank[index], per_example["features"], self.config.method.bank_momentum)
    return {"bank": bank.at[index].set(new_rows), "z": state_stats["z"]}
