"""Weighted k-nearest-neighbour classification (Wu et al. 2018, InstDisc, section 3.4; Caron et al. 2021,
DINO, appendix): cosine similarity of L2-normalized features, each of the k neighbours votes for its class
with weight exp(similarity / T), T = 0.07; the whole train split is the memory."""

from __future__ import annotations

import functools
from typing import Dict, Sequence

import jax
import jax.numpy as jnp
import numpy as np


@jax.jit
def _normalize(x):
  return x / jnp.linalg.norm(x, axis=-1, keepdims=True).clip(1e-12)


@functools.partial(jax.jit, static_argnames=("ks", "num_classes", "temperature"))
def _predict(memory, memory_labels, queries, ks, num_classes, temperature):
  """[len(ks), n_queries] predicted labels. The memory is an argument, not a constant closed over: a closed-
  over array is embedded in the compiled program (compiled afresh per call and per feature table; 2.5 s
  instead of 0.4 s for 4,000 x 3,072 raw pixels at the tests' -O0)."""
  sim = _normalize(queries) @ memory.T
  top_sim, top_idx = jax.lax.top_k(sim, max(ks))
  votes = jax.nn.one_hot(memory_labels[top_idx], num_classes) * jnp.exp(top_sim / temperature)[..., None]
  # Cumulative votes over the ranked neighbours give every k in one pass.
  cumulative = jnp.cumsum(votes, axis=1)
  return jnp.stack([jnp.argmax(cumulative[:, k - 1], axis=-1) for k in ks])


def knn_predict(train_features, train_labels, test_features, ks: Sequence[int], num_classes: int,
                temperature: float = 0.07, chunk: int = 1024) -> Dict[int, np.ndarray]:
  """{k: predicted labels [n_test]} for each k (a k larger than the memory uses the whole memory)."""
  memory = _normalize(jnp.asarray(train_features, jnp.float32))
  memory_labels = jnp.asarray(train_labels, jnp.int32)
  requested = list(ks)
  ks = tuple(min(k, memory.shape[0]) for k in requested)
  test = np.asarray(test_features, np.float32)
  preds = np.concatenate([np.asarray(_predict(memory, memory_labels, jnp.asarray(test[i:i + chunk]), ks, num_classes,
                                              float(temperature)))
                          for i in range(0, len(test), chunk)], axis=1)
  return {k: preds[i] for i, k in enumerate(requested)}


def knn_accuracy(train_features, train_labels, test_features, test_labels, ks=(10, 20, 100, 200),
                 num_classes: int = 10, temperature: float = 0.07) -> Dict[str, float]:
  """{"knn_top1_k{k}": accuracy in [0, 1]}."""
  preds = knn_predict(train_features, train_labels, test_features, ks, num_classes, temperature)
  return {f"knn_top1_k{k}": float(np.mean(p == np.asarray(test_labels))) for k, p in preds.items()}
