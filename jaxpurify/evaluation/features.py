"""Frozen-encoder features, extracted once and cached as host arrays."""

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from jaxpurify import parallel
from jaxpurify.losses import l2_normalize


def place(tree, mesh: jax.sharding.Mesh | None):
  """Host (or device) arrays -> device arrays replicated over `mesh`, or on the default device."""
  return jax.device_put(tree, parallel.replicated(mesh) if mesh is not None else None)


@functools.partial(jax.jit, static_argnums=(1, 2))
def _gather(outputs: jax.Array, sharding: jax.NamedSharding, normalize: bool) -> jax.Array:
  outputs = outputs.astype(jnp.float32)
  return jax.sharding.reshard(l2_normalize(outputs) if normalize else outputs, sharding)


def apply_batched(fn: Callable[[jax.Array], jax.Array], images: np.ndarray, batch_size: int,
                  mesh: jax.sharding.Mesh, normalize: bool = False) -> np.ndarray:
  """`fn` over every image: uint8 [N, H, W, 3] -> float32 [N, D] on the host (rows L2-normalised if `normalize`).

  `fn` maps a uint8 batch [B, H, W, 3] sharded along `data` to [B, D]. The last batch is zero-padded to
  `batch_size` (one compile) and its padding rows are dropped.
  """
  parallel.check_global_batch(batch_size, "batch_size")
  n, replicated = len(images), parallel.replicated(mesh)
  out = []
  for start in range(0, n, batch_size):
    batch = np.asarray(images[start:start + batch_size])
    batch = np.pad(batch, ((0, batch_size - len(batch)),) + ((0, 0),) * (batch.ndim - 1))
    out.append(_gather(fn(parallel.put_batch(batch, mesh)), replicated, normalize))
  return np.concatenate([np.asarray(f) for f in out])[:n]


def extract_features(encode_fn: Callable[[jax.Array], jax.Array], images: np.ndarray, batch_size: int,
                     mesh: jax.sharding.Mesh) -> np.ndarray:
  """L2-normalized features of every image: uint8 [N, H, W, 3] -> float32 [N, D] (see apply_batched)."""
  return apply_batched(encode_fn, images, batch_size, mesh, normalize=True)
