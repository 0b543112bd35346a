"""Contrastive self-supervised losses: SimCLR's NT-Xent and MoCo's InfoNCE against a queue of negatives."""

import jax
import jax.numpy as jnp

from jaxpurify.losses.core import all_rows, l2_normalize


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


def moco_infonce(q: jax.Array, k: jax.Array, queue: jax.Array, temperature: float = 0.2) -> jax.Array:
  """MoCo's InfoNCE loss with a queue of negatives.

  q: [B, D] queries (online encoder), k: [B, D] keys of the other view (momentum encoder); both are
  L2-normalised here and no gradient flows into k. queue: [K, D] L2-normalised negatives (rows may be
  sharded; gathered here), also without gradient. Each query's logits are [q·k⁺, q·queueᵀ] / temperature,
  a cross-entropy with the positive at index 0. Returns the mean over the B queries, a scalar.
  """
  q = l2_normalize(q.astype(jnp.float32))
  k = jax.lax.stop_gradient(l2_normalize(k.astype(jnp.float32)))
  queue = jax.lax.stop_gradient(all_rows(queue.astype(jnp.float32)))
  positive = jnp.sum(q * k, axis=-1) / temperature
  negatives = q @ queue.T / temperature
  return jnp.mean(jax.nn.logsumexp(jnp.concatenate([positive[:, None], negatives], axis=1), axis=1) - positive)
