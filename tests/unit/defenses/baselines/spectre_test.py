"""SPECTRE: QUE scores against SciPy's matrix exponential, the robust estimate on contaminated Gaussians, the
filter on a planted sub-population (against SS where whitening matters) and the config check."""

import numpy as np
import pytest
import scipy.linalg
import scipy.stats

from helpers import config, feature_inputs
from jaxpurify.defenses.baselines import spectre, ss
from jaxpurify.errors import UserError


def planted_classes(seed: int, shift: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Two classes of 1000 anisotropic Gaussians in 16 dimensions (scales 3 to 0.5); class 0's last 100 shifted by
  `shift` along axis 6 (scale 2, not the top variance direction) -> (features, labels, the planted indices)."""
  rng = np.random.default_rng(seed)
  features = (rng.normal(size=(2000, 16)) * np.linspace(3, 0.5, 16)).astype(np.float32)
  planted = np.arange(900, 1000)
  features[planted, 6] += shift
  return features, np.repeat([0, 1], 1000), planted


def test_que_scores_match_scipy_expm():
  rng = np.random.default_rng(0)
  y = rng.normal(size=(300, 5)) * np.array([1.6, 1.1, 1.0, 0.9, 0.8])
  alpha = 4.0
  sigma = y.T @ y / len(y)
  q = scipy.linalg.expm(alpha * (sigma - np.eye(5)) / (np.linalg.norm(sigma, 2) - 1))
  expected = np.einsum("ni,ij,nj->n", y, q, y) / np.trace(q)
  np.testing.assert_allclose(spectre.que_scores(y, alpha), expected, rtol=1e-9)


def test_que_scores_without_excess_variance_project_on_the_top_direction():
  rng = np.random.default_rng(1)
  y = rng.normal(size=(200, 3))
  y = y @ np.linalg.inv(np.linalg.cholesky(y.T @ y / len(y))).T * np.array([0.8, 0.6, 0.5])  # Sigma = diag < I
  np.testing.assert_allclose(spectre.que_scores(y, 4.0), y[:, 0] ** 2, rtol=1e-6)


@pytest.mark.parametrize("k", [2, 5, 10, 32])
def test_chi2_median_is_close_to_scipy(k):
  np.testing.assert_allclose(spectre.chi2_median(k), scipy.stats.chi2.median(k), rtol=0.015)


def test_robust_estimate_ignores_a_contaminating_cluster():
  rng = np.random.default_rng(2)
  cov = np.array([[4.0, 1.0, 0.0, 0.0], [1.0, 2.0, 0.5, 0.0], [0.0, 0.5, 1.0, 0.0], [0.0, 0.0, 0.0, 0.5]])
  clean = rng.multivariate_normal(np.zeros(4), cov, size=1000)
  outliers = rng.normal(size=(100, 4)) * 0.3 + np.array([0.0, 0.0, 6.0, 0.0])
  mean, estimate = spectre.robust_estimate(np.concatenate([clean, outliers]), trim=133)
  assert np.linalg.norm(mean) < 0.15
  np.testing.assert_allclose(estimate, cov, rtol=0.25, atol=0.15)  # the median correction leans ~10% high here
  distances = (spectre.whiten(outliers, mean, estimate) ** 2).sum(axis=1)
  assert distances.min() > scipy.stats.chi2.ppf(0.999, 4)
  _, plain = spectre.moments(np.concatenate([clean, outliers]))
  assert plain[2, 2] > 3 * cov[2, 2]


def test_robust_estimate_is_consistent_on_clean_gaussians():
  rng = np.random.default_rng(3)
  cov = np.diag([3.0, 2.0, 1.0, 0.5])
  _, estimate = spectre.robust_estimate(rng.multivariate_normal(np.zeros(4), cov, size=2000), trim=300)
  np.testing.assert_allclose(np.diag(estimate), np.diag(cov), rtol=0.1)


def test_suspects_remove_a_planted_subpopulation():
  features, labels, planted = planted_classes(0, shift=8.0)
  features = np.concatenate([features, np.ones((2, 16), np.float32)])  # class 2: 2 members, not scored
  labels = np.concatenate([labels, [2, 2]])
  inputs = feature_inputs(features, labels, 3)
  block = inputs.config.baseline.spectre
  block.max_dims = 8
  removed = spectre.suspects(inputs, block, run=None)
  assert removed.dtype == np.int64 and np.all(np.diff(removed) > 0)
  assert np.isin(planted, removed).sum() >= 95
  assert np.bincount(labels[removed], minlength=3).tolist() == [150, 150, 0]


def test_whitening_finds_a_subpopulation_off_the_top_variance_direction():
  features, labels, planted = planted_classes(0, shift=6.0)
  taus, dims = spectre.scores(features, labels, 2, alpha=4.0, max_dims=8, fraction=0.15)
  assert np.all(dims >= 2)
  found = np.isin(planted, np.argsort(-taus[:1000])[:150]).sum()
  by_ss = np.isin(planted, np.argsort(-ss.scores(features, labels, 2)[:1000])[:150]).sum()
  assert found >= 70 and by_ss <= 40


def test_check_rejects_bad_settings():
  block = config("baseline:defense=spectre,threat=2,attack=badnets,tiny").baseline.spectre
  spectre.check(block, None, np.full(10, 100), np.full(10, 10))
  for field, value in [("remove_fraction", 0.8), ("que_alpha", 0.0), ("max_dims", 1)]:
    bad = block.copy_and_resolve_references()
    bad[field] = value
    with pytest.raises(UserError, match=f"config.baseline.spectre.{field}"):
      spectre.check(bad, None, np.full(10, 100), np.full(10, 10))
