"""Distillation losses against float64 NumPy transcriptions of the official PyTorch criteria, sharded and not.

The references work on NCHW arrays (the JAX losses take NHWC) and loop over samples and positions where the torch
code vectorises: NAD's `at.py` AT, `KDistill_ZOO/{FitNet,CC,KD,SP,AFD}.py`, and `distillation.py`'s clone term.
"""

import functools
import math

import jax
import numpy as np
from absl.testing import absltest, parameterized

from jaxpurify.losses import (afd, attention_transfer, correlation_congruence, feature_clone, fitnet, kd,
                              similarity_preserving)
from jaxpurify.losses.distillation import area_pool, grids_match, match_grids


def _nchw(f):
  return np.transpose(np.asarray(f, np.float64), (0, 3, 1, 2))


def _normalize(x):
  return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def at_reference(fs, ft, p=2):
  """NAD `AT(p)`: F.mse_loss of per-sample attention maps Σ_c |F|^p / (||·||₂ over (H, W) + 1e-6)."""
  def attention_map(f):
    a = np.sum(np.abs(_nchw(f)) ** p, axis=1)
    return np.stack([m / (np.sqrt(np.sum(m * m)) + 1e-6) for m in a])
  return np.mean((attention_map(fs) - attention_map(ft)) ** 2)


def cc_reference(fs, ft):
  """`Correlation`: mean over the (B - 1) · H · W positions of Σ_c δ[b] δ[b + 1], δ = |Fs - Ft|."""
  delta = np.abs(_nchw(fs) - _nchw(ft))
  b, _, h, w = delta.shape
  terms = [np.dot(delta[i, :, y, x], delta[i + 1, :, y, x]) for i in range(b - 1) for y in range(h) for x in range(w)]
  return sum(terms) / len(terms)


def kd_reference(fs, ft, t=0.5):
  """`DistillKL(T)` on NCHW maps: KLDivLoss('batchmean')(log_softmax(s / T, 1), softmax(t / T, 1)) · T²."""
  s, tt = _nchw(fs), _nchw(ft)
  b, _, h, w = s.shape
  total = 0.0
  for i in range(b):
    for y in range(h):
      for x in range(w):
        p_s = np.exp(s[i, :, y, x] / t) / np.sum(np.exp(s[i, :, y, x] / t))
        p_t = np.exp(tt[i, :, y, x] / t) / np.sum(np.exp(tt[i, :, y, x] / t))
        total += np.sum(p_t * (np.log(p_t) - np.log(p_s)))
  return t**2 * total / b


def sp_reference(fs, ft):
  """`Similarity`: ||normalize(G_t, dim=1) - normalize(G_s, dim=1)||_F² / B², G = F Fᵀ of flattened NCHW rows."""
  def gram(f):
    f = _nchw(f).reshape(len(f), -1)
    return _normalize(f @ f.T)
  return np.sum((gram(ft) - gram(fs)) ** 2) / len(fs) ** 2


def se_weights(key, c):
  """AFD's two 1×1 convs, drawn as the spec says: Kaiming normal fan_out, std sqrt(2 / C_out); [C, 2C], [2C, C]."""
  key_1, key_2 = jax.random.split(key)
  w_1 = np.asarray(jax.random.normal(key_1, (c, 2 * c)), np.float64) * math.sqrt(2 / (2 * c))
  w_2 = np.asarray(jax.random.normal(key_2, (2 * c, c)), np.float64) * math.sqrt(2 / c)
  return w_1, w_2


def afd_reference(fs, ft, w_1, w_2):
  """`AFD(C)`: ρ from the teacher's GAP through the SE convs (weights as [out, in]), sigmoid, sum-to-1."""
  s, t = _nchw(fs), _nchw(ft)
  conv_1, conv_2 = w_1.T, w_2.T  # [2C, C], [C, 2C]: torch's [out, in, 1, 1] without the 1×1
  losses = []
  for i in range(len(s)):
    hidden = np.maximum(conv_1 @ t[i].mean(axis=(1, 2)), 0)
    rho = 1 / (1 + np.exp(-(conv_2 @ hidden)))
    rho = rho / rho.sum()
    s_hat = s[i] / (np.sqrt(np.sum(s[i] ** 2, axis=(1, 2), keepdims=True)) + 1e-6)
    t_hat = t[i] / (np.sqrt(np.sum(t[i] ** 2, axis=(1, 2), keepdims=True)) + 1e-6)
    losses.append(np.sum(rho * np.mean((s_hat - t_hat) ** 2, axis=(1, 2))))
  return np.mean(losses)


def clone_reference(hs, ht):
  return -np.mean(np.sum(_normalize(np.float64(hs)) * _normalize(np.float64(ht)), axis=-1))


def _maps(seed, b=4, h=4, w=4, c=3):
  return np.random.default_rng(seed).normal(size=(b, h, w, c)).astype(np.float32)


class ReferenceTest(parameterized.TestCase):

  def setUp(self):
    super().setUp()
    self.fs, self.ft = _maps(0), _maps(1)  # [4, 4, 4, 3]
    self.ft_wide = _maps(2, c=5)

  def assert_close(self, got, want):
    np.testing.assert_allclose(np.asarray(got, np.float64), want, rtol=2e-5, atol=1e-7)

  def test_attention_transfer(self):
    for p in (2, 1):
      self.assert_close(attention_transfer(self.fs, self.ft, p), at_reference(self.fs, self.ft, p))
    self.assert_close(attention_transfer(self.fs, self.ft_wide), at_reference(self.fs, self.ft_wide))

  def test_fitnet(self):
    self.assert_close(fitnet(self.fs, self.ft), np.mean((np.float64(self.fs) - self.ft) ** 2))

  def test_correlation_congruence(self):
    self.assert_close(correlation_congruence(self.fs, self.ft), cc_reference(self.fs, self.ft))

  def test_kd(self):
    for t in (0.5, 2.0):
      self.assert_close(kd(self.fs, self.ft, t), kd_reference(self.fs, self.ft, t))

  def test_similarity_preserving(self):
    self.assert_close(similarity_preserving(self.fs, self.ft), sp_reference(self.fs, self.ft))
    other = _maps(3, h=2, w=2, c=5)  # teacher of another width and resolution
    self.assert_close(similarity_preserving(self.fs, other), sp_reference(self.fs, other))

  def test_afd(self):
    key = jax.random.key(7)
    self.assert_close(afd(self.fs, self.ft, key), afd_reference(self.fs, self.ft, *se_weights(key, 3)))
    fs, ft = _maps(4, c=16), _maps(5, c=16)
    self.assert_close(afd(fs, ft, key), afd_reference(fs, ft, *se_weights(key, 16)))
    self.assertNotAlmostEqual(float(afd(fs, ft, key)), float(afd(fs, ft, jax.random.key(8))), places=6)

  def test_feature_clone(self):
    hs, ht = self.fs.reshape(4, -1), self.ft.reshape(4, -1)
    self.assert_close(feature_clone(hs, ht), clone_reference(hs, ht))


class HandComputedTest(absltest.TestCase):

  def test_attention_transfer(self):
    f = _maps(0)
    self.assertEqual(float(attention_transfer(f, f)), 0.0)
    self.assertAlmostEqual(float(attention_transfer(3.0 * f, f)), 0.0, places=10)  # positive scale: same map
    self.assertAlmostEqual(float(attention_transfer(f, np.concatenate([f, -f], axis=-1))), 0.0, places=10)
    # One sample, 1×2 map, one channel: â = (1, 0) vs (0, 1) up to eps -> mean of (1, 1) squared differences.
    one = np.array([[[[1.0], [0.0]]]], np.float32)
    self.assertAlmostEqual(float(attention_transfer(one, one[:, :, ::-1])), 1 / (1 + 1e-6) ** 2, places=6)

  def test_attention_transfer_on_two_grids(self):
    # A ResNet stage [B, 8, 8, C] against a ViT block [B, 4, 4, C']: the finer attention map Σ_c F² is averaged
    # over 2x2 blocks, then both are normalised per sample, whichever side (student or teacher) is the finer.
    fine, coarse = _maps(0, h=8, w=8, c=3), _maps(1, c=5)

    def normalized(a):
      return a / (np.sqrt(np.sum(a * a, axis=(1, 2), keepdims=True)) + 1e-6)

    a_fine = np.sum(np.float64(fine) ** 2, axis=-1).reshape(4, 4, 2, 4, 2).mean(axis=(2, 4))
    a_coarse = np.sum(np.float64(coarse) ** 2, axis=-1)
    expected = np.mean((normalized(a_fine) - normalized(a_coarse)) ** 2)
    self.assertAlmostEqual(float(attention_transfer(fine, coarse)), expected, places=6)
    self.assertAlmostEqual(float(attention_transfer(coarse, fine)), expected, places=6)

  def test_match_grids(self):
    # The channel-wise losses see the finer feature map area-pooled: FitNet of [4, 8, 8, 3] against [4, 4, 4, 3].
    fine, coarse = _maps(0, h=8, w=8), _maps(1)
    pooled = np.float64(fine).reshape(4, 4, 2, 4, 2, 3).mean(axis=(2, 4))
    self.assertAlmostEqual(float(fitnet(*match_grids(fine, coarse))), np.mean((pooled - coarse) ** 2), places=6)
    self.assertIs(area_pool(coarse, (4, 4)), coarse)
    self.assertTrue(grids_match(fine.shape, coarse.shape) and grids_match((1, 4, 2), (1, 2, 8)))
    self.assertFalse(grids_match((1, 6, 6), (1, 4, 4)))

  def test_correlation_congruence(self):
    # δ rows (1, 0), (1, 1), (0, 2) at one position: pairs give 1 and 2, mean over B - 1 = 2 -> 1.5.
    delta = np.array([[1.0, 0.0], [1.0, 1.0], [0.0, 2.0]], np.float32).reshape(3, 1, 1, 2)
    zeros = np.zeros_like(delta)
    self.assertAlmostEqual(float(correlation_congruence(zeros, delta)), 1.5, places=6)
    self.assertAlmostEqual(float(correlation_congruence(-delta, zeros)), 1.5, places=6)
    flat = delta.reshape(3, 2)  # [B, D] features work too
    self.assertAlmostEqual(float(correlation_congruence(flat, zeros.reshape(3, 2))), 1.5, places=6)

  def test_kd(self):
    f = _maps(0)
    self.assertAlmostEqual(float(kd(f, f)), 0.0, places=6)
    self.assertAlmostEqual(float(kd(f, f + 5.0)), 0.0, places=6)  # softmax ignores a shift
    # B = 2, one position, uniform student: KL(p ‖ u) = Σ p log p + log C; T = 1; 'batchmean' halves the sum.
    teacher = np.array([[0.0, math.log(3.0)], [0.0, 0.0]], np.float32)
    p = np.array([0.25, 0.75])
    expected = (np.sum(p * np.log(p)) + math.log(2)) / 2
    self.assertAlmostEqual(float(kd(np.zeros_like(teacher), teacher, 1.0)), expected, places=6)

  def test_similarity_preserving(self):
    f = _maps(0)
    self.assertAlmostEqual(float(similarity_preserving(2.0 * f, f)), 0.0, places=6)
    wide = _maps(1, c=5)
    self.assertGreater(float(similarity_preserving(f, wide)), 0.0)
    # Orthogonal student rows (G_s = I) vs identical teacher rows (normalised G_t = all 1/sqrt(B)), B = 2:
    # per row (1 - 1/√2)² + (1/√2)², times 2 rows, over B² = 4.
    student = np.eye(2, dtype=np.float32)
    teacher = np.ones((2, 3), np.float32)
    expected = 2 * ((1 - 2**-0.5) ** 2 + 0.5) / 4
    self.assertAlmostEqual(float(similarity_preserving(student, teacher)), expected, places=6)

  def test_afd(self):
    f = _maps(0, c=8)
    self.assertEqual(float(afd(f, f, jax.random.key(0))), 0.0)
    # Every teacher channel is a spike at (0, 0), every student channel at (1, 1): each channel's mean squared
    # difference is 2 / 4 / (1 + 1e-6)², whatever the (sum-to-1) attention.
    teacher = np.zeros((2, 2, 2, 8), np.float32)
    teacher[:, 0, 0] = 1.0
    student = teacher[:, ::-1, ::-1]
    for seed in range(3):
      self.assertAlmostEqual(float(afd(student, teacher, jax.random.key(seed))), 0.5 / (1 + 1e-6) ** 2, places=6)

  def test_feature_clone(self):
    h = _maps(0).reshape(4, -1)
    self.assertAlmostEqual(float(feature_clone(h, h)), -1.0, places=6)
    self.assertAlmostEqual(float(feature_clone(h, -3.0 * h)), 1.0, places=6)

  def test_shape_errors(self):
    fs, wide = _maps(0), _maps(1, c=5)
    with self.assertRaisesRegex(ValueError, "same C"):
      jax.jit(afd)(fs, wide, jax.random.key(0))
    with self.assertRaisesRegex(ValueError, "grids one dividing the other"):
      attention_transfer(fs, _maps(1, h=3))
    with self.assertRaisesRegex(ValueError, "agree on B"):
      attention_transfer(fs, fs[:2])
    for loss in (fitnet, correlation_congruence, kd):
      with self.assertRaisesRegex(ValueError, "one shape"):
        loss(fs, wide)
    with self.assertRaisesRegex(ValueError, "B >= 2"):
      correlation_congruence(fs[:1], fs[:1])
    with self.assertRaisesRegex(ValueError, "same B"):
      similarity_preserving(fs, fs[:2])


def _all_losses(key):
  """name -> loss(student, teacher), the clone term on flattened maps."""
  return {"attention_transfer": attention_transfer, "fitnet": fitnet, "correlation_congruence": correlation_congruence,
          "kd": kd, "similarity_preserving": similarity_preserving, "afd": functools.partial(afd, key=key),
          "feature_clone": lambda s, t: feature_clone(s.reshape(s.shape[0], -1), t.reshape(t.shape[0], -1))}


class GradientTest(absltest.TestCase):

  def test_only_the_student_gets_gradients(self):
    fs, ft = _maps(0), _maps(1)
    for name, loss in _all_losses(jax.random.key(0)).items():
      g_s, g_t = jax.grad(loss, argnums=(0, 1))(fs, ft)
      self.assertTrue(np.all(np.isfinite(g_s)) and np.abs(g_s).sum() > 0, name)
      self.assertEqual(float(np.abs(g_t).sum()), 0.0, name)

  def test_gradients_finite_with_dead_channels(self):
    fs, ft = _maps(0), _maps(1)
    fs[..., 0] = 0.0  # a dead student channel: its spatial norm in AFD is 0
    fs[0] = 0.0  # an all-zero student sample: its attention map's norm in AT is 0
    for name, loss in _all_losses(jax.random.key(0)).items():
      if name in ("similarity_preserving", "feature_clone"):
        continue  # they row-normalise, and a zero row has no direction (torch's normalize has no gradient there)
      g = jax.grad(loss)(fs, ft)
      self.assertTrue(np.all(np.isfinite(g)), name)


class ShardingTest(absltest.TestCase):

  def test_sharded_equals_unsharded(self):
    fs, ft = _maps(0, b=8), _maps(1, b=8)
    losses = _all_losses(jax.random.key(3))

    @jax.jit
    def everything(fs, ft):
      return {name: jax.value_and_grad(loss)(fs, ft) for name, loss in losses.items()}

    expected = everything(fs, ft)
    mesh = jax.make_mesh((8,), ("data",))
    rows = jax.NamedSharding(mesh, jax.P("data"))
    with jax.set_mesh(mesh):
      results = everything(jax.device_put(fs, rows), jax.device_put(ft, rows))
    for name in losses:
      self.assertEqual(results[name][1].sharding.spec[0], "data", name)
      for got, want in zip(results[name], expected[name]):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7, err_msg=name)


if __name__ == "__main__":
  absltest.main()
