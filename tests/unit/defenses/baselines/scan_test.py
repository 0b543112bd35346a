"""SCAn: the global EM against the model it fits and a per-sample re-derivation, the untangling against scikit-learn's
2-means, the statistic J against its per-sample formula and on one- vs two-Gaussian classes, and `suspects` on
synthetic features with and without a planted sub-population."""

import ml_collections
import numpy as np
import pytest
from sklearn.cluster import KMeans

from jaxpurify.defenses.baselines import scan
from jaxpurify.defenses.baselines.inputs import Inputs
from jaxpurify.errors import UserError

BLOCK = ml_collections.ConfigDict(dict(threshold=np.e, em_iters=100))


def _relative(actual, desired):
  return np.linalg.norm(actual - desired) / np.linalg.norm(desired)


def _draw(rng, num_classes, per_class, between, within):
  """Features drawn from SCAn's model: class identities ~ N(0, between), residuals ~ N(0, within)."""
  dim = len(between)
  identities = rng.multivariate_normal(np.zeros(dim), between, num_classes)
  labels = np.repeat(np.arange(num_classes), per_class)
  return identities, labels, identities[labels] + rng.multivariate_normal(np.zeros(dim), within, len(labels))


def test_global_model_recovers_the_covariances_it_was_drawn_from():
  rng = np.random.default_rng(0)
  a, b = rng.normal(size=(3, 3)), 0.5 * rng.normal(size=(3, 3))
  between, within = a @ a.T + np.eye(3), b @ b.T + 0.5 * np.eye(3)
  num_classes, per_class = 300, 40
  identities, labels, x = _draw(rng, num_classes, per_class, between, within)
  model = scan.global_model(x, labels, num_classes, 100)
  n = len(labels)
  # S_e from 12000 residuals: relative error of a sample covariance ~ sqrt(2 / n) = 0.013
  assert _relative(model.within, within) < 5 * np.sqrt(2 / n)
  # S_u against the covariance of the identities actually drawn: off by the shrinkage and the noise of the class
  # means, both O(|S_e| / per_class) = 0.016 relative
  drawn = np.cov(identities[labels].T)
  assert _relative(model.between, drawn) < 3 * np.linalg.norm(within) / per_class / np.linalg.norm(between)
  # ... and against the true S_u, up to the sampling error of 300 identities ~ sqrt(2 / 300) = 0.08
  assert _relative(model.between, between) < 3 * np.sqrt(2 / num_classes)
  np.testing.assert_allclose(model.mean, x.mean(0))


def _reference_em(x, labels, num_classes, iters):
  """The joint-Bayesian EM written per sample in the toolbox's form: G_k = -(n_k S_u + S_e)^-1 S_u S_e^-1,
  mu_k = -sum_i S_e G_k x_i (the same posterior mean as S_u (n_k S_u + S_e)^-1 sum_i x_i for an invertible S_e)."""
  x = x - x.mean(0)
  means = np.array([x[labels == k].mean(0) for k in range(num_classes)])
  su, se = np.cov(means[labels].T), np.cov((x - means[labels]).T)
  for _ in range(iters):
    f = np.linalg.inv(se)
    g = [-np.linalg.inv(np.sum(labels == k) * su + se) @ su @ f for k in range(num_classes)]
    mu = np.zeros_like(means)
    for xi, k in zip(x, labels):
      mu[k] -= se @ g[k] @ xi
    su, se = np.cov(mu[labels].T), np.cov((x - mu[labels]).T)
  return su, se


def test_global_model_matches_the_per_sample_em_of_the_toolbox():
  rng = np.random.default_rng(1)
  _, labels, x = _draw(rng, 6, 15, 4 * np.eye(4), np.diag([1.0, 0.5, 2.0, 1.0]))
  model = scan.global_model(x, labels, 6, 3)
  su, se = _reference_em(x, labels, 6, 3)
  np.testing.assert_allclose(model.between, su, rtol=1e-8, atol=1e-10)
  np.testing.assert_allclose(model.within, se, rtol=1e-8, atol=1e-10)


def test_global_model_keeps_the_between_class_covariance_when_the_within_class_one_is_singular():
  # 4 classes x 8 samples in 40 dims: S_e has rank 28; the toolbox's form of the E-step sends S_u to 0 here
  rng = np.random.default_rng(7)
  _, labels, x = _draw(rng, 4, 8, 9 * np.eye(40), np.eye(40))
  model = scan.global_model(x, labels, 4, 100)
  class_means = np.array([x[labels == k].mean(0) for k in range(4)])[labels]
  assert np.linalg.matrix_rank(model.within) < 40
  assert _relative(model.between, np.cov(class_means.T)) < 0.05


def test_untangle_is_two_means_in_the_whitened_space():
  rng = np.random.default_rng(2)
  within = np.diag([4.0, 0.25, 1.0])
  x = np.concatenate([rng.multivariate_normal(np.zeros(3), within, 150),
                      rng.multivariate_normal([0.0, 2.0, 0.0], within, 50)])
  metric = np.linalg.inv(within)
  groups = scan.untangle(x, metric, 100)
  kmeans = KMeans(2, n_init=10, random_state=0).fit(x @ np.sqrt(metric)).labels_ == 1
  assert np.array_equal(groups, kmeans) or np.array_equal(groups, ~kmeans)
  assert (groups[:150] != groups[0]).sum() + (groups[150:] == groups[0]).sum() < 10  # the planted split


def _per_sample_j(x, groups, model):
  """J = (1/n) sum_i [d(x_i, mu)^2 - d(x_i, m_g(i))^2] in the metric S_e^-1, mu the posterior identity."""
  f = np.linalg.inv(model.within)
  mu = model.between @ np.linalg.inv(len(x) * model.between + model.within) @ x.sum(0)
  total = 0.0
  for xi, g in zip(x, groups):
    m = x[groups == g].mean(0)
    total += (xi - mu) @ f @ (xi - mu) - (xi - m) @ f @ (xi - m)
  return total / len(x)


def test_llr_statistic_matches_its_per_sample_formula():
  rng = np.random.default_rng(3)
  x = rng.normal(size=(40, 3))
  groups = x[:, 0] > 0.3
  within = np.array([[1.0, 0.2, 0], [0.2, 1.0, 0], [0, 0, 0.5]])
  model = scan.GlobalModel(np.zeros(3), np.diag([2.0, 1.0, 0.5]), within, np.linalg.inv(within))
  assert scan.llr_statistic(x, groups, model) == pytest.approx(_per_sample_j(x, groups, model), rel=1e-10)


def test_j_is_larger_for_a_two_gaussian_class_than_a_one_gaussian_class():
  rng = np.random.default_rng(4)
  model = scan.GlobalModel(np.zeros(8), 4 * np.eye(8), np.eye(8), np.eye(8))
  one = rng.normal(size=(300, 8))
  two = np.concatenate([rng.normal(size=(270, 8)), rng.normal(size=(30, 8)) + 8 * np.eye(8)[0]])
  stats = [scan.llr_statistic(x, scan.untangle(x, np.eye(8), 100), model) for x in (one, two)]
  assert stats[1] > 3 * stats[0] > 0


def test_anomaly_index_is_one_sided_median_mad():
  stats = np.array([1.0, 1.1, 0.9, 1.0, 5.0, 0.0])
  index = scan.anomaly_index(stats)
  mad = 1.4826 * np.median(np.abs(stats - 1.0))
  np.testing.assert_allclose(index, (stats - 1.0) / mad)
  assert index[4] > np.e and index[5] < -np.e  # only the high side is flagged
  np.testing.assert_array_equal(scan.anomaly_index(np.ones(4)), np.zeros(4))


def _inputs(rng, plant: int):
  """10 classes of 16-d features from SCAn's model (200 victim, 30 reserve each); `plant` extra victim samples
  labelled 3 sit in a far cluster (a trigger's feature) -> (Inputs, their indices)."""
  num_classes, dim = 10, 16
  identities = rng.normal(scale=2.0, size=(num_classes, dim))
  labels, reserve_labels = np.repeat(np.arange(num_classes), 200), np.repeat(np.arange(num_classes), 30)
  features = identities[labels] + rng.normal(size=(len(labels), dim))
  reserve = identities[reserve_labels] + rng.normal(size=(len(reserve_labels), dim))
  direction = rng.normal(size=dim)
  planted = identities[3] + 8.0 * direction / np.linalg.norm(direction) + rng.normal(size=(plant, dim))
  features, labels = np.concatenate([features, planted]), np.concatenate([labels, np.full(plant, 3)])
  order = rng.permutation(len(labels))
  images = np.zeros((len(labels), 1, 1, 3), np.uint8)
  inputs = Inputs(None, None, "ft_all", None, images, labels[order], num_classes, np.zeros((len(reserve), 1, 1, 3),
                  np.uint8), reserve_labels, None, features[order].astype(np.float32), reserve.astype(np.float32),
                  None, None)
  return inputs, np.sort(np.flatnonzero(order >= len(order) - plant))


def test_suspects_removes_a_planted_sub_population_and_nothing_from_clean_data():
  inputs, planted = _inputs(np.random.default_rng(5), plant=40)
  removed = scan.suspects(inputs, BLOCK, None)
  assert removed.dtype == np.int64 and np.all(np.diff(removed) > 0)
  assert np.array_equal(removed, planted)
  # the index is scale-free, so on clean data its false alarms do not shrink with the sample size: at threshold e
  # some clean class is flagged in about a quarter of such draws (15 of 60 seeds), as SCAn's own false-positive rate
  clean, _ = _inputs(np.random.default_rng(7), plant=0)
  assert len(scan.suspects(clean, BLOCK, None)) == 0


def test_poisoned_side_is_the_one_with_fewer_reserve_members():
  groups = np.array([True, True, True, False, False, False])
  np.testing.assert_array_equal(scan.poisoned_side(groups, np.array([0, 0, 1, 1, 1, 0], bool)), groups)
  tie = np.array([True, False, False, False, False, False])
  np.testing.assert_array_equal(scan.poisoned_side(tie, np.zeros(6, bool)), tie)


def test_check_rejects_settings_that_cannot_run():
  scan.check(BLOCK, None, np.full(10, 100), np.full(10, 10))
  with pytest.raises(UserError, match="at least 3 classes"):
    scan.check(BLOCK, None, np.full(2, 100), np.full(2, 10))
  with pytest.raises(UserError, match="em_iters"):
    scan.check(ml_collections.ConfigDict(dict(threshold=np.e, em_iters=0)), None, np.full(10, 100), np.full(10, 10))
