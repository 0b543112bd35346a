"""AC: the PCA projection and the 2-means split against scikit-learn, the smaller-cluster rule, the filter on a
planted cluster and the config check."""

import numpy as np
import pytest
from sklearn.cluster import KMeans
from sklearn.decomposition import PCA

from helpers import config, feature_inputs
from jaxpurify.defenses.baselines import ac
from jaxpurify.errors import UserError


def two_gaussians(rng, sizes: tuple[int, int], separation: float, dims: int = 6) -> tuple[np.ndarray, np.ndarray]:
  """Two unit Gaussians `separation` apart along a random direction -> (points [n, dims], membership int [n])."""
  direction = rng.normal(size=dims)
  direction *= separation / np.linalg.norm(direction)
  points = np.concatenate([rng.normal(size=(sizes[0], dims)), rng.normal(size=(sizes[1], dims)) + direction])
  return points, np.repeat([0, 1], sizes)


def same_partition(a: np.ndarray, b: np.ndarray) -> bool:
  """Whether two 2-way labellings split the points alike (up to swapping the names)."""
  return np.array_equal(a, b) or np.array_equal(a, 1 - b)


def test_project_matches_sklearn_pca_up_to_sign():
  rng = np.random.default_rng(0)
  features = rng.normal(size=(200, 12)) * np.linspace(4, 0.5, 12)
  ours, theirs = ac.project(features, 5), PCA(n_components=5).fit_transform(features)
  np.testing.assert_allclose(np.abs(ours), np.abs(theirs), rtol=1e-6, atol=1e-8)


def test_two_means_finds_the_known_split_of_separated_gaussians_as_sklearn():
  points, truth = two_gaussians(np.random.default_rng(1), (300, 60), separation=8.0)
  ours = ac.two_means(points, seed=(0, 0))
  theirs = KMeans(n_clusters=2, n_init=10, random_state=0).fit(points).labels_
  assert same_partition(ours, truth) and same_partition(theirs, truth)


def test_two_means_reaches_sklearn_inertia_on_overlapping_gaussians():
  points, _ = two_gaussians(np.random.default_rng(2), (200, 150), separation=2.5)
  ours = ac.two_means(points, seed=(0, 0))
  inertia = sum(((points[ours == j] - points[ours == j].mean(axis=0)) ** 2).sum() for j in range(2))
  theirs = KMeans(n_clusters=2, n_init=10, random_state=0).fit(points)
  assert inertia <= theirs.inertia_ * (1 + 1e-9)


def test_two_means_is_deterministic_in_its_seed():
  points, _ = two_gaussians(np.random.default_rng(3), (100, 100), separation=1.0)
  np.testing.assert_array_equal(ac.two_means(points, seed=(7, 1)), ac.two_means(points, seed=(7, 1)))


@pytest.mark.parametrize("sizes, max_fraction, flagged", [((30, 70), 0.35, 30), ((70, 30), 0.35, 30),
                                                          ((40, 60), 0.35, 0), ((35, 65), 0.35, 0),
                                                          ((50, 50), 0.5, 0), ((40, 60), 0.5, 40)])
def test_flag_smaller_flags_the_smaller_cluster_only_below_the_fraction(sizes, max_fraction, flagged):
  labels = np.repeat([0, 1], sizes)
  flags = ac.flag_smaller(labels, max_fraction)
  assert flags.sum() == flagged
  if flagged:
    assert np.all(labels[flags] == np.argmin(sizes))


def test_suspects_remove_a_planted_cluster_and_spare_clean_classes():
  rng = np.random.default_rng(4)
  features = rng.normal(size=(900, 32)).astype(np.float32)
  labels = np.repeat([0, 1, 2], 300)
  planted = np.arange(310, 340)  # 10% of class 1, a tight cluster far from the class
  features[planted] = rng.normal(size=(30, 32)) * 0.3 + 6.0
  inputs = feature_inputs(features, labels, 3)
  removed = ac.suspects(inputs, inputs.config.baseline.ac, run=None)
  assert removed.dtype == np.int64
  np.testing.assert_array_equal(removed, planted)


def test_check_rejects_bad_settings():
  block = config("baseline:defense=ac,threat=2,attack=badnets,tiny").baseline.ac
  ac.check(block, None, np.full(10, 100), np.full(10, 10))
  block.dims = 0
  with pytest.raises(UserError, match="config.baseline.ac.dims"):
    ac.check(block, None, np.full(10, 100), np.full(10, 10))
  block.dims, block.max_cluster_fraction = 10, 0.7
  with pytest.raises(UserError, match="config.baseline.ac.max_cluster_fraction"):
    ac.check(block, None, np.full(10, 100), np.full(10, 10))
