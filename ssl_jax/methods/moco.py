"""MoCo v1 and v2 (He et al. 2020, "Momentum Contrast for Unsupervised Visual Representation Learning";
Chen et al. 2020, "Improved Baselines with Momentum Contrastive Learning"): one method, two configs
(configs/moco_v1.py: a linear 128-d head, temperature 0.07, the v1 augmentations, steps at epochs 120 and
160; configs/moco_v2.py: an MLP head, temperature 0.2, "aug+", cosine).

A query encoder trained by InfoNCE against a momentum-updated key encoder and a queue of K keys from
earlier batches (`method_state`: key params, key BN statistics, queue, queue pointer).

Shuffle BN (MoCo section 3.3). As in the official code, both encoders use per-device batch norm (no
cross-device statistics), and the key encoder sees the batch in a shuffled order, so that a query and its
positive key are normalized with statistics of different sub-batches and cannot "cheat" through them.
Under the mesh this is done inside the per-device loss:
  1. all_gather the key-view images of every device -> the global batch [N, ...];
  2. draw one permutation of N from the step's key (identical on every device, no communication);
  3. each device runs the key encoder on its slice perm[d*n:(d+1)*n] of the shuffled batch;
  4. all_gather the keys, undo the permutation, and keep the keys of this device's own examples.
Steps 1 and 4 are the only communication; with one device the shuffle changes nothing, as in the
official code on one GPU.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections

from ssl_jax import losses, parallel
from ssl_jax.errors import ConfigError
from ssl_jax.methods import base


def default_config() -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(dict(
      name="moco",
      temperature=0.2,          # MoCo v2, section 2 ("tau = 0.2"); v1: 0.07.
      momentum=0.999,           # MoCo section 3.1 / 4.1: m = 0.999.
      queue_size=65536,         # K = 65536 (MoCo section 4.1).
      proj_hidden_dim=2048,     # MoCo v2: 2-layer MLP head, 2048 hidden, ReLU, no BN; 0: v1's linear fc.
      proj_dim=128,
      shuffle_bn=True,
  ))


class MoCo(base.Method):

  default_config = staticmethod(default_config)

  @classmethod
  def check_config(cls, cfg):
    m = cfg.method
    base.check_positive(cfg, "temperature")
    base.check_fraction(cfg, "momentum")
    if m.queue_size <= 0 or m.queue_size % cfg.batch_size:
      # The queue is replaced a whole global batch at a time (the official code asserts K % batch == 0).
      raise ConfigError(f"method.queue_size={m.queue_size} must be a multiple of batch_size={cfg.batch_size}")

  @classmethod
  def apply_tiny(cls, cfg):
    if cfg.method.proj_hidden_dim:
      cfg.method.proj_hidden_dim = 256
    cfg.method.proj_dim = min(cfg.method.proj_dim, 64)
    cfg.method.queue_size = 4096

  def __init__(self, config, data=None):
    super().__init__(config, data)
    m = config.method
    # bn_axis_name=None: per-device statistics for both encoders (official MoCo uses no SyncBN).
    self.encoder = base.build_encoder(config, bn_axis_name=None)
    self.network = base.Network(
        encoder=self.encoder,
        projector=base.build_head(config, [m.proj_hidden_dim] if m.proj_hidden_dim else [], m.proj_dim,
                                  use_bn=False, output_bn=False, bn_axis_name=None))

  def init(self, rng, batch):
    rng_net, rng_queue = jax.random.split(rng)
    params, batch_stats = base.init_network(self.network, rng_net, batch["views"][0])
    m = self.config.method
    # Random unit vectors, as the official code initializes its queue.
    queue = losses.l2_normalize(jax.random.normal(rng_queue, (m.queue_size, m.proj_dim)))
    return params, batch_stats, {"key_params": params, "key_batch_stats": batch_stats, "queue": queue,
                                 "queue_ptr": jnp.zeros((), jnp.int32)}

  def keys(self, key_params, key_stats, x, rng):
    """Key projections of this device's examples x [n, ...], computed under shuffle BN (module docstring).
    Returns (keys [n, dim], new key BN statistics of this device)."""
    if not self.config.method.shuffle_bn:
      (_, k, _), key_stats = base.apply_train(self.network, key_params, key_stats, x, base.dropout_key(rng, 1))
      return k, key_stats
    n = x.shape[0]
    start = parallel.device_index() * n
    x_all = parallel.all_gather(x)
    perm = jax.random.permutation(rng, x_all.shape[0])
    mine = jax.lax.dynamic_slice_in_dim(perm, start, n)
    (_, k_shuffled, _), key_stats = base.apply_train(self.network, key_params, key_stats, x_all[mine],
                                                     base.dropout_key(rng, 1))
    k_all = parallel.all_gather(k_shuffled)[jnp.argsort(perm)]
    return jax.lax.dynamic_slice_in_dim(k_all, start, n), key_stats

  def loss(self, params, batch_stats, method_state, batch, rng, step):
    xq, xk = batch["views"]
    (h, q, _), batch_stats = base.apply_train(self.network, params, batch_stats, xq, base.dropout_key(rng, 0))
    k, key_stats = self.keys(method_state["key_params"], method_state["key_batch_stats"], xk, rng)
    k = jax.lax.stop_gradient(losses.l2_normalize(k))
    loss = losses.info_nce_queue(q, k, method_state["queue"], self.config.method.temperature)
    return loss, base.LossOutput(batch_stats=batch_stats, metrics={}, representation=h, embedding=q,
                                 state_stats={"key_batch_stats": key_stats}, per_example={"keys": k})

  def update_state(self, method_state, params, state_stats, per_example, step):
    keys = per_example["keys"]  # [N, dim], the global batch in example order
    queue_size = method_state["queue"].shape[0]
    ptr = method_state["queue_ptr"]
    return {
        "key_params": base.ema(method_state["key_params"], params, self.config.method.momentum),
        "key_batch_stats": state_stats["key_batch_stats"],
        "queue": jax.lax.dynamic_update_slice_in_dim(method_state["queue"], keys, ptr, axis=0),
        "queue_ptr": (ptr + keys.shape[0]) % queue_size,
    }
