"""BYOL's regression loss: the normalised mean squared error between a prediction and a fixed target."""

import jax
import jax.numpy as jnp

from jaxpurify.losses.core import l2_normalize


def byol_loss(p: jax.Array, z: jax.Array) -> jax.Array:
  """BYOL's loss for one direction: mean over rows of ||p̂ - ẑ||² = 2 - 2·cos(p, z).

  p: [B, D] online predictions, z: [B, D] target projections of the other view (no gradient flows into z).
  Rows may be sharded. Returns a scalar in [0, 4]: 0 when p and z point the same way, 4 when opposite.
  The symmetric BYOL loss is the sum of both directions, `byol_loss(p1, z2) + byol_loss(p2, z1)`.
  """
  p = l2_normalize(p.astype(jnp.float32))
  z = jax.lax.stop_gradient(l2_normalize(z.astype(jnp.float32)))
  return jnp.mean(2.0 - 2.0 * jnp.sum(p * z, axis=-1))
