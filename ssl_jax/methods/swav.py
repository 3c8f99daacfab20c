"""SwAV (Caron et al. 2020, "Unsupervised Learning of Visual Features by Contrasting Cluster Assignments").

Every crop of an image (two global crops, then any number of smaller local ones: multi-crop, section 3.2)
goes through one encoder and one projection head to an L2-normalized embedding z, whose dot products
with K L2-normalized prototypes c_k are the crop's scores s = z^T C. The codes q of the assignment crops
(the two global ones) are computed from their scores by Sinkhorn-Knopp over the global batch (section 3.1,
eq. 3 and the Q* below it), and every other crop predicts them through a softmax of its own scores at
temperature t = 0.1 (eq. 1-2):

    L = mean_{a in crops_for_assign} 1 / (V - 1) sum_{v != a} mean_b [ -sum_k q_a[b, k] log softmax(s_v[b] / t)_k ]

(losses.swav_loss; facebookresearch/swav main_swav.py l.289-315). Network as the official
src/resnet50.py: the encoder's pooled output (2048-d for ResNet-50: the representation evaluated), a
projection head Linear(2048)-BN-ReLU-Linear(128) (l.199-210) then L2 normalization (forward_head,
l.297-306), and the prototypes as a bias-free Linear(128, K) (l.212-217). Batch norm is synchronized over
every device (SyncBN; the official 800-epoch script synchronizes groups of 8 GPUs, `--sync_bn apex`: here
all devices form one group).

Multi-crop forward. As the official forward (src/resnet50.py l.308-323): the encoder runs once per run of
consecutive crops of the same resolution (base.forward_crops), and the projection head once on the
concatenation of all crops, so the head's batch norm normalizes the global and local crops together.

Prototypes. The official code L2-normalizes each prototype, without gradient, before every forward
(main_swav.py l.278-281). Here they are normalized at init and again right after every optimizer step
(`after_update`), which gives every forward the same unit-norm prototypes. They are frozen for the first
iterations (main_swav.py l.325-328: their grad is None, so SGD/LARC skips them altogether); that is the
config's optimizer group on "prototypes/.*" with frozen_until_step (configs/swav.py), which drops their
update and holds their momentum as PyTorch does. The renormalization still runs while they are frozen, as
the official code's does.

Queue (main_swav.py l.207-231, 294-304). When the batch is small next to K, Sinkhorn cannot spread it
evenly over the prototypes (section 3.1, "Working with small batches"), so it also sees the embeddings of
the assignment crops of earlier batches, scored against the current prototypes; only the batch's own
codes enter the loss. Officially each of the W ranks keeps a queue [len(crops_for_assign), L / W, 128] of
its own past local batches, newest first, created (zero) at epoch `epoch_queue_starts`, pushed after the
step's codes are computed, and used once full (its last row non-zero).
Here `method_state["queue"]` is one replicated global queue [len(crops_for_assign), L, dim], pushed
first-in first-out in `update_state` with the gathered embeddings of the whole global batch, newest first,
from the step `self.data.steps(queue_start_epoch)` on, and used once full (its last row non-zero). The W
official per-rank queues together and this queue hold the same embeddings: those of the last L / B global
batches. In the per-device loss, device d hands Sinkhorn the rows [d L / W, (d + 1) L / W), and Sinkhorn's
sums run over all devices (global_sum=parallel.sum), so each queued embedding counts exactly once, as
officially. Which device holds which queue row differs from the official layout, but Sinkhorn's sums run
over every row and a row's code depends only on those sums and its own scores: the batch's codes, and so
the step, are the same on any number of devices (up to float summation order), and the state holds no
device count, so a checkpoint resumes on any other. "In use" switches at a step inside a compiled run,
hence a `lax.cond`; its condition is the same on every device, so every device runs the same branch and
its collectives match.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from ssl_jax import losses, parallel
from ssl_jax.errors import ConfigError
from ssl_jax.methods import base

# The largest exponent float32's exp can return without overflow (exp(88.72) = 3.4e38).
_LOG_FLOAT32_MAX = math.log(float(np.finfo(np.float32).max))


def default_config() -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(dict(
      name="swav",
      # main_swav.py l.57-72 and every official script: t = 0.1, epsilon = 0.05, 3 Sinkhorn iterations,
      # a 128-d embedding, 3000 prototypes, codes from crops 0 and 1 (the two global crops).
      temperature=0.1,
      epsilon=0.05,
      sinkhorn_iterations=3,
      proj_hidden_dim=2048,     # src/resnet50.py hidden_mlp=2048 for ResNet-50; 0: a single Linear
      proj_dim=128,
      num_prototypes=3000,
      crops_for_assign=(0, 1),
      # Embeddings of the assignment crops of past batches, per crop (0: no queue, the batch-4096 recipe);
      # a multiple of batch_size. Started at this epoch (epoch_queue_starts, main_swav.py l.71, 225-231).
      queue_length=0,
      queue_start_epoch=15.0,
      # Each example's code rounded to a one-hot (losses.swav_loss); off in every official recipe.
      hard_codes=False,
  ))


class SwAV(base.Method):

  default_config = staticmethod(default_config)

  @classmethod
  def check_config(cls, cfg):
    m = cfg.method
    sizes = base.view_crop_sizes(cfg)
    if len(sizes) < 2:
      raise ConfigError(f"swav takes at least 2 crops (codes of one are predicted from the others), the config "
                        f"defines {len(sizes)}")
    assign = tuple(m.crops_for_assign)
    if not assign or len(set(assign)) != len(assign) or not all(0 <= a < len(sizes) for a in assign):
      raise ConfigError(f"method.crops_for_assign={assign} must be distinct crop indices in [0, {len(sizes)})")
    # The codes are the targets: computed from the full-resolution (global) crops only (section 3.2).
    if any(sizes[a] != max(sizes) for a in assign):
      raise ConfigError(f"method.crops_for_assign={assign} must name global crops (crop_size {max(sizes)}); the "
                        f"crops' sizes are {sizes}")
    if m.temperature <= 0 or m.epsilon <= 0:
      raise ConfigError(f"method.temperature and method.epsilon must be > 0, got {m.temperature} and {m.epsilon}")
    if m.sinkhorn_iterations < 1:
      raise ConfigError(f"method.sinkhorn_iterations must be >= 1, got {m.sinkhorn_iterations}")
    if m.proj_dim <= 0 or m.proj_hidden_dim < 0 or m.num_prototypes <= 0:
      raise ConfigError(f"method.proj_dim and method.num_prototypes must be > 0 and method.proj_hidden_dim >= 0, "
                        f"got {m.proj_dim}, {m.num_prototypes} and {m.proj_hidden_dim}")
    if m.queue_length < 0 or m.queue_length % cfg.batch_size:
      # Each step replaces one global batch of it (the official code rounds it down, main_swav.py l.213).
      raise ConfigError(f"method.queue_length={m.queue_length} must be a multiple of batch_size={cfg.batch_size} "
                        f"(0: no queue), e.g. {m.queue_length - m.queue_length % cfg.batch_size}")
    if m.queue_start_epoch < 0:
      raise ConfigError(f"method.queue_start_epoch must be >= 0, got {m.queue_start_epoch}")
    columns = cfg.batch_size + m.queue_length
    # Sinkhorn equipartitions the B (+ queue) examples it sees over the K prototypes, B / K each. With
    # fewer examples than prototypes that is less than one example per prototype even once the queue is in
    # use: the case the queue exists for (section 3.1, "Working with small batches"; the official
    # batch-256 recipe has K = 3000 > B = 256 before its queue starts, and 256 + 3840 >= 3000 after).
    if m.num_prototypes > columns:
      raise ConfigError(f"method.num_prototypes={m.num_prototypes} is more than the {columns} examples Sinkhorn "
                        f"spreads over them (batch_size + queue_length): lengthen the queue or use fewer prototypes")
    # exp(score / epsilon) with cosine scores <= 1, summed over columns x K entries (losses.sinkhorn runs
    # in float32 and subtracts no maximum, as the official code).
    log_total = 1.0 / m.epsilon + math.log(columns * m.num_prototypes)
    if log_total >= _LOG_FLOAT32_MAX:
      smallest = 1.0 / (_LOG_FLOAT32_MAX - math.log(columns * m.num_prototypes))
      raise ConfigError(f"method.epsilon={m.epsilon} overflows float32 in Sinkhorn's exp(score / epsilon) at "
                        f"{columns} examples x {m.num_prototypes} prototypes; use epsilon > {smallest:.4g}")

  @classmethod
  def apply_tiny(cls, cfg):
    m = cfg.method
    m.update(proj_hidden_dim=256, proj_dim=32, num_prototypes=64)
    if m.queue_length:
      m.queue_length = 2 * cfg.batch_size

  def __init__(self, config, data=None):
    super().__init__(config, data)
    m = config.method
    self.encoder = base.build_encoder(config)
    self.projector = base.build_head(config, [m.proj_hidden_dim] if m.proj_hidden_dim else [], m.proj_dim,
                                     use_bn=True, output_bn=False, output_bias=True)
    # The official first head Linear has a bias that the BN after it cancels (zero gradient); it is left
    # out (MLPHead's default). Scores in float32 at full matmul precision: Sinkhorn exponentiates them / 0.05,
    # so a bfloat16-pass product's error of ~4e-3 would become ~8% in the codes.
    self.prototypes = nn.Dense(m.num_prototypes, use_bias=False, dtype=jnp.float32, param_dtype=jnp.float32,
                               precision=jax.lax.Precision.HIGHEST)
    self.crops_for_assign = tuple(m.crops_for_assign)

  def init(self, rng, batch):
    rng_encoder, rng_projector, rng_prototypes = jax.random.split(rng, 3)
    x = batch["views"][0]
    encoder_params, encoder_stats = base.init_network(self.encoder, rng_encoder, x)
    h = self.encoder.apply({"params": encoder_params, "batch_stats": encoder_stats}, x, train=False)
    projector_params, projector_stats = base.init_network(self.projector, rng_projector,
                                                          base.head_input(self.encoder, h))
    m = self.config.method
    prototypes = self.prototypes.init(rng_prototypes, jnp.zeros((1, m.proj_dim), jnp.float32))["params"]
    params = {"encoder": encoder_params, "projector": projector_params,
              "prototypes": _normalize_prototypes(prototypes)}
    batch_stats = {"encoder": encoder_stats, "projector": projector_stats}
    # Zeros: "not yet filled", as the official queue starts (main_swav.py l.227).
    method_state = ({"queue": jnp.zeros((len(self.crops_for_assign), m.queue_length, m.proj_dim), jnp.float32)}
                    if m.queue_length else {})
    return params, batch_stats, method_state

  def after_update(self, params, step):
    """The prototypes back on the unit sphere after each step (main_swav.py l.278-281)."""
    return dict(params, prototypes=_normalize_prototypes(params["prototypes"]))

  def queue_start_step(self) -> int:
    if self.data is None:
      raise ValueError("SwAV's queue starts at an epoch: build the method with the data's facts "
                       "(methods.get(config, DataFacts(...)))")
    return self.data.steps(self.config.method.queue_start_epoch)

  def loss(self, params, batch_stats, method_state, batch, rng, step):
    m = self.config.method
    crops = batch["views"]
    n = crops[0].shape[0]
    hs, encoder_stats = base.forward_crops(self.encoder, params["encoder"], batch_stats["encoder"], crops, rng)
    z, projector_stats = base.apply_train(self.projector, params["projector"], batch_stats["projector"],
                                          base.head_input(self.encoder, jnp.concatenate(hs, axis=0)))
    z = losses.l2_normalize(z)
    scores = self.prototypes.apply({"params": params["prototypes"]}, z)
    crop_z = [z[v * n:(v + 1) * n] for v in range(len(crops))]
    crop_scores = [scores[v * n:(v + 1) * n] for v in range(len(crops))]

    def swav(queue_scores=None):
      loss, codes = losses.swav_loss(crop_scores, queue_scores, crops_for_assign=self.crops_for_assign,
                                     temperature=m.temperature, epsilon=m.epsilon,
                                     sinkhorn_iterations=m.sinkhorn_iterations, global_sum=parallel.sum,
                                     return_codes=True, hard_codes=m.hard_codes)
      return loss, _entropy(jnp.concatenate(codes))

    metrics, per_example = {}, {}
    if m.queue_length:
      queue = method_state["queue"]
      # This device's share of the global queue (module docstring): queue_length / W rows, W = B / n.
      rows = m.queue_length * n // self.config.batch_size
      mine = jax.lax.dynamic_slice_in_dim(queue, parallel.device_index() * rows, rows, axis=1)
      # Full once its oldest slot is written (main_swav.py l.296); the same on every device.
      in_use = jnp.any(queue[:, -1] != 0)
      loss, code_entropy = jax.lax.cond(
          in_use,
          lambda: swav([self.prototypes.apply({"params": params["prototypes"]}, mine[i])
                        for i in range(len(self.crops_for_assign))]),
          swav)
      metrics["queue_in_use"] = in_use.astype(jnp.float32)
      per_example["assign_embeddings"] = jax.lax.stop_gradient(
          jnp.stack([crop_z[a] for a in self.crops_for_assign], axis=1))  # [n, len(crops_for_assign), dim]
    else:
      loss, code_entropy = swav()
    # Collapse diagnostics (log_warnings): the entropies of the codes and of the predictions, and the
    # prototypes' mean pairwise cosine.
    predictions = jax.nn.softmax(jax.lax.stop_gradient(scores).astype(jnp.float32) / m.temperature, axis=-1)
    metrics.update(code_entropy=code_entropy, prediction_entropy=_entropy(predictions),
                   prototype_cosine=_mean_pairwise_cosine(jax.lax.stop_gradient(params["prototypes"]["kernel"])))
    return loss, base.LossOutput(
        batch_stats={"encoder": encoder_stats, "projector": projector_stats}, metrics=metrics,
        representation=hs[0], embedding=crop_z[0], per_example=per_example)

  def log_warnings(self, row):
    """The uniform collapse: the loss and the predictions' entropy both near log(K). Sinkhorn's codes are
    near uniform too when the embeddings collapse to one point, or the prototypes to one direction
    (`prototype_cosine` near 1)."""
    log_k = math.log(self.config.method.num_prototypes)
    loss, entropy = float(row.get("loss", 0.0)), float(row.get("prediction_entropy", 0.0))
    if loss >= 0.95 * log_k and entropy >= 0.95 * log_k:
      return [f"SwAV loss {loss:.4f} and prediction entropy {entropy:.4f} sit near log(num_prototypes) = "
              f"{log_k:.4f}: every crop predicts (nearly) uniform assignments, a collapse (code entropy "
              f"{float(row.get('code_entropy', 0.0)):.4f}, prototype cosine "
              f"{float(row.get('prototype_cosine', 0.0)):.4f}). Check the learning rate, the prototypes' "
              "freeze and the queue start"]
    return []

  def update_state(self, method_state, params, state_stats, per_example, step):
    if not self.config.method.queue_length:
      return method_state
    queue = method_state["queue"]
    new = jnp.swapaxes(per_example["assign_embeddings"], 0, 1)  # [len(crops_for_assign), B, dim], batch order
    pushed = jnp.concatenate([new, queue[:, :queue.shape[1] - new.shape[1]]], axis=1)  # newest first
    return {"queue": jnp.where(step >= self.queue_start_step(), pushed, queue)}


def _entropy(probs):
  """Mean entropy (nats) of the rows of [n, K] probabilities."""
  return -jnp.mean(jnp.sum(probs * jnp.log(jnp.maximum(probs, 1e-30)), axis=-1))


def _mean_pairwise_cosine(kernel):
  """Mean cosine between distinct columns of a [dim, K] kernel of unit columns (1: all one direction)."""
  k = kernel.shape[1]
  total = jnp.sum(jnp.square(jnp.sum(kernel, axis=1)))  # sum over all pairs (i, j) of <c_i, c_j>
  return (total - jnp.sum(jnp.square(kernel))) / (k * (k - 1))


def _normalize_prototypes(prototypes):
  """Each prototype (a column of the [dim, K] kernel) scaled to unit L2 norm."""
  return {"kernel": losses.l2_normalize(prototypes["kernel"], axis=0)}
