"""Pure loss functions. Each takes per-device arrays and, where a loss needs the global batch, the gathered
arrays as arguments, so the same function runs on one device (gathered == local) and under shard_map.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

# A large negative instead of -inf keeps softmax gradients finite (SimCLR's code uses 1e9 as well).
_MASKED = 1e9


def l2_normalize(x: jax.Array, axis: int = -1, eps: float = 1e-12) -> jax.Array:
  return x / jnp.sqrt(jnp.maximum(jnp.sum(x * x, axis=axis, keepdims=True), eps * eps))


def nt_xent(z1, z2, z1_all, z2_all, offset, temperature):
  """SimCLR's normalized temperature-scaled cross-entropy (Chen et al. 2020, eq. 1).

  For each of the 2N views in the global batch, the positive is the other view of the same image and the
  2N-2 other views are negatives:
      l(i, j) = -log exp(s_ij / t) / sum_{k != i} exp(s_ik / t),   s = cosine similarity.

  Args:
    z1, z2: [n, d] this device's projections of views 1 and 2 (need not be normalized).
    z1_all, z2_all: [N, d] the same for the whole global batch (all_gather of z1, z2; keep the gradient).
    offset: index of this device's first example in the global batch.
    temperature: t > 0.
  Returns:
    The scalar loss over this device's anchors, as the official code reports it: the mean over anchors of
    view 1 plus the mean over anchors of view 2, i.e. 2x the paper's average over 2N anchors. The
    factor matters for LARS, whose weight decay is added to the gradient before the trust ratio.
  """
  z1, z2, z1_all, z2_all = map(l2_normalize, (z1, z2, z1_all, z2_all))
  n, num_all = z1.shape[0], z1_all.shape[0]
  positives = offset + jnp.arange(n)
  self_mask = jax.nn.one_hot(positives, num_all) * _MASKED

  def direction(a, b_all, a_all):
    # Row i: similarities of anchor a_i to the other view of every image ([n, N]) then to the same view
    # of every image ([n, N]) with itself masked out.
    logits = jnp.concatenate([a @ b_all.T / temperature, a @ a_all.T / temperature - self_mask], axis=1)
    log_probs = jax.nn.log_softmax(logits, axis=-1)
    return -jnp.mean(jnp.take_along_axis(log_probs, positives[:, None], axis=1))

  return direction(z1, z2_all, z1_all) + direction(z2, z1_all, z2_all)


def byol_regression(prediction, target):
  """BYOL's normalized mean squared error (Grill et al. 2020, eq. 2), per example:
      ||p/|p| - z/|z| ||^2 = 2 - 2 cos(p, z).
  prediction, target: [n, d]; target is treated as constant. Returns [n].
  """
  p = l2_normalize(prediction)
  z = jax.lax.stop_gradient(l2_normalize(target))
  return jnp.sum((p - z) ** 2, axis=-1)


def byol_loss(p1, p2, z1_target, z2_target):
  """Symmetrized BYOL loss (eq. 2 and the text below it): the prediction of view 1 regresses the target
  projection of view 2 and vice versa. Mean over examples of the sum of the two terms, as in the BYOL
  code. Inputs [n, d]; returns a scalar."""
  return jnp.mean(byol_regression(p1, z2_target) + byol_regression(p2, z1_target))


def info_nce_queue(q, k, queue, temperature):
  """MoCo's InfoNCE (He et al. 2020, eq. 1) with a queue of negatives.

      L_q = -log exp(q.k+ / t) / (exp(q.k+ / t) + sum_{k- in queue} exp(q.k- / t))

  Args:
    q: [n, d] queries (gradient flows); k: [n, d] positive keys (constant); queue: [K, d] negative keys
      (constant, already L2-normalized). q and k are normalized here.
  Returns: mean over the n queries.
  """
  q = l2_normalize(q)
  k = jax.lax.stop_gradient(l2_normalize(k))
  queue = jax.lax.stop_gradient(queue)
  positive = jnp.sum(q * k, axis=-1, keepdims=True)
  logits = jnp.concatenate([positive, q @ queue.T], axis=1) / temperature
  return -jnp.mean(jax.nn.log_softmax(logits, axis=-1)[:, 0])


def softmax_cross_entropy(logits, labels):
  """Mean cross-entropy of integer labels; logits [n, c] float32, labels [n] int."""
  log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  return -jnp.mean(jnp.take_along_axis(log_probs, labels[:, None].astype(jnp.int32), axis=1))
