"""BadEncoder / DRUPE loss terms, DRUPE's schedule and adaptive costs against independent references.

References: float64 NumPy transcriptions of the official code (per-reference lists of batches, the literal
`diag_embed` broadcast, POT's quantile-function 1-D Wasserstein), hand-computed one-hot cases, and a plain-Python
transcription of DRUPE's global-variable cost rule (main.py lines 262-317).
"""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import absltest

from jaxpurify.losses import (badencoder_loss, badencoder_terms, drupe_loss, drupe_terms, init_drupe_costs,
                              random_projections, sliced_wasserstein, update_drupe_costs)


def _normalize(x):
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


def pot_sliced_wasserstein(xs, xt, projections):
  """POT 0.8.2 `sliced_wasserstein_distance(p=2, projections=...)` with `wasserstein_1d` via quantile functions."""
  u, v = np.sort(xs @ projections, axis=0), np.sort(xt @ projections, axis=0)
  u_cw = np.cumsum(np.full(u.shape, 1 / len(u)), axis=0)
  v_cw = np.cumsum(np.full(v.shape, 1 / len(v)), axis=0)
  qs = np.sort(np.concatenate([u_cw, v_cw]), axis=0)

  def quantile(cws, values):
    idx = np.stack([np.searchsorted(cws[:, k], qs[:, k]) for k in range(qs.shape[1])], axis=1)
    return np.take_along_axis(values, np.clip(idx, 0, len(values) - 1), axis=0)

  delta = np.diff(np.concatenate([np.zeros((1, qs.shape[1])), qs]), axis=0)
  emd = np.sum(delta * np.abs(quantile(u_cw, u) - quantile(v_cw, v)) ** 2, axis=0)
  return (np.sum(emd) / projections.shape[1]) ** 0.5


def official_terms(projections, f_triggered, f_shadow, c_shadow, f_ref, f_ref_aug, c_ref):
  """DRUPE main.py lines 77-200 (and BadEncoder's L0) with every reference repeated over the batch, float64."""
  f_triggered, f_shadow, c_shadow, f_ref, f_ref_aug, c_ref = (
      np.asarray(x, np.float64) for x in (f_triggered, f_shadow, c_shadow, f_ref, f_ref_aug, c_ref))
  b = len(f_triggered)
  feature_raw, clean_feature_raw, feature_backdoor = _normalize(f_shadow), _normalize(c_shadow), _normalize(f_triggered)
  reference_list = [np.repeat(_normalize(r)[None], b, axis=0) for r in f_ref]
  clean_reference_list = [np.repeat(_normalize(r)[None], b, axis=0) for r in c_ref]
  loss_0_list, loss_0_list_cal, loss_1_list = [], [], []
  for i, feature_reference in enumerate(reference_list):
    loss_0_list.append(np.sum(feature_backdoor * feature_reference, axis=-1)[None])
    loss_0_list_cal.append(np.sum(feature_backdoor * feature_reference, axis=-1).mean())
    loss_1_list.append(-np.sum(_normalize(f_ref_aug[i]) * clean_reference_list[i], axis=-1).mean())
  loss_0_tensor = np.concatenate(loss_0_list, axis=0)
  sim_matrix = feature_backdoor @ feature_backdoor.T
  diag_embed = np.einsum("ij,jk->ijk", sim_matrix, np.eye(b))  # torch.diag_embed of a [B, B] matrix
  off_diagonal = ~np.eye(b, dtype=bool)
  loss_3_list = [np.sum(reference_list[i] * reference_list[j], axis=-1).mean()
                 for i in range(len(reference_list)) for j in range(i, len(reference_list))]
  swd = pot_sliced_wasserstein(f_triggered, f_shadow, projections)
  dev = f_shadow.std(axis=0, ddof=1).mean()
  return {"l0": -loss_0_tensor.max(axis=0).mean(), "l0_mean": -sum(loss_0_list_cal) / len(loss_0_list_cal),
          "l1": sum(loss_1_list) / len(loss_1_list), "l2": -np.sum(feature_raw * clean_feature_raw, axis=-1).mean(),
          "std_refs": loss_0_tensor.mean(-1).std(ddof=1), "l3": sum(loss_3_list) / len(loss_3_list),
          "sim_b2b": (sim_matrix - diag_embed).mean(), "sim_b2b_offdiag": sim_matrix[off_diagonal].mean(),
          "swd": swd, "dev": dev, "l_b2c": swd / dev}


class OfficialCosts:
  """DRUPE's cost globals (main.py lines 465-476) and end-of-epoch rule (lines 262-317), CIFAR path, verbatim."""

  def __init__(self, cost=0.1, cost_1=0.001, init_cost=None, init_cost_1=None, patience=1):
    self.patience, self.cost_multiplier_up, self.cost_multiplier_down = patience, 1.25, 1.25 ** 1.25
    self.cost, self.cost_1 = cost, cost_1
    self.init_cost = cost if init_cost is None else init_cost
    self.init_cost_1 = cost_1 if init_cost_1 is None else init_cost_1
    self.cost_up_counter = self.cost_down_counter = self.cost_up_counter_1 = self.cost_down_counter_1 = 0

  def end_of_epoch(self, epoch, loss_0, loss_1, loss_2, sim_backdoor2backdoor):
    warm_up, l0_threshold, fix_epoch, b2b_sim_threshold = epoch < 2, -0.96, 20, 0.6
    if not warm_up and epoch > fix_epoch:
      if loss_0 < l0_threshold and loss_1 < -0.9 and loss_2 < -0.9:
        self.cost_up_counter += 1
        self.cost_down_counter = 0
      else:
        self.cost_up_counter = 0
        self.cost_down_counter += 1
      if self.cost_up_counter >= self.patience:
        self.cost_up_counter = 0
        if self.cost == 0:
          self.cost = self.init_cost
        else:
          self.cost *= self.cost_multiplier_up
      elif self.cost_down_counter >= self.patience:
        self.cost_down_counter = 0
        self.cost /= self.cost_multiplier_down
      if loss_0 < l0_threshold and loss_1 < -0.9 and loss_2 < -0.9 and sim_backdoor2backdoor < b2b_sim_threshold:
        self.cost_up_counter_1 += 1
        self.cost_down_counter_1 = 0
        if sim_backdoor2backdoor < (b2b_sim_threshold - 0.1):
          self.cost_up_counter -= 1
      else:
        self.cost_up_counter_1 = 0
        self.cost_down_counter_1 += 1
      if self.cost_up_counter_1 >= self.patience:
        self.cost_up_counter_1 = 0
        if self.cost_1 == 0:
          self.cost_1 = self.init_cost_1
        else:
          self.cost_1 *= self.cost_multiplier_up
      elif self.cost_down_counter_1 >= self.patience:
        self.cost_down_counter_1 = 0
        self.cost_1 /= self.cost_multiplier_down


_swd = jax.jit(sliced_wasserstein, static_argnames="num_projections")
_LOSS_OPTIONS = ("lambda1", "lambda2", "warm_up_epoch", "stage_1_epoch", "l3_ceiling")
_drupe_loss = jax.jit(drupe_loss, static_argnames=_LOSS_OPTIONS)


def _random_features(seed, batch=16, num_refs=3, dim=8):
  rng = np.random.default_rng(seed)
  shapes = [(batch, dim), (batch, dim), (batch, dim), (num_refs, dim), (num_refs, batch, dim), (num_refs, dim)]
  return [rng.normal(size=s).astype(np.float32) for s in shapes]


class TermsTest(absltest.TestCase):

  def test_badencoder_terms_match_official(self):
    features = _random_features(0)
    terms = jax.jit(badencoder_terms)(*features)
    expected = official_terms(np.eye(8), *features)
    for name, official in (("l0", "l0_mean"), ("l1", "l1"), ("l2", "l2")):
      np.testing.assert_allclose(terms[name], expected[official], rtol=1e-5, atol=1e-6, err_msg=name)
    np.testing.assert_allclose(badencoder_loss(terms, 2.0, 0.5),
                               expected["l0_mean"] + 2.0 * expected["l1"] + 0.5 * expected["l2"], rtol=1e-5)

  def test_drupe_terms_match_official(self):
    features = _random_features(1)
    key = jax.random.key(7)
    terms = jax.jit(drupe_terms)(key, *features)
    offdiag = jax.jit(functools.partial(drupe_terms, sim_b2b_offdiag=True))(key, *features)
    expected = official_terms(np.asarray(random_projections(key, 8, 50), np.float64), *features)
    for name, value in terms.items():
      np.testing.assert_allclose(value, expected[name], rtol=1e-5, atol=1e-6, err_msg=name)
    np.testing.assert_allclose(offdiag["sim_b2b"], expected["sim_b2b_offdiag"], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(expected["sim_b2b"], (1 - 1 / 16) * (15 / 16 * expected["sim_b2b_offdiag"] + 1 / 16))

  def test_one_hot_features(self):
    e = np.eye(4, dtype=np.float32)
    f_triggered = np.stack([2 * e[0], 3 * (e[0] + e[1])])  # ẑ: e0, (e0 + e1) / √2
    f_ref = np.stack([5 * e[0], 0.5 * e[1]])  # S = [[1, 1/√2], [0, 1/√2]]
    f_shadow, c_shadow = np.stack([3 * e[2], 3 * e[3]]), np.stack([2 * e[2], 2 * e[2]])
    f_ref_aug, c_ref = np.stack([np.stack([e[0], e[1]]), np.stack([e[3], e[3]])]), np.stack([e[0], e[3]])
    features = (f_triggered, f_shadow, c_shadow, f_ref, f_ref_aug, c_ref)
    terms = jax.jit(drupe_terms)(jax.random.key(0), *features)
    s = 1 / math.sqrt(2)
    expected = {"l0": -(1 + s) / 2, "l0_mean": -(1 + 2 * s) / 4, "l1": -(0.5 + 1) / 2, "l2": -0.5,
                "std_refs": 0.5 * s, "l3": 2 / 3, "sim_b2b": (2 + 2 * s) / 4 / 2, "dev": 3 * s / 2}
    for name, value in expected.items():
      np.testing.assert_allclose(terms[name], value, rtol=1e-6, atol=1e-7, err_msg=name)
    np.testing.assert_allclose(terms["l_b2c"], terms["swd"] / terms["dev"], rtol=1e-6)
    offdiag = jax.jit(functools.partial(drupe_terms, sim_b2b_offdiag=True))(jax.random.key(0), *features)
    np.testing.assert_allclose(offdiag["sim_b2b"], s, rtol=1e-6)
    bad = jax.jit(badencoder_terms)(*features)
    np.testing.assert_allclose([bad["l0"], bad["l1"], bad["l2"]], [-(1 + 2 * s) / 4, -0.75, -0.5], rtol=1e-6)

  def test_single_reference(self):
    features = _random_features(2, num_refs=1)
    terms = jax.jit(drupe_terms)(jax.random.key(0), *features)
    self.assertEqual(float(terms["std_refs"]), 0.0)  # torch's unbiased std of one value is NaN
    np.testing.assert_allclose(terms["l3"], 1.0, rtol=1e-6)
    np.testing.assert_allclose(terms["l0"], terms["l0_mean"], rtol=1e-6)

  def test_gradients_finite_with_dead_feature_and_zero_distance(self):
    f_triggered, f_shadow, c_shadow, f_ref, f_ref_aug, c_ref = _random_features(3)
    f_shadow[:, 0] = 0.0  # a dead unit: its std over the batch is 0, where jnp.std's gradient is NaN

    def loss(f_triggered, f_shadow, epoch):
      terms = drupe_terms(jax.random.key(0), f_triggered, f_shadow, c_shadow, f_ref, f_ref_aug, c_ref)
      return drupe_loss(terms, epoch, 0.1, 0.001)

    grad = jax.jit(jax.grad(loss, argnums=(0, 1)))
    for epoch in (1, 3, 10):
      for g in grad(f_triggered, f_shadow, epoch) + grad(f_shadow, f_shadow, epoch):  # second: swd = 0
        self.assertTrue(np.all(np.isfinite(g)), epoch)


class SlicedWassersteinTest(absltest.TestCase):

  def test_one_dimension_is_exact_1d_w2(self):
    a, b = np.array([[3.0], [1.0], [2.0]]), np.array([[0.0], [5.0], [10.0]])
    for seed in range(3):  # every unit projection in 1-D is ±1
      np.testing.assert_allclose(_swd(jax.random.key(seed), a, b), math.sqrt(59 / 3), rtol=1e-6)

  def test_identical_sets_and_permutations(self):
    a = np.random.default_rng(0).normal(size=(32, 6)).astype(np.float32)
    key = jax.random.key(1)
    self.assertEqual(float(_swd(key, a, a)), 0.0)
    self.assertLess(float(_swd(key, a, a[::-1])), 1e-6)
    self.assertTrue(np.all(np.isfinite(jax.jit(jax.grad(sliced_wasserstein, argnums=1))(key, a, a))))

  def test_shift_is_projected_shift(self):
    # Every projection keeps the order of a + t, so W2²(θ) = <θ, t>² and SWD = sqrt(mean_θ <θ, t>²) ≈ |t| / √D.
    a = np.random.default_rng(1).normal(size=(64, 4)).astype(np.float32)
    t = np.array([1.0, -2.0, 0.5, 3.0], np.float32)
    key, num = jax.random.key(2), 20000
    swd = _swd(key, a, a + t, num_projections=num)
    np.testing.assert_allclose(swd, np.sqrt(np.mean((t @ np.asarray(random_projections(key, 4, num))) ** 2)),
                               rtol=1e-5)
    np.testing.assert_allclose(swd, np.linalg.norm(t) / 2, rtol=0.03)

  def test_matches_pot_transcription(self):
    rng = np.random.default_rng(2)
    a, b = 3 * rng.normal(size=(40, 10)), rng.normal(size=(40, 10)) + 1
    key = jax.random.key(3)
    projections = np.asarray(random_projections(key, 10, 50), np.float64)
    np.testing.assert_allclose(np.linalg.norm(projections, axis=0), 1.0, rtol=1e-6)
    np.testing.assert_allclose(_swd(key, a, b), pot_sliced_wasserstein(a, b, projections), rtol=1e-5)


class ScheduleTest(absltest.TestCase):

  TERMS = {"l0": -0.9, "l1": -0.8, "l2": -0.7, "l3": 0.45, "std_refs": 0.2, "sim_b2b": 0.3, "l_b2c": 2.0}

  def loss(self, epoch, **overrides):
    options = {k: overrides.pop(k) for k in _LOSS_OPTIONS if k in overrides}
    terms = {k: jnp.float32(v) for k, v in dict(self.TERMS, **overrides).items()}
    return float(_drupe_loss(terms, jnp.int32(epoch), jnp.float32(0.1), jnp.float32(0.001), **options))

  def test_phases(self):
    # epoch 1: L1 + L2 + 0.5 L3; 2-4: L0 + L1 + L2 + 2 std + 0.2 L3 (0.4 < L3 <= 0.5);
    # 5+: L0 + L1 + L2 + 0.1 (std + sim) + 0.001 l_b2c + 0.5 std + 1.5 std (std > 0.1) + 0.2 L3.
    warm, stage_1, stage_2 = -1.275, -1.91, -2.4 + 0.05 + 0.002 + 0.1 + 0.3 + 0.09
    for epoch, expected in ((1, warm), (2, stage_1), (3, stage_1), (4, stage_1), (5, stage_2), (10, stage_2),
                            (120, stage_2)):
      self.assertAlmostEqual(self.loss(epoch), expected, places=5, msg=epoch)

  def test_thresholds_and_lambdas(self):
    self.assertAlmostEqual(self.loss(1, l3=0.1), -1.5 + 0.05 - 0.02, places=5)  # L3 < 0.2: -0.2 L3
    self.assertAlmostEqual(self.loss(1, l3=0.6), -1.5 + 0.3, places=5)
    self.assertAlmostEqual(self.loss(3, l3=0.6), -2.4 + 0.4 + 0.6, places=5)  # L3 > 0.5: + L3
    self.assertAlmostEqual(self.loss(3, l3=0.3), -2.4 + 0.4, places=5)
    self.assertAlmostEqual(self.loss(10, l3=0.3, std_refs=0.05), -2.4 + 0.035 + 0.002 + 0.025, places=5)
    self.assertAlmostEqual(self.loss(1, l3=0.1, lambda1=2.0, lambda2=0.5), -1.95 + 0.05 - 0.02, places=5)
    self.assertAlmostEqual(self.loss(10, l3=0.1, std_refs=0.05, lambda1=2.0, lambda2=0.5),
                           -0.9 - 1.95 + 0.035 + 0.002 + 0.025, places=5)

  def test_reference_similarity_ceiling_is_an_option(self):
    # Ceiling 0.9: L3 0.85 lies in its soft band (+ 0.2 L3), 0.95 above it (+ L3), 0.6 below both (+ 0).
    self.assertAlmostEqual(self.loss(3, l3=0.85, l3_ceiling=0.9), -2.4 + 0.4 + 0.17, places=5)
    self.assertAlmostEqual(self.loss(3, l3=0.95, l3_ceiling=0.9), -2.4 + 0.4 + 0.95, places=5)
    self.assertAlmostEqual(self.loss(3, l3=0.6, l3_ceiling=0.9), -2.4 + 0.4, places=5)

  def test_phase_boundaries_are_options(self):
    stage_1, stage_2 = -1.91, -2.4 + 0.05 + 0.002 + 0.1 + 0.3 + 0.09
    self.assertAlmostEqual(self.loss(2, warm_up_epoch=2, stage_1_epoch=3), stage_1, places=5)  # ImageNet
    self.assertAlmostEqual(self.loss(3, warm_up_epoch=2, stage_1_epoch=3), stage_2, places=5)
    self.assertAlmostEqual(self.loss(1, warm_up_epoch=1), stage_1, places=5)  # CLIP: no warm-up


class CostsTest(absltest.TestCase):

  # (l0, l1, l2, sim_b2b): ok, ok with sim < 0.5 (delays cost's next rise), ok with sim >= 0.6, and three failures.
  OK, OK_LOW_SIM, OK_HIGH_SIM = (-0.98, -0.95, -0.95, 0.55), (-0.98, -0.95, -0.95, 0.3), (-0.98, -0.95, -0.95, 0.7)
  BAD_L0, BAD_L1, BAD_L2 = (-0.5, -0.95, -0.95, 0.3), (-0.98, -0.5, -0.95, 0.3), (-0.98, -0.95, -0.8, 0.3)
  SCRIPT = ([OK] * 20 + [OK, OK, BAD_L0, OK_HIGH_SIM, OK_LOW_SIM, OK_LOW_SIM, OK, OK, BAD_L1, BAD_L2, OK_LOW_SIM,
                         BAD_L0, BAD_L0, OK_LOW_SIM, OK_HIGH_SIM, OK_HIGH_SIM, OK])

  def run_script(self, patience=1, **init):
    official = OfficialCosts(patience=patience, **init)
    costs = init_drupe_costs(**init)
    update = jax.jit(functools.partial(update_drupe_costs, patience=patience))
    trace = []
    for epoch, (l0, l1, l2, sim) in enumerate(self.SCRIPT, start=1):
      means = {k: jnp.float32(v) for k, v in zip(("l0", "l1", "l2", "sim_b2b"), (l0, l1, l2, sim))}
      costs = update(costs, means, jnp.int32(epoch))
      official.end_of_epoch(epoch, l0, l1, l2, sim)
      for name, value in costs.items():
        np.testing.assert_allclose(value, getattr(official, name), rtol=1e-5, err_msg=f"{name} at epoch {epoch}")
      trace.append(float(costs["cost"]))
    return trace

  def test_follows_official_rule(self):
    trace = self.run_script()
    np.testing.assert_allclose(trace[:20], 0.1, rtol=1e-7)  # no update up to epoch 20
    np.testing.assert_allclose(trace[20:24], [0.125, 0.15625, 0.15625 / 1.25**1.25, 0.15625 / 1.25**0.25],
                               rtol=1e-6)
    self.assertEqual(trace[25], trace[24])  # the low-sim epoch 25 cancelled epoch 26's rise

  def test_patience_and_restart_from_zero(self):
    self.run_script(patience=2)
    trace = self.run_script(cost=0.0, cost_1=0.0, init_cost=0.01, init_cost_1=0.0001)
    np.testing.assert_allclose(trace[19:21], [0.0, 0.01], rtol=1e-7)


class ShardingTest(absltest.TestCase):

  def test_sharded_equals_unsharded(self):
    features = _random_features(4)
    key = jax.random.key(5)

    def loss(f_triggered, f_shadow, *rest):
      return drupe_loss(drupe_terms(key, f_triggered, f_shadow, *rest), 10, 0.1, 0.001)

    @jax.jit
    def everything(*features):
      return drupe_terms(key, *features), badencoder_terms(*features), jax.grad(loss, argnums=(0, 1))(*features)

    expected = everything(*features)
    mesh = jax.make_mesh((8,), ("data",))
    rows, columns = jax.NamedSharding(mesh, jax.P("data")), jax.NamedSharding(mesh, jax.P(None, "data"))
    shardings = (rows, rows, rows, None, columns, None)
    with jax.set_mesh(mesh):
      sharded = [jax.device_put(x, s) if s else x for x, s in zip(features, shardings)]
      results = everything(*sharded)
    self.assertEqual(results[2][0].sharding.spec, jax.P("data", None))
    for got, want in zip(jax.tree.leaves(results), jax.tree.leaves(expected)):
      np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)


if __name__ == "__main__":
  absltest.main()
