"""Helpers every loss uses: gathering sharded rows and L2 normalisation."""

import jax
import jax.numpy as jnp


def all_rows(z: jax.Array) -> jax.Array:
  """z [B, ...] with rows possibly sharded -> the same values replicated (all-gather), else z itself.

  Under explicit sharding `z @ z.T` of a row-sharded z is illegal; `z @ all_rows(z).T` keeps rows sharded.
  """
  sharding = jax.typeof(z).sharding
  if sharding.mesh.empty or all(axis is None for axis in sharding.spec):
    return z
  return jax.sharding.reshard(z, jax.P())


def l2_normalize(x: jax.Array, axis: int = -1, eps: float = 1e-12) -> jax.Array:
  """x / max(||x||, eps) along `axis`, as torch.nn.functional.normalize; finite gradient at x = 0 (I / eps, as
  torch's), where sqrt's derivative would make it NaN."""
  norm = jnp.sqrt(jnp.maximum(jnp.sum(jnp.square(x), axis=axis, keepdims=True), eps * eps))
  return x / norm
