"""SimSiam, Barlow Twins, VICReg and SwAV losses against independent float64 numpy computations written
loop by loop (values; gradients by central finite differences of those numpy functions), and, for the
losses with global terms, 8 simulated devices under shard_map against one device on the same global
batch (values and gradients)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from conftest import numeric_grad
from ssl_jax import losses, parallel

D = parallel.DATA


# ---------------------------------------------------------------------------------------------------------
# Independent references: float64 numpy, one scalar at a time.

def cosine(a, b):
  dot = sum(a[k] * b[k] for k in range(len(a)))
  return dot / np.sqrt(sum(v * v for v in a)) / np.sqrt(sum(v * v for v in b))


def simsiam_numpy(p1, p2, z1, z2):
  n = len(p1)
  return (-sum(cosine(p1[b], z2[b]) for b in range(n)) / n / 2
          - sum(cosine(p2[b], z1[b]) for b in range(n)) / n / 2)


def batch_norm_numpy(z, eps=1e-5):
  n, d = z.shape
  out = np.zeros((n, d))
  for k in range(d):
    mean = sum(z[b, k] for b in range(n)) / n
    var = sum((z[b, k] - mean) ** 2 for b in range(n)) / n
    for b in range(n):
      out[b, k] = (z[b, k] - mean) / np.sqrt(var + eps)
  return out


def barlow_twins_numpy(z1, z2, lambd):
  n, d = z1.shape
  a, b_ = batch_norm_numpy(z1), batch_norm_numpy(z2)
  loss = 0.0
  for i in range(d):
    for j in range(d):
      c = sum(a[b, i] * b_[b, j] for b in range(n)) / n
      loss += (1 - c) ** 2 if i == j else lambd * c ** 2
  return loss


def vicreg_terms_numpy(x, y):
  """(invariance, variance, covariance) with unbiased variance and covariance over all rows."""
  n, d = x.shape
  invariance = sum((x[b, k] - y[b, k]) ** 2 for b in range(n) for k in range(d)) / (n * d)
  variance = covariance = 0.0
  for z in (x, y):
    mean = [sum(z[b, k] for b in range(n)) / n for k in range(d)]
    for k in range(d):
      std = np.sqrt(sum((z[b, k] - mean[k]) ** 2 for b in range(n)) / (n - 1) + 1e-4)
      variance += max(0.0, 1 - std) / d / 2
    for i in range(d):
      for j in range(d):
        if i != j:
          cov = sum((z[b, i] - mean[i]) * (z[b, j] - mean[j]) for b in range(n)) / (n - 1)
          covariance += cov ** 2 / d
  return invariance, variance, covariance


def vicreg_numpy(x, y):
  s, v, c = vicreg_terms_numpy(x, y)
  return 25 * s + 25 * v + c


def sinkhorn_numpy(scores, epsilon=0.05, iterations=3):
  """The paper's K x B matrix, normalized one entry at a time; returns the B x K codes."""
  num_b, num_k = scores.shape
  q = np.array([[np.exp(scores[b, k] / epsilon) for b in range(num_b)] for k in range(num_k)])
  q /= sum(q[k, b] for k in range(num_k) for b in range(num_b))
  for _ in range(iterations):
    for k in range(num_k):
      row = sum(q[k, b] for b in range(num_b))
      for b in range(num_b):
        q[k, b] /= row * num_k
    for b in range(num_b):
      col = sum(q[k, b] for k in range(num_k))
      for k in range(num_k):
        q[k, b] /= col * num_b
  return (q * num_b).T


def swav_numpy(crop_scores, codes, temperature=0.1):
  """Swapped prediction given fixed codes {assignment crop: [n, K]} (the loss has no gradient through
  them); crop_scores [V, n, K]."""
  num_crops, n, num_k = crop_scores.shape
  total = 0.0
  for a, q in codes.items():
    sub = 0.0
    for v in range(num_crops):
      if v == a:
        continue
      for b in range(n):
        logits = [crop_scores[v, b, k] / temperature for k in range(num_k)]
        log_norm = np.log(sum(np.exp(l) for l in logits))
        sub -= sum(q[b, k] * (logits[k] - log_norm) for k in range(num_k)) / n
    total += sub / (num_crops - 1)
  return total / len(codes)


def swav_codes_numpy(crop_scores, queue_scores=None, crops_for_assign=(0, 1)):
  n = crop_scores.shape[1]
  codes = {}
  for i, a in enumerate(crops_for_assign):
    s = crop_scores[a] if queue_scores is None else np.concatenate([queue_scores[i], crop_scores[a]])
    codes[a] = sinkhorn_numpy(s)[-n:]
  return codes


def cosine_scores(rng, shape, num_prototypes=5, dim=4):
  """Prototype scores as SwAV's caller computes them: unit embeddings . unit prototypes, in [-1, 1]."""
  def unit(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)
  prototypes = unit(rng.normal(size=(num_prototypes, dim)))
  return (unit(rng.normal(size=shape + (dim,))) @ prototypes.T).astype(np.float32)


def assert_grad_close(got, want, rtol=2e-4):
  np.testing.assert_allclose(got, want, rtol=rtol, atol=rtol * np.abs(want).max())


# ---------------------------------------------------------------------------------------------------------
# One device: value and gradient against the references.

def test_simsiam_value_and_gradient():
  rng = np.random.default_rng(0)
  p1, p2, z1, z2 = rng.normal(size=(4, 5, 6)).astype(np.float32)
  np.testing.assert_allclose(losses.simsiam_loss(p1, p2, z1, z2), simsiam_numpy(p1, p2, z1, z2), rtol=1e-5)
  grads = jax.grad(losses.simsiam_loss, argnums=(0, 1, 2, 3))(p1, p2, z1, z2)
  assert_grad_close(grads[0], numeric_grad(lambda a: simsiam_numpy(a, p2, z1, z2), p1))
  assert_grad_close(grads[1], numeric_grad(lambda a: simsiam_numpy(p1, a, z1, z2), p2))
  # Stop-gradient on the projections (the encoder returns z.detach()).
  assert np.all(grads[2] == 0) and np.all(grads[3] == 0)


def test_barlow_twins_value_and_gradient():
  rng = np.random.default_rng(1)
  z1, z2 = (rng.normal(size=(2, 8, 5)) * [0.5, 1, 2, 3, 0.7] + [1, 0, -2, 0, 5]).astype(np.float32)
  lambd = 0.3  # large enough that the off-diagonal term matters in the comparison
  np.testing.assert_allclose(losses.barlow_twins_loss(z1, z2, lambd), barlow_twins_numpy(z1, z2, lambd),
                             rtol=1e-5)
  g1, g2 = jax.grad(losses.barlow_twins_loss, argnums=(0, 1))(z1, z2, lambd)
  assert_grad_close(g1, numeric_grad(lambda a: barlow_twins_numpy(a, z2, lambd), z1))
  assert_grad_close(g2, numeric_grad(lambda a: barlow_twins_numpy(z1, a, lambd), z2))


def vicreg_inputs(rng, n):
  # Per-dimension scales on both sides of 1, so the hinge relu(1 - std) is active for some dimensions only.
  scale = np.array([0.2, 0.5, 2.0, 3.0, 0.6])
  x = rng.normal(size=(n, 5)) * scale
  y = x + 0.3 * rng.normal(size=(n, 5)) * scale
  return x.astype(np.float32), y.astype(np.float32)


def test_vicreg_value_and_gradient():
  x, y = vicreg_inputs(np.random.default_rng(2), 8)
  loss, terms = losses.vicreg_loss(x, y, x, y)
  s, v, c = vicreg_terms_numpy(x, y)
  assert v > 0 and c > 0
  np.testing.assert_allclose([terms["invariance"], terms["variance"], terms["covariance"]], [s, v, c],
                             rtol=1e-5)
  np.testing.assert_allclose(loss, 25 * s + 25 * v + c, rtol=1e-5)
  gx, gy = jax.grad(lambda a, b: losses.vicreg_loss(a, b, a, b)[0], argnums=(0, 1))(x, y)
  assert_grad_close(gx, numeric_grad(lambda a: vicreg_numpy(a, y), x))
  assert_grad_close(gy, numeric_grad(lambda a: vicreg_numpy(x, a), y))


def test_sinkhorn_codes():
  scores = cosine_scores(np.random.default_rng(3), (12,), num_prototypes=5)
  codes = losses.sinkhorn(scores)
  np.testing.assert_allclose(codes, sinkhorn_numpy(scores.astype(np.float64)), rtol=2e-5, atol=1e-7)
  # The last step normalizes each example's codes; with more iterations the prototype marginals converge
  # to the equipartition B / K (3 iterations only approach it).
  np.testing.assert_allclose(codes.sum(1), 1, rtol=1e-5)
  np.testing.assert_allclose(losses.sinkhorn(scores, iterations=200).sum(0), 12 / 5, rtol=1e-3)
  assert np.all(jax.grad(lambda s: jnp.sum(losses.sinkhorn(s) * s))(scores) == codes)


@pytest.mark.parametrize("with_queue,hard", [(False, False), (True, False), (False, True), (True, True)])
def test_swav_value_and_gradient(with_queue, hard):
  """hard: each code replaced by the one-hot of its largest entry (configs/swav.py's `hard` variant)."""
  rng = np.random.default_rng(4)
  crop_scores = cosine_scores(rng, (4, 6))  # 2 global + 2 local crops, 6 examples, 5 prototypes
  queue = cosine_scores(rng, (2, 7)) if with_queue else None
  codes = swav_codes_numpy(crop_scores.astype(np.float64), queue)
  if hard:
    codes = {a: np.eye(q.shape[1])[[int(np.argmax(row)) for row in q]] for a, q in codes.items()}
  loss_fn = lambda s: losses.swav_loss(list(s), None if queue is None else list(queue), hard_codes=hard)
  np.testing.assert_allclose(loss_fn(crop_scores), swav_numpy(crop_scores, codes), rtol=1e-5)
  # Gradient with the codes held fixed (Sinkhorn runs without gradient).
  assert_grad_close(jax.grad(loss_fn)(crop_scores), numeric_grad(lambda s: swav_numpy(s, codes), crop_scores))


# ---------------------------------------------------------------------------------------------------------
# Eight devices equal one: each per-device loss is averaged over devices as the trainer does
# (ssl_jax/train.py), and differentiated with respect to the global inputs.

def on_mesh(per_device, num_inputs):
  return jax.jit(jax.shard_map(lambda *a: parallel.mean(per_device(*a)), mesh=parallel.make_mesh(),
                               in_specs=(P(D),) * num_inputs, out_specs=P()))


def assert_value_and_grad_equal(sharded, single, inputs, rtol=1e-5):
  assert jax.device_count() == 8
  argnums = tuple(range(len(inputs)))
  v8, g8 = jax.value_and_grad(sharded, argnums=argnums)(*inputs)
  v1, g1 = jax.value_and_grad(single, argnums=argnums)(*inputs)
  np.testing.assert_allclose(v8, v1, rtol=rtol)
  for a, b in zip(g8, g1):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5 * np.abs(b).max())


def test_barlow_twins_eight_devices_equal_one():
  rng = np.random.default_rng(5)
  z1, z2 = (rng.normal(size=(2, 16, 6)) + rng.normal(size=6)).astype(np.float32)
  sharded = on_mesh(lambda a, b: losses.barlow_twins_loss(a, b, 0.1, global_sum=parallel.sum), 2)
  assert_value_and_grad_equal(sharded, lambda a, b: losses.barlow_twins_loss(a, b, 0.1), (z1, z2))


def test_barlow_twins_official_gradient_is_true_gradient_over_devices():
  """The scale factor the docstring states: with the cross-correlation summed by a collective autograd does
  not see (torch.distributed.all_reduce; emulated by a stop-gradient on the other devices' part) and the
  gradients averaged over devices (DDP), the gradient is the true one / number of devices."""
  rng = np.random.default_rng(6)
  z1, z2 = rng.normal(size=(2, 16, 4)).astype(np.float32)

  def official_like(a, b):
    n = parallel.sum(jnp.float32(a.shape[0]))

    def sync_bn(z):  # SyncBatchNorm: global statistics, exact backward
      centred = z - parallel.sum(jnp.sum(z, 0)) / n
      return centred / jnp.sqrt(parallel.sum(jnp.sum(centred ** 2, 0)) / n + 1e-5)

    c_local = sync_bn(a).T @ sync_bn(b) / n
    c = c_local + jax.lax.stop_gradient(parallel.sum(c_local) - c_local)
    off = c - jnp.diag(jnp.diagonal(c))
    return jnp.sum((jnp.diagonal(c) - 1) ** 2) + 0.1 * jnp.sum(off ** 2)

  g_official = jax.grad(on_mesh(official_like, 2), argnums=(0, 1))(z1, z2)
  g_true = jax.grad(lambda a, b: losses.barlow_twins_loss(a, b, 0.1), argnums=(0, 1))(z1, z2)
  for a, b in zip(g_official, g_true):
    np.testing.assert_allclose(8 * a, b, rtol=1e-4, atol=1e-5 * np.abs(b).max())


def test_vicreg_eight_devices_equal_one():
  x, y = vicreg_inputs(np.random.default_rng(7), 16)

  def per_device(a, b):
    return losses.vicreg_loss(a, b, parallel.all_gather(a), parallel.all_gather(b))[0]

  single = lambda a, b: losses.vicreg_loss(a, b, a, b)[0]
  assert_value_and_grad_equal(on_mesh(per_device, 2), single, (x, y))


@pytest.mark.parametrize("with_queue", [False, True])
def test_sinkhorn_eight_devices_equal_one(with_queue):
  rng = np.random.default_rng(8)
  scores = cosine_scores(rng, (16,))
  queue = cosine_scores(rng, (24,)) if with_queue else None  # 3 queue rows per device

  def per_device(s, *q):
    s = jnp.concatenate([q[0], s]) if q else s
    return losses.sinkhorn(s, global_sum=parallel.sum)[-2:]

  inputs = (scores,) if queue is None else (scores, queue)
  sharded = jax.jit(jax.shard_map(per_device, mesh=parallel.make_mesh(), in_specs=(P(D),) * len(inputs),
                                  out_specs=P(D)))
  single = losses.sinkhorn(scores if queue is None else np.concatenate([queue, scores]))[-16:]
  np.testing.assert_allclose(sharded(*inputs), single, rtol=2e-5, atol=1e-7)


@pytest.mark.parametrize("with_queue", [False, True])
def test_swav_eight_devices_equal_one(with_queue):
  rng = np.random.default_rng(9)
  # Crops on axis 1 so the examples (axis 0) are what the mesh splits: [16, 3 crops, 5 prototypes].
  crop_scores = cosine_scores(rng, (16, 3))
  queue = cosine_scores(rng, (24, 2)) if with_queue else None

  def loss(s, *q):
    queue_scores = [q[0][:, i] for i in range(2)] if q else None
    return losses.swav_loss([s[:, v] for v in range(3)], queue_scores, global_sum=parallel.sum)

  def single(s, *q):
    return losses.swav_loss([s[:, v] for v in range(3)], [q[0][:, i] for i in range(2)] if q else None)

  inputs = (crop_scores,) if queue is None else (crop_scores, queue)
  assert_value_and_grad_equal(on_mesh(loss, len(inputs)), single, inputs)
