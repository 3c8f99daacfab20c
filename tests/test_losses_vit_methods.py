"""MoCo v3 and DINO losses against independent float64 numpy computations written loop by loop (values;
gradients by central finite differences of those numpy functions or by a jnp reference written here), and
8 simulated devices under shard_map against one device on the same global batch."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from ssl_jax import losses, parallel
from test_losses_joint import numeric_grad

D = parallel.DATA


# ---------------------------------------------------------------------------------------------------------
# Independent references: float64 numpy, one row / pair at a time.

def assert_grad_close(got, want, rtol=2e-4):
  np.testing.assert_allclose(got, want, rtol=rtol, atol=rtol * np.abs(want).max())


def unit(v):
  return v / np.sqrt(sum(x * x for x in v))


def log_softmax_row(row):
  m = max(row)
  log_norm = m + np.log(sum(np.exp(x - m) for x in row))
  return [x - log_norm for x in row]


def moco_ce_numpy(q, k_all, offset, t):
  """Plain cross-entropy (no 2T), query by query: positive of query i is key offset + i."""
  q = np.asarray(q, np.float64)
  k_all = np.asarray(k_all, np.float64)
  total = 0.0
  for i in range(len(q)):
    qi = unit(q[i])
    logits = [float(qi @ unit(k_all[j])) / t for j in range(len(k_all))]
    total -= log_softmax_row(logits)[offset + i]
  return total / len(q)


def moco_v3_numpy(q1, q2, k1, k2, offset, t):
  return 2 * t * (moco_ce_numpy(q1, k2, offset, t) + moco_ce_numpy(q2, k1, offset, t))


def dino_numpy(student, teacher, center, ts, tt):
  """student [V, n, K], teacher [2, n, K]: the cross-entropy summed entry by entry, averaged over rows and
  then over the (teacher crop, other student crop) pairs."""
  student = np.asarray(student, np.float64)
  teacher = np.asarray(teacher, np.float64)
  center = np.asarray(center, np.float64).reshape(-1)
  num_v, n, num_k = student.shape
  total, pairs = 0.0, 0
  for iq in range(len(teacher)):
    for v in range(num_v):
      if v == iq:
        continue
      pairs += 1
      for b in range(n):
        t_probs = np.exp(log_softmax_row([(teacher[iq, b, k] - center[k]) / tt for k in range(num_k)]))
        s_logp = log_softmax_row([student[v, b, k] / ts for k in range(num_k)])
        total -= sum(t_probs[k] * s_logp[k] for k in range(num_k)) / n
  assert pairs == len(teacher) * num_v - len(teacher)
  return total / pairs


def dino_diagnostics_numpy(student, teacher, center, ts, tt):
  student = np.asarray(student, np.float64)
  teacher = np.asarray(teacher, np.float64)
  center = np.asarray(center, np.float64).reshape(-1)
  num_v, n, num_k = student.shape
  probs = [[np.exp(log_softmax_row([(teacher[iq, b, k] - center[k]) / tt for k in range(num_k)]))
            for b in range(n)] for iq in range(len(teacher))]
  entropy = np.mean([-sum(p[k] * np.log(p[k]) for k in range(num_k)) for rows in probs for p in rows])
  mean_p = [np.mean([p[k] for rows in probs for p in rows]) for k in range(num_k)]
  batch_entropy = -sum(m * np.log(m) for m in mean_p)
  kl, pairs = 0.0, 0
  for iq in range(len(teacher)):
    for v in range(num_v):
      if v == iq:
        continue
      pairs += 1
      for b in range(n):
        s_logp = log_softmax_row([student[v, b, k] / ts for k in range(num_k)])
        p = probs[iq][b]
        kl += sum(p[k] * (np.log(p[k]) - s_logp[k]) for k in range(num_k)) / n
  return {"teacher_entropy": entropy, "teacher_batch_entropy": batch_entropy,
          "kl_teacher_student": kl / pairs}


def dino_inputs(rng, num_student=4, n=3, num_k=5):
  student = rng.normal(size=(num_student, n, num_k)).astype(np.float32)
  teacher = (rng.normal(size=(2, n, num_k)) + [0.5, -0.3, 0.0, 1.0, 0.2][:num_k]).astype(np.float32)
  center = (0.3 * rng.normal(size=(1, num_k))).astype(np.float32)
  return student, teacher, center


# ---------------------------------------------------------------------------------------------------------
# MoCo v3, one device.

@pytest.mark.parametrize("t", [0.2, 1.0])
def test_moco_v3_value_and_gradient(t):
  rng = np.random.default_rng(0)
  q1, q2, k1, k2 = rng.normal(size=(4, 6, 5)).astype(np.float32)
  got = losses.moco_v3_loss(q1, q2, k1, k2, 0, t)
  np.testing.assert_allclose(got, moco_v3_numpy(q1, q2, k1, k2, 0, t), rtol=1e-5)

  def reference(a, b):  # the full [n, n] logits matrix; positives on the diagonal
    def ctr(q, k):
      q = q / jnp.linalg.norm(q, axis=-1, keepdims=True)
      k = k / np.linalg.norm(k, axis=-1, keepdims=True)
      logits = q @ k.T / t
      return 2 * t * jnp.mean(jax.nn.logsumexp(logits, axis=1) - jnp.diagonal(logits))
    return ctr(a, k2) + ctr(b, k1)

  g = jax.grad(losses.moco_v3_loss, argnums=(0, 1, 2, 3))(q1, q2, k1, k2, 0, t)
  g_ref = jax.grad(reference, argnums=(0, 1))(q1, q2)
  for a, b in zip(g[:2], g_ref):
    assert_grad_close(a, b, rtol=1e-5)
  assert_grad_close(g[0], numeric_grad(lambda a: moco_v3_numpy(a, q2, k1, k2, 0, t), q1), rtol=1e-4)
  # Design: the function stops the keys' gradient itself (keys come from the momentum encoder).
  assert np.all(g[2] == 0) and np.all(g[3] == 0)


def test_moco_v3_two_t_scaling_and_symmetry():
  rng = np.random.default_rng(1)
  q1, q2, k1, k2 = rng.normal(size=(4, 5, 4)).astype(np.float32)
  for t in (0.1, 0.2, 1.0):
    np.testing.assert_allclose(losses.moco_v3_contrastive(q1, k2, 0, t), 2 * t * moco_ce_numpy(q1, k2, 0, t),
                               rtol=1e-5)
  t = 0.2
  both = losses.moco_v3_loss(q1, q2, k1, k2, 0, t)
  np.testing.assert_allclose(both, losses.moco_v3_contrastive(q1, k2, 0, t)
                             + losses.moco_v3_contrastive(q2, k1, 0, t), rtol=1e-6)
  np.testing.assert_allclose(losses.moco_v3_loss(q2, q1, k2, k1, 0, t), both, rtol=1e-6)
  # Scale invariance of the normalized inputs.
  np.testing.assert_allclose(losses.moco_v3_loss(3 * q1, q2, k1, 0.5 * k2, 0, t), both, rtol=1e-5)


def test_moco_v3_offset_split_into_devices_equals_whole():
  rng = np.random.default_rng(2)
  q1, q2, k1, k2 = rng.normal(size=(4, 8, 4)).astype(np.float32)
  t = 0.2
  whole = losses.moco_v3_loss(q1, q2, k1, k2, 0, t)
  parts = [losses.moco_v3_loss(q1[o:o + 4], q2[o:o + 4], k1, k2, o, t) for o in (0, 4)]
  np.testing.assert_allclose(np.mean(parts), whole, rtol=1e-6)
  second = 2 * t * (moco_ce_numpy(q1[4:], k2, 4, t) + moco_ce_numpy(q2[4:], k1, 4, t))
  np.testing.assert_allclose(parts[1], second, rtol=1e-5)
  # The labels do depend on the offset: the second half scored against the first half's keys differs.
  wrong = losses.moco_v3_loss(q1[4:], q2[4:], k1, k2, 0, t)
  assert abs(float(wrong) - float(parts[1])) > 1e-2


# ---------------------------------------------------------------------------------------------------------
# DINO, one device.

def test_dino_teacher_temperature():
  schedule = np.concatenate((np.linspace(0.04, 0.07, 30), np.ones(100) * 0.07))
  fn = jax.jit(losses.dino_teacher_temperature, static_argnums=(3,))
  for epoch in (0, 1, 2, 15, 29, 30, 31, 100):
    np.testing.assert_allclose(fn(epoch, 0.04, 0.07, 30), schedule[epoch], rtol=1e-6)
    np.testing.assert_allclose(fn(jnp.int32(epoch), 0.04, 0.07, 30), schedule[epoch], rtol=1e-6)
  for epoch in (0, 1, 7):
    np.testing.assert_allclose(losses.dino_teacher_temperature(epoch, 0.04, 0.07, 0), 0.07, rtol=1e-6)
  schedule1 = np.concatenate((np.linspace(0.04, 0.07, 1), np.ones(5) * 0.07))
  for epoch in (0, 1, 3):
    np.testing.assert_allclose(losses.dino_teacher_temperature(epoch, 0.04, 0.07, 1), schedule1[epoch],
                               rtol=1e-6)


def test_dino_loss_value_and_gradient():
  student, teacher, center = dino_inputs(np.random.default_rng(3))
  ts, tt = 0.1, 0.04
  loss_fn = lambda s, t, c: losses.dino_loss(list(s), list(t), c, ts, tt)
  np.testing.assert_allclose(loss_fn(student, teacher, center), dino_numpy(student, teacher, center, ts, tt),
                             rtol=1e-5)
  # [K]-shaped center and a traced teacher temperature give the same value.
  np.testing.assert_allclose(losses.dino_loss(list(student), list(teacher), center[0], ts, jnp.float32(tt)),
                             loss_fn(student, teacher, center), rtol=1e-6)
  g_s, g_t, g_c = jax.grad(loss_fn, argnums=(0, 1, 2))(student, teacher, center)
  assert_grad_close(g_s, numeric_grad(lambda s: dino_numpy(s, teacher, center, ts, tt), student))
  assert np.all(g_t == 0) and np.all(g_c == 0)


def test_dino_two_crops_pairs():
  """With only the 2 global crops (solo-learn's CIFAR recipe) there are 2 pairs: teacher 0 -> student 1
  and teacher 1 -> student 0."""
  student, teacher, center = dino_inputs(np.random.default_rng(4), num_student=2)
  got = losses.dino_loss(list(student), list(teacher), center, 0.1, 0.07)
  np.testing.assert_allclose(got, dino_numpy(student, teacher, center, 0.1, 0.07), rtol=1e-5)


def test_dino_center_update():
  rng = np.random.default_rng(5)
  _, teacher, center = dino_inputs(rng, n=4)
  batch_sum = teacher.sum(axis=(0, 1))
  got = losses.dino_center_update(center, batch_sum, 2 * 4, 0.9)
  want = [0.9 * center[0, k] + 0.1 * sum(teacher[i, b, k] for i in range(2) for b in range(4)) / 8
          for k in range(teacher.shape[-1])]
  assert got.shape == (1, teacher.shape[-1])
  np.testing.assert_allclose(got[0], want, rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(losses.dino_center_update(center[0], batch_sum, 8, 0.9), want,
                             rtol=1e-5, atol=1e-7)


def test_dino_diagnostics():
  student, teacher, center = dino_inputs(np.random.default_rng(6))
  ts, tt = 0.1, 0.07
  diag = losses.dino_diagnostics(list(student), list(teacher), center, ts, tt)
  want = dino_diagnostics_numpy(student, teacher, center, ts, tt)
  for key, value in want.items():
    np.testing.assert_allclose(diag[key], value, rtol=1e-5, atol=1e-6)
  # loss = H(teacher) + KL(teacher || student), exactly, with the centred and sharpened teacher.
  np.testing.assert_allclose(diag["teacher_entropy"] + diag["kl_teacher_student"],
                             losses.dino_loss(list(student), list(teacher), center, ts, tt), rtol=1e-5)
  # A uniform teacher (every logit equal to the center) has entropy log K, and a student matching it puts
  # the loss at log K with zero KL: the "constant loss of log(out_dim)" collapse.
  num_k = teacher.shape[-1]
  flat = np.broadcast_to(center, teacher.shape)
  diag = losses.dino_diagnostics(list(np.zeros_like(student)), list(flat), center, ts, tt)
  np.testing.assert_allclose(diag["teacher_entropy"], np.log(num_k), rtol=1e-6)
  np.testing.assert_allclose(diag["teacher_batch_entropy"], np.log(num_k), rtol=1e-6)
  np.testing.assert_allclose(diag["kl_teacher_student"], 0, atol=1e-6)
  np.testing.assert_allclose(losses.dino_loss(list(np.zeros_like(student)), list(flat), center, ts, tt),
                             np.log(num_k), rtol=1e-6)
  # One prototype for every image: per-row and batch entropies near 0.
  one_hot = np.zeros_like(teacher)
  one_hot[..., 2] = 5.0
  diag = losses.dino_diagnostics(list(student), list(one_hot), np.zeros_like(center), ts, 0.04)
  assert diag["teacher_entropy"] < 1e-3 and diag["teacher_batch_entropy"] < 1e-3


# ---------------------------------------------------------------------------------------------------------
# Eight devices equal one: per-device losses averaged over devices as the trainer does, differentiated with
# respect to the global inputs; the center update from global sums.

def test_eight_devices_equal_one():
  assert jax.device_count() == 8
  mesh = parallel.make_mesh()
  rng = np.random.default_rng(7)
  n_global, t = 16, 0.2
  q1, q2, k1, k2 = rng.normal(size=(4, n_global, 6)).astype(np.float32)
  # Crops on axis 1 so that the examples (axis 0) are what the mesh splits: [16, crops, K].
  student = rng.normal(size=(n_global, 4, 5)).astype(np.float32)
  teacher = (rng.normal(size=(n_global, 2, 5)) + 0.5).astype(np.float32)
  center = (0.3 * rng.normal(size=(1, 5))).astype(np.float32)
  ts, tt = 0.1, 0.05

  def per_device(a1, a2, b1, b2, s, tch, c):
    n = a1.shape[0]
    gather = lambda k: parallel.all_gather(jax.lax.stop_gradient(k))
    moco = losses.moco_v3_loss(a1, a2, gather(b1), gather(b2), parallel.device_index() * n, t)
    teacher_crops = [tch[:, i] for i in range(2)]
    dino = losses.dino_loss([s[:, v] for v in range(4)], teacher_crops, c, ts, tt)
    new_center = losses.dino_center_update(
        c, parallel.sum(sum(jnp.sum(x, axis=0) for x in teacher_crops)),
        parallel.sum(jnp.float32(n * len(teacher_crops))), 0.9)
    batch_entropy = losses.dino_diagnostics([s[:, v] for v in range(4)], teacher_crops, c, ts, tt,
                                            global_sum=parallel.sum)["teacher_batch_entropy"]
    return parallel.mean(moco), parallel.mean(dino), new_center, batch_entropy

  sharded = jax.shard_map(per_device, mesh=mesh, in_specs=(P(D),) * 6 + (P(),), out_specs=P())

  def single(a1, a2, b1, b2, s, tch, c):
    student_crops, teacher_crops = [s[:, v] for v in range(4)], [tch[:, i] for i in range(2)]
    return (losses.moco_v3_loss(a1, a2, b1, b2, 0, t),
            losses.dino_loss(student_crops, teacher_crops, c, ts, tt),
            losses.dino_center_update(c, jnp.sum(tch, axis=(0, 1)), n_global * 2, 0.9),
            losses.dino_diagnostics(student_crops, teacher_crops, c, ts, tt)["teacher_batch_entropy"])

  def value_and_grads(fn):
    def objective(a1, a2, s, *rest):
      moco, dino, new_center, batch_entropy = fn(a1, a2, rest[0], rest[1], s, rest[2], rest[3])
      return moco + dino, (moco, dino, new_center, batch_entropy)
    return jax.jit(jax.value_and_grad(objective, argnums=(0, 1, 2), has_aux=True))(
        q1, q2, student, k1, k2, teacher, center)

  (_, aux8), g8 = value_and_grads(sharded)
  (_, aux1), g1 = value_and_grads(single)
  for a, b in zip(aux8, aux1):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
  # And the single-device figure itself is the numpy one.
  np.testing.assert_allclose(aux1[0], moco_v3_numpy(q1, q2, k1, k2, 0, t), rtol=1e-5)
  for a, b in zip(g8, g1):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5 * np.abs(b).max())
