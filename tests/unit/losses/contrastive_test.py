"""nt_xent against a direct NumPy transcription of the SimCLR formula, sharded and not."""

import jax
import numpy as np
from absl.testing import absltest

from jaxpurify.losses import all_rows, l2_normalize, nt_xent


def nt_xent_reference(z1, z2, t):
  """Loop over the 2B anchors: -log(exp(s_pos / t) / sum_{k != i} exp(s_ik / t))."""
  z = np.concatenate([z1, z2]).astype(np.float64)
  z /= np.linalg.norm(z, axis=1, keepdims=True)
  n, b = len(z), len(z1)
  losses = []
  for i in range(n):
    sims = np.exp(z @ z[i] / t)
    positive = sims[(i + b) % n]
    losses.append(-np.log(positive / (sims.sum() - sims[i])))
  return np.mean(losses)


class LossesTest(absltest.TestCase):

  def setUp(self):
    super().setUp()
    rng = np.random.default_rng(0)
    self.z1 = rng.normal(size=(16, 5)).astype(np.float32)
    self.z2 = rng.normal(size=(16, 5)).astype(np.float32)

  def test_nt_xent_matches_reference(self):
    for t in (0.5, 0.1):
      np.testing.assert_allclose(nt_xent(self.z1, self.z2, t), nt_xent_reference(self.z1, self.z2, t),
                                 rtol=1e-5)

  def test_identical_views_with_orthogonal_batch(self):
    # z1 = z2 = one-hot rows: positive sim 1, all 2B-2 negatives sim 0 -> log(e^{1/t} + 2B-2) - 1/t.
    z = np.eye(4, dtype=np.float32)
    t = 0.5
    expected = np.log(np.exp(1 / t) + 6) - 1 / t
    np.testing.assert_allclose(nt_xent(z, z, t), expected, rtol=1e-6)

  def test_sharded_equals_unsharded(self):
    mesh = jax.make_mesh((8,), ("data",))
    sharding = jax.NamedSharding(mesh, jax.P("data"))
    with jax.set_mesh(mesh):
      sharded = jax.jit(nt_xent)(jax.device_put(self.z1, sharding), jax.device_put(self.z2, sharding))
      gathered = jax.jit(all_rows)(jax.device_put(self.z1, sharding))
    np.testing.assert_allclose(sharded, jax.jit(nt_xent)(self.z1, self.z2), rtol=1e-6)
    self.assertTrue(gathered.sharding.is_fully_replicated)

  def test_gradients_flow_through_both_views(self):
    g1, g2 = jax.grad(nt_xent, argnums=(0, 1))(self.z1, self.z2)
    self.assertGreater(float(np.abs(g1).sum()), 0)
    self.assertGreater(float(np.abs(g2).sum()), 0)

  def test_l2_normalize(self):
    x = np.array([[3.0, 4.0], [0.0, 0.0]], np.float32)
    np.testing.assert_allclose(l2_normalize(x), [[0.6, 0.8], [0.0, 0.0]])


if __name__ == "__main__":
  absltest.main()
