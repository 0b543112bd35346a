"""Pure, jittable losses for other JAX projects. Imports nothing from jaxpurify's CLI or data code.

Batch axes may be sharded over a mesh axis (`jax.make_mesh` uses explicit sharding): functions that
need every row of a batch gather it themselves with `all_rows`.
"""

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
  """x / max(||x||, eps) along `axis`, as torch.nn.functional.normalize."""
  norm = jnp.sqrt(jnp.sum(jnp.square(x), axis=axis, keepdims=True))
  return x / jnp.maximum(norm, eps)


def nt_xent(z1: jax.Array, z2: jax.Array, temperature: float = 0.5) -> jax.Array:
  """SimCLR's NT-Xent loss.

  z1, z2: [B, D] projections of two views of the same B images (L2-normalised here).
  Each of the 2B anchors has its other view as positive and the remaining 2B - 2 views as negatives;
  the denominator sums over all 2B - 1 other views (self excluded, positive included).
  Returns the mean loss over the 2B anchors, a scalar.
  """
  z1, z2 = l2_normalize(z1.astype(jnp.float32)), l2_normalize(z2.astype(jnp.float32))
  g1, g2 = all_rows(z1), all_rows(z2)
  self_mask = jnp.eye(z1.shape[0], dtype=bool)
  positive = jnp.sum(z1 * z2, axis=-1) / temperature

  def anchor_losses(z, same, other):
    logits_same = jnp.where(self_mask, -jnp.inf, z @ same.T / temperature)
    logits_other = z @ other.T / temperature
    return jax.nn.logsumexp(jnp.concatenate([logits_same, logits_other], axis=1), axis=1) - positive

  return 0.5 * (jnp.mean(anchor_losses(z1, g1, g2)) + jnp.mean(anchor_losses(z2, g2, g1)))


__all__ = ["all_rows", "l2_normalize", "nt_xent"]
