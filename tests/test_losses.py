"""Each loss against an independent direct computation (numpy loops for values, a loop-style jnp
reference for gradients)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ssl_jax import losses

jax.config.update("jax_enable_x64", False)


def _unit(x):
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


def nt_xent_numpy(z1, z2, t):
  """Paper eq. 1, anchor by anchor over the 2N views; returned as the official code reports it
  (sum of the two directional means = 2 x the mean over 2N anchors)."""
  z = _unit(np.concatenate([z1, z2]).astype(np.float64))
  n2 = len(z)
  n = n2 // 2
  total = 0.0
  for i in range(n2):
    j = (i + n) % n2
    denom = sum(np.exp(z[i] @ z[k] / t) for k in range(n2) if k != i)
    total += -np.log(np.exp(z[i] @ z[j] / t) / denom)
  return 2 * total / n2


def nt_xent_reference(z1, z2, t):
  """The same definition with jnp, written as the full 2N x 2N similarity matrix, for gradients."""
  z = jnp.concatenate([z1, z2])
  z = z / jnp.linalg.norm(z, axis=-1, keepdims=True)
  n2 = z.shape[0]
  sim = z @ z.T / t
  sim = jnp.where(jnp.eye(n2, dtype=bool), -jnp.inf, sim)
  pos = jnp.roll(jnp.arange(n2), n2 // 2)
  return 2 * jnp.mean(jax.nn.logsumexp(sim, axis=1) - sim[jnp.arange(n2), pos])


@pytest.mark.parametrize("t", [0.1, 0.5])
def test_nt_xent_value_and_gradient(t):
  rng = np.random.default_rng(0)
  z1, z2 = rng.normal(size=(2, 6, 5)).astype(np.float32)
  got = losses.nt_xent(z1, z2, z1, z2, 0, t)
  np.testing.assert_allclose(got, nt_xent_numpy(z1, z2, t), rtol=1e-5)
  g = jax.grad(lambda a, b: losses.nt_xent(a, b, a, b, 0, t), argnums=(0, 1))(z1, z2)
  g_ref = jax.grad(nt_xent_reference, argnums=(0, 1))(z1, z2, t)
  for a, b in zip(g, g_ref):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_nt_xent_split_into_devices_equals_whole():
  """Anchors split over 'devices' (offsets into the gathered batch) sum to the single-device loss, and the
  gradient through the gathered copies is the full gradient."""
  rng = np.random.default_rng(1)
  z1, z2 = rng.normal(size=(2, 8, 4)).astype(np.float32)
  whole = losses.nt_xent(z1, z2, z1, z2, 0, 0.2)

  def split(a, b):
    parts = [losses.nt_xent(a[i:i + 2], b[i:i + 2], a, b, i, 0.2) for i in range(0, 8, 2)]
    return jnp.mean(jnp.stack(parts))

  np.testing.assert_allclose(split(z1, z2), whole, rtol=1e-6)
  np.testing.assert_allclose(jax.grad(split)(z1, z2),
                             jax.grad(lambda a, b: losses.nt_xent(a, b, a, b, 0, 0.2))(z1, z2),
                             rtol=1e-5, atol=1e-7)


def test_byol_loss():
  rng = np.random.default_rng(2)
  p1, p2, t1, t2 = rng.normal(size=(4, 5, 3)).astype(np.float32)
  want = np.mean([2 - 2 * _unit(p1[i]) @ _unit(t2[i]) + 2 - 2 * _unit(p2[i]) @ _unit(t1[i]) for i in range(5)])
  np.testing.assert_allclose(losses.byol_loss(p1, p2, t1, t2), want, rtol=1e-5)
  # The targets get no gradient; the prediction's gradient is that of 2 - 2 cos.
  g_t = jax.grad(lambda t: losses.byol_loss(p1, p2, t, t2))(t1)
  assert np.all(g_t == 0)
  g_p = jax.grad(lambda p: losses.byol_loss(p, p2, t1, t2))(p1)
  cos = lambda p: jnp.sum(p * t2, -1) / jnp.linalg.norm(p, axis=-1) / jnp.linalg.norm(t2, axis=-1)
  np.testing.assert_allclose(g_p, jax.grad(lambda p: jnp.mean(2 - 2 * cos(p)))(p1), rtol=1e-5, atol=1e-7)


def test_info_nce_queue():
  rng = np.random.default_rng(3)
  q, k = rng.normal(size=(2, 4, 6)).astype(np.float32)
  queue = _unit(rng.normal(size=(10, 6))).astype(np.float32)
  t = 0.2
  want = []
  for i in range(4):
    qi, ki = _unit(q[i]), _unit(k[i])
    pos = np.exp(qi @ ki / t)
    want.append(-np.log(pos / (pos + np.exp(queue @ qi / t).sum())))
  np.testing.assert_allclose(losses.info_nce_queue(q, k, queue, t), np.mean(want), rtol=1e-5)
  g_k, g_queue = jax.grad(lambda kk, qq: losses.info_nce_queue(q, kk, qq, t), argnums=(0, 1))(k, queue)
  assert np.all(g_k == 0) and np.all(g_queue == 0)

  def reference(qq):
    qn = qq / jnp.linalg.norm(qq, axis=-1, keepdims=True)
    kn = k / np.linalg.norm(k, axis=-1, keepdims=True)
    logits = jnp.concatenate([jnp.sum(qn * kn, -1, keepdims=True), qn @ queue.T], 1) / t
    return jnp.mean(jax.nn.logsumexp(logits, 1) - logits[:, 0])

  np.testing.assert_allclose(jax.grad(lambda qq: losses.info_nce_queue(qq, k, queue, t))(q),
                             jax.grad(reference)(q), rtol=1e-5, atol=1e-7)


def test_softmax_cross_entropy():
  logits = np.array([[2.0, 0.5, -1.0], [0.0, 0.0, 3.0]], np.float32)
  labels = np.array([0, 1])
  p = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
  np.testing.assert_allclose(losses.softmax_cross_entropy(logits, labels),
                             -np.mean(np.log(p[[0, 1], labels])), rtol=1e-6)
