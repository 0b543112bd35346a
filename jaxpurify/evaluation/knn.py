"""Weighted kNN monitor of SimCLR / BadEncoder on cached features."""

import functools

import jax
import jax.numpy as jnp
import numpy as np

from jaxpurify.evaluation.features import place
from jaxpurify.losses import l2_normalize


@functools.partial(jax.jit, static_argnames=("num_classes", "k", "chunk_size"))
def _knn(bank, bank_labels, queries, t, *, num_classes, k, chunk_size):
  bank = l2_normalize(bank)
  q = queries.shape[0]
  num_chunks = -(-q // chunk_size)
  queries = jnp.pad(l2_normalize(queries), ((0, num_chunks * chunk_size - q), (0, 0)))

  def predict_chunk(x):  # [chunk, D] -> [chunk]
    sim = jnp.dot(x, bank.T, precision=jax.lax.Precision.HIGHEST)
    sim, idx = jax.lax.top_k(sim, k)
    rows = jnp.arange(chunk_size)[:, None]
    scores = jnp.zeros((chunk_size, num_classes)).at[rows, bank_labels[idx]].add(jnp.exp(sim / t))
    return jnp.argmax(scores, axis=-1)

  preds = jax.lax.map(predict_chunk, queries.reshape(num_chunks, chunk_size, -1))
  return preds.reshape(-1)[:q].astype(jnp.int32)


def knn_predict(train_feats, train_labels, query_feats, num_classes: int, k: int = 200, t: float = 0.5, *,
                chunk_size: int = 1000, mesh: jax.sharding.Mesh | None = None) -> np.ndarray:
  """Weighted kNN labels: train [N, D], [N]; queries [Q, D] -> int32 [Q].

  Cosine similarity on L2-normalized features; the k nearest train features vote for their label with
  weight exp(sim / t); the class with the largest summed weight wins. Queries go in chunks of `chunk_size`.
  """
  bank, labels, queries = (place(np.asarray(a, dtype), mesh) for a, dtype in
                           ((train_feats, np.float32), (train_labels, np.int32), (query_feats, np.float32)))
  return np.asarray(_knn(bank, labels, queries, t, num_classes=num_classes, k=min(k, bank.shape[0]),
                         chunk_size=min(chunk_size, queries.shape[0])))
