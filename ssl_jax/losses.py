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


def soft_cross_entropy(logits, targets):
  """Mean cross-entropy against soft targets [n, c] (label smoothing, mixup, cutmix; timm's
  SoftTargetCrossEntropy): mean_i sum_c -t_ic log softmax(logits_i)_c."""
  log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  return -jnp.mean(jnp.sum(targets * log_probs, axis=-1))


def _local_sum(x):
  """The cross-device sum on a single device: the identity. Losses that need global sums take a
  `global_sum` argument defaulting to this; under shard_map the caller passes `parallel.sum`."""
  return x


def simsiam_loss(p1, p2, z1, z2):
  """SimSiam's symmetrized negative cosine (Chen & He 2021, eq. 1-2 and Algorithm 1):
      L = D(p1, sg(z2)) / 2 + D(p2, sg(z1)) / 2,   D(p, z) = -cos(p, z),
  each D averaged over examples (official main_simsiam.py l.191, l.295; the encoder returns z.detach(),
  simsiam/builder.py l.61).

  Args:
    p1, p2: [n, d] predictor outputs of views 1 and 2 (gradient flows).
    z1, z2: [n, d] projector outputs of views 1 and 2 (treated as constant here).
  Returns: the scalar loss over this device's examples, in [-1, 1]; the trainer's mean over devices makes
  it the global mean, so no collective is needed.
  """
  def negative_cosine(p, z):
    return -jnp.mean(jnp.sum(l2_normalize(p) * jax.lax.stop_gradient(l2_normalize(z)), axis=-1))

  return 0.5 * negative_cosine(p1, z2) + 0.5 * negative_cosine(p2, z1)


def barlow_twins_loss(z1, z2, lambd=0.0051, global_sum=_local_sum, eps=1e-5):
  """Barlow Twins' redundancy-reduction loss (Zbontar et al. 2021, eq. 1-2) on the global batch:

      bn(z) = (z - mean) / sqrt(var + eps)        mean, biased var over the N examples of the global batch
      c_ij  = sum_b bn(z1)_bi bn(z2)_bj / N       cross-correlation, [d, d]
      L     = sum_i (1 - c_ii)^2 + lambd * sum_{i != j} c_ij^2

  The official code (facebookresearch/barlowtwins main.py l.205, 212-220) normalizes with
  `BatchNorm1d(affine=False)` converted to SyncBatchNorm (l.89): global training statistics, biased
  variance, BatchNorm1d's default eps 1e-5; it divides each GPU's partial product by the global batch
  size and all-reduces c. Here every global quantity is `global_sum` of per-device partial sums (the
  batch count, the per-dimension sums for the mean and the squared deviations, and bn(z1).T @ bn(z2)), so
  under shard_map with `global_sum=parallel.sum` each device returns exactly the single-device loss of
  the global batch, and the trainer's mean over devices leaves it unchanged. Communication is one psum of
  the [d, d] matrix, as in the official code, plus four of [d] vectors for the statistics.

  Gradient scale (RECIPES.md section 7, barlowtwins#8): torch.distributed.all_reduce is invisible to
  autograd, so each GPU backpropagates only its own partial c through dL/dc (SyncBatchNorm's backward is
  exact), and DDP then averages over the G GPUs: the official parameter gradient is the true gradient of
  this loss divided by G. psum is differentiable in JAX, so the gradient of this function is the true
  gradient. To reproduce the official effective gradient at G GPUs, multiply the loss by 1 / G (G = 16
  for the published ImageNet run: "approximately 7 days on 16 v100 GPUs", README l.60). The factor is
  not a no-op under the official LARS: it changes the balance of gradient and weight decay inside the
  trust ratio, and the 1-D parameters (biases, BN), excluded from adaptation, see it in full.

  Args:
    z1, z2: [n, d] this device's projector outputs of views 1 and 2 (any float dtype; computed in f32).
    lambd: weight of the off-diagonal (redundancy) term; 0.0051 is the official default (main.py l.39).
    global_sum: sums a pytree over all devices; the identity (default) on one device, `parallel.sum`
      under shard_map.
    eps: the batch norm's epsilon.
  Returns: the scalar loss of the global batch (identical on every device).
  """
  z1, z2 = z1.astype(jnp.float32), z2.astype(jnp.float32)
  num_global = global_sum(jnp.asarray(z1.shape[0], jnp.float32))

  def standardize(z):
    mean = global_sum(jnp.sum(z, axis=0)) / num_global
    centred = z - mean
    # Two passes (mean, then squared deviations) rather than E[z^2] - mean^2, which cancels badly in f32.
    var = global_sum(jnp.sum(centred * centred, axis=0)) / num_global
    return centred * jax.lax.rsqrt(var + eps)

  c = global_sum(standardize(z1).T @ standardize(z2)) / num_global
  diagonal = jnp.diagonal(c)
  # Masking, not sum(c^2) - sum(diag^2): the diagonal is ~1 per dimension at convergence and would swamp the
  # small off-diagonal total in f32.
  off_diagonal = jnp.where(jnp.eye(c.shape[0], dtype=bool), 0.0, c)
  return jnp.sum((1.0 - diagonal) ** 2) + lambd * jnp.sum(off_diagonal ** 2)


def vicreg_loss(x, y, x_all, y_all, sim_coeff=25.0, std_coeff=25.0, cov_coeff=1.0):
  """VICReg (Bardes et al. 2022, eq. 1-6), as the official code computes it (facebookresearch/vicreg
  main_vicreg.py l.194-220):

      invariance  s = mean_{b,k} (x_bk - y_bk)^2                         on this device's batch (F.mse_loss)
      variance    v = mean_k relu(1 - sqrt(Var_b[x_all]_k + 1e-4)) / 2 + (same for y_all) / 2
      covariance  C(x) = (x_all - mean)^T (x_all - mean) / (N - 1),
                  c = sum_{i != j} C(x)_ij^2 / d + sum_{i != j} C(y)_ij^2 / d
      L = sim_coeff * s + std_coeff * v + cov_coeff * c          (25 / 25 / 1, main_vicreg.py l.58-63)

  Var is the unbiased variance (torch's x.var(dim=0)) and N the global batch, both over the gathered
  arrays. The official FullGatherLayer (l.307-323) gathers with gradient; passing `parallel.all_gather`
  outputs does the same here. Each device returns its local invariance plus the global variance and
  covariance terms; the trainer's mean over devices turns the first into the global MSE (equal local
  batches) and leaves the others, and the gradient through the gathered copies is then the true gradient,
  as with DDP's average of the official per-rank gradients.

  Args:
    x, y: [n, d] this device's expander outputs of views 1 and 2.
    x_all, y_all: [N, d] the same for the global batch (all_gather of x, y; keep the gradient). On one
      device pass x, y again.
    sim_coeff, std_coeff, cov_coeff: the weights of the three terms.
  Returns: (loss, {"invariance": s, "variance": v, "covariance": c}), the terms unweighted.
  """
  x, y = x.astype(jnp.float32), y.astype(jnp.float32)
  invariance = jnp.mean((x - y) ** 2)
  num_global, dim = x_all.shape

  def variance_and_covariance(z):
    z = z.astype(jnp.float32)
    z = z - jnp.mean(z, axis=0)
    std = jnp.sqrt(jnp.sum(z * z, axis=0) / (num_global - 1) + 1e-4)
    cov = z.T @ z / (num_global - 1)
    off_diagonal = jnp.where(jnp.eye(dim, dtype=bool), 0.0, cov)
    return jnp.mean(jax.nn.relu(1.0 - std)) / 2, jnp.sum(off_diagonal ** 2) / dim

  var_x, cov_x = variance_and_covariance(x_all)
  var_y, cov_y = variance_and_covariance(y_all)
  variance, covariance = var_x + var_y, cov_x + cov_y
  loss = sim_coeff * invariance + std_coeff * variance + cov_coeff * covariance
  return loss, {"invariance": invariance, "variance": variance, "covariance": covariance}


def sinkhorn(scores, epsilon=0.05, iterations=3, global_sum=_local_sum):
  """SwAV's codes: Sinkhorn-Knopp equipartition over the global batch (Caron et al. 2020, section 3.1,
  eq. 3 and the Q* below it), as the official distributed_sinkhorn (facebookresearch/swav main_swav.py
  l.353-376). In the paper's K x B layout:

      Q = exp(scores / epsilon)^T;  Q /= sum(Q)                               (sum over all devices)
      repeat `iterations` times:
        Q /= row sums of Q, summed over all devices;  Q /= K                (each prototype gets 1/K)
        Q /= column sums of Q (each example's own);   Q /= B                (each example gets 1/B)
      codes = B * Q^T                                                         (each example's row sums to 1)

  with K prototypes and B the number of columns over all devices (the global batch, plus any queue rows
  the caller prepended). This function keeps the [n, K] layout, so the paper's row sums are sums over
  axis 0 (global) and its column sums over axis 1 (local).

  No max is subtracted before exp, as in the official code: the caller passes cosine scores in [-1, 1], so
  exp(1 / epsilon) = e^20 at epsilon 0.05 and the global total stay far inside float32 (whose exp
  overflows past e^88, i.e. epsilon < 0.0114). The whole computation runs in float32 whatever the input
  dtype (RECIPES.md section 6): float16's exp overflows past e^11, and bfloat16's 8-bit mantissa is too
  coarse for the repeated normalizations.

  Args:
    scores: [n, K] this device's scores (dot products of L2-normalized embeddings and prototypes).
    epsilon: entropy regularization (0.05, main_swav.py l.61); iterations: 3 (l.63).
    global_sum: the identity on one device, `parallel.sum` under shard_map.
  Returns: [n, K] float32 codes for this device's rows, each row summing to 1; no gradient.
  """
  q = jnp.exp(jax.lax.stop_gradient(scores).astype(jnp.float32) / epsilon)
  num_prototypes = q.shape[1]
  num_columns = global_sum(jnp.asarray(q.shape[0], jnp.float32))
  q = q / global_sum(jnp.sum(q))
  for _ in range(iterations):
    q = q / global_sum(jnp.sum(q, axis=0, keepdims=True)) / num_prototypes
    q = q / jnp.sum(q, axis=1, keepdims=True) / num_columns
  return q * num_columns


def swav_loss(crop_scores, queue_scores=None, crops_for_assign=(0, 1), temperature=0.1, epsilon=0.05,
              sinkhorn_iterations=3, global_sum=_local_sum, return_codes=False, hard_codes=False):
  """SwAV's swapped prediction over multi-crop views (Caron et al. 2020, eq. 1-2), averaged as the
  official code (facebookresearch/swav main_swav.py l.289-315):

      for each assignment crop a (crops 0 and 1, the two global crops, by default):
        q_a = sinkhorn([queue_a; scores_a])[rows of this batch]                       (no gradient)
        l_a = 1 / (V - 1) * sum_{v != a} mean_b [ -sum_k q_a[b, k] log softmax(scores_v[b] / t)_k ]
      L = mean_a l_a

  with V crops and t = 0.1 (l.59). `scores_v` keep their gradient, which reaches the embeddings and the
  prototypes through the caller's dot products.

  Queue (l.294-307): the official code prepends the scores of this rank's queue of past embeddings
  (re-scored against the current prototypes) to the assignment crop's scores before Sinkhorn, so they
  count in the equipartition and in B, and keeps only the batch's rows afterwards. It does so only once
  the queue is full; that decision, and filling the queue, belong to the caller.

  Args:
    crop_scores: sequence of V arrays [n, K], one per crop, global crops first: the dot products of this
      device's L2-normalized embeddings with the L2-normalized prototypes.
    queue_scores: None, or a sequence aligned with `crops_for_assign` of [m, K] arrays: this device's
      queue embeddings for that assignment crop times the current prototypes.
    crops_for_assign: indices into crop_scores of the crops whose codes are predicted.
    temperature, epsilon, sinkhorn_iterations: SwAV's fixed values by default.
    global_sum: the identity on one device, `parallel.sum` under shard_map (Sinkhorn's global sums only;
      the loss itself is the mean over this device's examples, made global by the trainer's mean).
    return_codes: also return Sinkhorn's codes (before any rounding), one [n, K] array per assignment crop,
      for diagnostics.
    hard_codes: each example's code rounded to the one-hot of its largest entry, discrete codes (the
      paper's method uses the continuous ones, section 3.1) and one of the workarounds in the official
      README's "Common Issues" for a loss stuck at log(K), a collapse at the start.
  Returns: the scalar loss over this device's examples (and the codes with return_codes).
  """
  num_crops = len(crop_scores)
  n = crop_scores[0].shape[0]
  log_probs = [jax.nn.log_softmax(s.astype(jnp.float32) / temperature, axis=-1) for s in crop_scores]
  loss, all_codes = 0.0, []
  for i, a in enumerate(crops_for_assign):
    scores = crop_scores[a]
    if queue_scores is not None:
      scores = jnp.concatenate([queue_scores[i].astype(scores.dtype), scores])
    codes = sinkhorn(scores, epsilon, sinkhorn_iterations, global_sum)[-n:]
    all_codes.append(codes)
    if hard_codes:
      codes = jax.nn.one_hot(jnp.argmax(codes, axis=-1), codes.shape[-1], dtype=codes.dtype)
    cross_entropies = [-jnp.mean(jnp.sum(codes * log_probs[v], axis=-1)) for v in range(num_crops) if v != a]
    loss = loss + sum(cross_entropies) / (num_crops - 1)
  loss = loss / len(crops_for_assign)
  return (loss, all_codes) if return_codes else loss


def moco_v3_contrastive(q, k_all, offset, temperature):
  """MoCo v3's contrastive term for this device's queries (Chen, Xie & He 2021; official moco-v3
  moco/builder.py l.63-73, `ctr_loss` and the labels in `forward`, commit c349e6e, RECIPES.md section 4):

      logits = normalize(q) . normalize(k_all)^T / T                         [n, N]
      L      = 2T * mean_i [ -log softmax(logits_i)[offset + i] ]

  Query i's positive is the key of the same image, at global index offset + i of the gathered keys
  (labels = arange(n) + n * rank in the official code); the other N - 1 keys of the global batch are its
  negatives. No queue.

  The factor 2T is the official code's (`criterion(logits, labels) * (2 * self.T)`) and is kept: it
  multiplies the gradient by 2T (0.4 at the ViT recipe's T = 0.2, 2 at the ResNet recipe's T = 1.0), which
  under SGD is a change of the effective learning rate and under LARS a change of the balance between the
  gradient and the weight decay inside the trust ratio, so the published learning rates assume it.

  Args:
    q: [n, d] this device's queries (predictor outputs; gradient flows).
    k_all: [N, d] the momentum encoder's keys of the other view, gathered from every device in device order
      (`parallel.all_gather`; on one device the local keys). Keys get no gradient in MoCo v3 (computed
      under no_grad and gathered by a non-differentiable all_gather); this function stops their gradient
      itself, so none flows back through the gather whatever the caller does.
    offset: global index of this device's first example (device index * n; 0 on one device).
    temperature: T > 0.
  Returns: the scalar loss over this device's n queries; the trainer's mean over devices (equal n) is the
  loss of the global batch.
  """
  q = l2_normalize(q.astype(jnp.float32))
  k_all = jax.lax.stop_gradient(l2_normalize(k_all.astype(jnp.float32)))
  logits = q @ k_all.T / temperature
  labels = offset + jnp.arange(q.shape[0])
  log_probs = jax.nn.log_softmax(logits, axis=-1)
  return -jnp.mean(jnp.take_along_axis(log_probs, labels[:, None], axis=1)) * (2 * temperature)


def moco_v3_loss(q1, q2, k1_all, k2_all, offset, temperature):
  """MoCo v3's symmetrized loss (moco/builder.py l.96, `ctr_loss(q1, k2) + ctr_loss(q2, k1)`): each view's
  queries retrieve the other view's keys.

  Args:
    q1, q2: [n, d] this device's queries of views 1 and 2 (base encoder + predictor).
    k1_all, k2_all: [N, d] the momentum encoder's keys of views 1 and 2, gathered over devices (constant).
    offset, temperature: as in `moco_v3_contrastive`.
  Returns: the scalar sum of the two terms, each the 2T-scaled mean over this device's queries.
  """
  return (moco_v3_contrastive(q1, k2_all, offset, temperature)
          + moco_v3_contrastive(q2, k1_all, offset, temperature))


def dino_teacher_temperature(epoch, warmup_temp, final_temp, warmup_epochs):
  """DINO's teacher temperature schedule (official main_dino.py DINOLoss.__init__, l.363-416 at 7c446df):
      concatenate(linspace(warmup_temp, final_temp, warmup_epochs), [final_temp] * (epochs - warmup_epochs))

  indexed by the integer epoch: it changes once per epoch, not per iteration (RECIPES.md section 8). numpy's
  linspace includes both ends, so for epoch < warmup_epochs

      tau(epoch) = warmup_temp + (final_temp - warmup_temp) * epoch / (warmup_epochs - 1)

  (warmup_epochs == 1: warmup_temp at epoch 0), and final_temp from epoch warmup_epochs on (at once with
  warmup_epochs == 0, the code's default). The released ViT-S/16 runs use 0.04 -> 0.07 over 30 epochs.

  Args:
    epoch: integer epoch (may be traced).
    warmup_temp, final_temp: the temperatures at epoch 0 and from the end of the warmup on.
    warmup_epochs: number of warmup epochs (>= 0).
  Returns: a float32 scalar.
  """
  epoch = jnp.asarray(epoch, jnp.float32)
  warmup_epochs = jnp.asarray(warmup_epochs, jnp.float32)
  fraction = epoch / jnp.maximum(warmup_epochs - 1.0, 1.0)
  warming = warmup_temp + (final_temp - warmup_temp) * fraction
  return jnp.where(epoch < warmup_epochs, warming, jnp.asarray(final_temp, jnp.float32))


def _dino_distributions(student_logits, teacher_logits, center, student_temperature, teacher_temperature):
  """Student log-probabilities per crop, and the centred, sharpened teacher's probabilities and
  log-probabilities per global crop (no gradient), all float32."""
  student_log_probs = [jax.nn.log_softmax(s.astype(jnp.float32) / student_temperature, axis=-1)
                       for s in student_logits]
  center = jax.lax.stop_gradient(jnp.asarray(center, jnp.float32))
  teacher_log_probs = [
      jax.lax.stop_gradient(
          jax.nn.log_softmax((t.astype(jnp.float32) - center) / teacher_temperature, axis=-1))
      for t in teacher_logits]
  return student_log_probs, [jnp.exp(lp) for lp in teacher_log_probs], teacher_log_probs


def _dino_pairs(num_teacher, num_student):
  """(teacher crop, student crop) pairs of the loss: every student crop except the teacher's own view
  (the teacher's global crops are the first student crops)."""
  return [(iq, v) for iq in range(num_teacher) for v in range(num_student) if v != iq]


def dino_loss(student_logits, teacher_logits, center, student_temperature, teacher_temperature):
  """DINO's self-distillation loss (Caron et al. 2021, eq. 1-2 and Algorithm 1; official main_dino.py
  DINOLoss.forward, l.363-416 at 7c446df):

      P_t(x_iq) = softmax((g_t(x_iq) - c) / tau_t)             teacher, global crops only, no gradient
      log P_s(x_v) = log_softmax(g_s(x_v) / tau_s)              student, every crop
      L = 1 / |pairs| * sum_{(iq, v), v != iq} mean_b [ -sum_k P_t(x_iq)_bk log P_s(x_v)_bk ]

  with |pairs| = n_teacher * n_student - n_teacher when the teacher's crops are the first student crops
  (2 * (2 + 10) - 2 = 22 for the released ViT-S/16 with 10 local crops). tau_s = 0.1; tau_t comes from
  `dino_teacher_temperature`; c is the running center, updated after the loss by `dino_center_update`.

  Args:
    student_logits: sequence of [n, K] arrays, one per crop, the 2 global crops first, then the local ones
      (the student head's outputs; gradient flows).
    teacher_logits: sequence of [n, K] arrays, the teacher head's raw outputs on the global crops, in the
      same order as the first student crops (treated as constant).
    center: [1, K] or [K] (constant).
    student_temperature, teacher_temperature: tau_s, tau_t (scalars, may be traced).
  Returns: the scalar loss over this device's n examples; the trainer's mean over devices (equal n) is the
  loss of the global batch, so no collective is needed here.
  """
  student_log_probs, teacher_probs, _ = _dino_distributions(
      student_logits, teacher_logits, center, student_temperature, teacher_temperature)
  pairs = _dino_pairs(len(teacher_probs), len(student_log_probs))
  total = sum(-jnp.mean(jnp.sum(teacher_probs[iq] * student_log_probs[v], axis=-1)) for iq, v in pairs)
  return total / len(pairs)


def dino_center_update(center, teacher_logits_batch_sum, global_count, momentum):
  """DINO's center EMA (main_dino.py DINOLoss.update_center, l.406-416 at 7c446df), applied after the loss:

      batch_center = sum over every teacher row of every device of g_t(x)  /  global_count
      center      <- momentum * center + (1 - momentum) * batch_center          (momentum 0.9)

  The official code sums the raw teacher outputs over its rows (both global crops), all-reduces the sum and
  divides by len(teacher_output) * world_size, i.e. the global number of teacher rows,
  n_global * n_teacher_crops. This function takes those two global quantities as inputs so it stays pure
  and runs unchanged on one device or under shard_map: the caller computes, from this device's teacher
  logits `ts` (a list of [n, K]),

      teacher_logits_batch_sum = global_sum(sum(jnp.sum(t, axis=0) for t in ts))      [K]
      global_count            = global_sum(n * len(ts))

  with `parallel.sum` as global_sum under shard_map (the identity on one device), so every device gets the
  same new center. The center is state: checkpoint it with the model (it is a registered buffer, l.263).

  Args:
    center: [1, K] or [K] current center.
    teacher_logits_batch_sum: [K] (or [1, K]) global sum of the raw teacher logits.
    global_count: global number of summed rows.
    momentum: the EMA momentum (0.9 in the official code).
  Returns: the new center, float32, with the broadcast shape of center and the sum; no gradient.
  """
  batch_center = jnp.asarray(teacher_logits_batch_sum, jnp.float32) / global_count
  new_center = jnp.asarray(center, jnp.float32) * momentum + batch_center * (1 - momentum)
  return jax.lax.stop_gradient(new_center)


def dino_diagnostics(student_logits, teacher_logits, center, student_temperature, teacher_temperature,
                     global_sum=_local_sum):
  """Collapse monitors for DINO (asked for in facebookresearch/dino#246 and #43; RECIPES.md section 8).

  With H the entropy, the loss of each pair splits as cross-entropy = H(P_t) + KL(P_t || P_s) (the
  decomposition of the paper's collapse study, Caron et al. 2021, section 5.3 "Avoiding collapse", Fig. 7),
  and since every teacher crop appears in the same number of pairs (n_student - 1),

      dino_loss = teacher_entropy + kl_teacher_student        (exactly)

  Centering pushes the teacher towards uniform, sharpening towards one-hot. A collapse shows as
  kl_teacher_student -> 0 (the student just copies a constant teacher) together with either
  teacher_entropy -> 0 (one prototype wins for every image: sharpening dominates) or teacher_entropy ->
  log K (uniform teacher: centering dominates; the loss then sits at log K, 11.09 for K = 65536, the
  constant loss reported in those issues). teacher_batch_entropy separates the one-prototype
  case from healthy sharp teachers: it is the entropy of the teacher's mean distribution over the batch,
  low when every image maps to the same prototype, and near log K when sharp assignments are spread out.

  Args: as `dino_loss`, plus
    global_sum: for teacher_batch_entropy's mean distribution only: the identity (default, this device's
      batch) or `parallel.sum` under shard_map (the global batch; one psum of [K] and a scalar).
  Returns: {"teacher_entropy": mean over teacher rows of H(P_t) (this device),
            "teacher_batch_entropy": H(mean over rows of P_t),
            "kl_teacher_student": mean over the loss's pairs of mean_b KL(P_t || P_s) (this device)},
    float32 scalars without gradient; the first and third average over devices like the loss.
  """
  student_log_probs, teacher_probs, teacher_log_probs = _dino_distributions(
      jax.tree.map(jax.lax.stop_gradient, list(student_logits)), teacher_logits, center,
      student_temperature, teacher_temperature)
  # Entropies and KL from log_softmax, never log(p): exact where a probability underflows to 0.
  row_entropies = [-jnp.sum(p * lp, axis=-1) for p, lp in zip(teacher_probs, teacher_log_probs)]
  teacher_entropy = jnp.mean(jnp.stack([jnp.mean(h) for h in row_entropies]))
  pairs = _dino_pairs(len(teacher_probs), len(student_log_probs))
  kl = sum(jnp.mean(jnp.sum(teacher_probs[iq] * (teacher_log_probs[iq] - student_log_probs[v]), axis=-1))
           for iq, v in pairs) / len(pairs)
  num_rows = global_sum(jnp.asarray(sum(p.shape[0] for p in teacher_probs), jnp.float32))
  mean_teacher = global_sum(sum(jnp.sum(p, axis=0) for p in teacher_probs)) / num_rows
  batch_entropy = -jnp.sum(mean_teacher * jnp.log(jnp.maximum(mean_teacher, 1e-30)))
  return {"teacher_entropy": teacher_entropy, "teacher_batch_entropy": batch_entropy,
          "kl_teacher_student": kl}


def patchify(images, patch_size: int):
  """[n, h, w, c] -> [n, (h/p) * (w/p), p * p * c]: patches in row-major grid order, each flattened as
  (row within the patch, column, channel), MAE's order (models_mae.py l.95-106: einsum nchpwq->nhwpqc)."""
  n, h, w, c = images.shape
  p = patch_size
  x = images.reshape(n, h // p, p, w // p, p, c)
  return x.transpose(0, 1, 3, 2, 4, 5).reshape(n, (h // p) * (w // p), p * p * c)


def unpatchify(patches, patch_size: int, grid_hw):
  """The inverse of patchify: [n, gh * gw, p * p * c] -> [n, gh * p, gw * p, c] (models_mae.py l.108-120)."""
  n, _, d = patches.shape
  p = patch_size
  gh, gw = grid_hw
  c = d // (p * p)
  x = patches.reshape(n, gh, gw, p, p, c)
  return x.transpose(0, 1, 3, 2, 4, 5).reshape(n, gh * p, gw * p, c)


def random_masking(noise, mask_ratio: float):
  """MAE's per-example random masking (models_mae.py l.123-148) from noise [n, L] (uniform per patch):
  the int(L * (1 - mask_ratio)) lowest-noise patches are kept. Returns (ids_keep [n, k] in the order of
  increasing noise, mask [n, L] float32 with 1 on the masked patches in grid order, ids_restore [n, L]: the
  position of grid patch j in (kept patches, then masked ones))."""
  num_keep = int(noise.shape[1] * (1 - mask_ratio))
  ids_shuffle = jnp.argsort(noise, axis=1)
  ids_restore = jnp.argsort(ids_shuffle, axis=1)
  mask = (ids_restore >= num_keep).astype(jnp.float32)
  return ids_shuffle[:, :num_keep], mask, ids_restore


def mae_loss(pred, target, mask, norm_pix: bool = True, eps: float = 1e-6):
  """MAE's reconstruction loss (models_mae.py l.198-214): the mean squared error per patch, averaged over
  the masked patches only. pred, target: [n, L, p * p * c] (target = patchify(images)); mask: [n, L], 1 on
  masked patches. norm_pix: each target patch normalized by its own mean and UNBIASED variance
  (torch's default var, N - 1), eps 1e-6 inside the square root.

  Every image masks the same number of patches, so the mean of per-device values is the global mean."""
  if norm_pix:
    mean = jnp.mean(target, axis=-1, keepdims=True)
    var = jnp.var(target, axis=-1, keepdims=True, ddof=1)
    target = (target - mean) / jnp.sqrt(var + eps)
  per_patch = jnp.mean(jnp.square(pred - target), axis=-1)
  return jnp.sum(per_patch * mask) / jnp.sum(mask)



def instdisc_nce_scores(f, weights, temperature, z):
  """InstDisc's non-parametric NCE scores (Wu et al. 2018, eq. 2-3; lemniscate NCEAverage.py l.7-34):
  P(i | f) = exp(v_i . f / T) / Z for the memory rows v_i sampled for each example.

  Args:
    f: [n, d] L2-normalized features (gradient flows).
    weights: [n, K + 1, d] memory-bank rows, the positive (the example's own row) in slot 0 (constant).
    temperature: T.
    z: the normalizing constant Z (a scalar, constant: estimated once, on the first step).
  Returns: [n, K + 1] scores exp(v . f / T) / Z.
  """
  logits = jnp.einsum("nkd,nd->nk", jax.lax.stop_gradient(weights), f) / temperature
  return jnp.exp(logits) / jax.lax.stop_gradient(z)


def instdisc_nce_loss(scores, num_data: int, eps: float = 1e-7):
  """NCE of the positive against K noise samples drawn uniformly, P_n = 1 / num_data (lemniscate
  NCECriterion.py l.12-36; Wu et al. 2018 eq. 4-5):
      h(s) = s / (s + K P_n)
      L = -[ log h(s_0) + sum_{k=1..K} log(1 - h(s_k)) ]
  with eps added to the denominators as the official code does (s + K P_n + eps). scores: [n, K + 1]
  (instdisc_nce_scores), the positive in column 0. Returns the mean over the n examples."""
  k = scores.shape[1] - 1
  noise = k / num_data
  positive = jnp.log(scores[:, 0] / (scores[:, 0] + noise + eps))
  negatives = jnp.sum(jnp.log(noise / (scores[:, 1:] + noise + eps)), axis=1)
  return -jnp.mean(positive + negatives)


def instdisc_softmax_loss(f, bank, labels, temperature):
  """InstDisc's full non-parametric softmax (nce_k = 0; lemniscate LinearAverage.py with cross-entropy,
  main.py l.151-153): cross-entropy of logits f . bank^T / T against each example's own index.
  f: [n, d] normalized features (gradient flows); bank: [N, d] (constant); labels: [n] dataset indices."""
  logits = f @ jax.lax.stop_gradient(bank).T / temperature
  return softmax_cross_entropy(logits, labels)


def memory_bank_update(rows, f, momentum):
  """The rows written back (lemniscate NCEAverage.py l.62-68): normalize(m v + (1 - m) f), no gradient."""
  return l2_normalize(momentum * rows + (1.0 - momentum) * jax.lax.stop_gradient(f))


def cpc_infonce(preds, targets_all, offset: int, first_example, grid: int):
  """CPC's InfoNCE for one prediction offset (Henaff et al. 2020, appendix A.2), with accuracy.

  preds [n, grid - offset, grid, t]: the predictions of this device's n images made from context rows
  0 .. grid - offset - 1 for the patch `offset` rows below; targets_all [N grid^2, t]: every patch's target
  of the global batch (image-major, then row, then column). The positive of prediction (b, r, c) is
  target (first_example + b, r + offset, c); every other patch of every image is a negative. Returns (mean
  cross-entropy over the n (grid - offset) grid predictions, fraction whose highest logit is the positive)."""
  n, rows, cols, t = preds.shape
  logits = preds.reshape(-1, t) @ targets_all.T
  image = first_example + jnp.arange(n)[:, None, None]
  row = jnp.arange(rows)[None, :, None] + offset
  col = jnp.arange(cols)[None, None, :]
  labels = (image * grid * grid + row * grid + col).reshape(-1)
  accuracy = jnp.mean(jnp.argmax(logits, axis=-1) == labels)
  return softmax_cross_entropy(logits, labels), accuracy
