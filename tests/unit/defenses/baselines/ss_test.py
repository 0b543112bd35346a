"""SS: spectral-signature scores against NumPy's SVD, the per-class budget, the filter on a planted
sub-population and the config check."""

import numpy as np
import pytest

from helpers import config, feature_inputs
from jaxpurify.defenses.baselines import _spectral, ss
from jaxpurify.errors import UserError


def test_scores_are_squared_projections_on_each_class_top_singular_vector():
  rng = np.random.default_rng(0)
  labels = rng.integers(0, 3, size=90)
  features = (rng.normal(size=(90, 8)) * np.linspace(3, 0.5, 8)).astype(np.float32)
  expected = np.zeros(90)
  for c in range(3):
    members = labels == c
    centred = features[members].astype(np.float64) - features[members].mean(axis=0, dtype=np.float64)
    top = np.linalg.svd(centred)[2][0]
    expected[members] = (centred @ top) ** 2
  np.testing.assert_allclose(ss.scores(features, labels, 4), expected, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("size, fraction, expected", [(100, 0.15, 15), (101, 0.15, 16), (7, 0.5, 3), (1, 0.15, 0),
                                                      (40, 0.0, 0)])
def test_budget_is_the_ceiling_capped_at_half_the_class(size, fraction, expected):
  assert _spectral.budget(size, fraction) == expected


def test_suspects_remove_a_planted_subpopulation_and_the_budget_of_every_class():
  rng = np.random.default_rng(1)
  features = rng.normal(size=(600, 16)).astype(np.float32)
  labels = np.repeat([0, 1], 300)
  planted = np.arange(250, 280)  # 10% of class 0, shifted far along one axis
  features[planted, 3] += 12.0
  inputs = feature_inputs(features, labels, 2)
  block = inputs.config.baseline.ss
  removed = ss.suspects(inputs, block, run=None)
  assert removed.dtype == np.int64 and np.all(np.diff(removed) > 0)
  assert set(planted) <= set(removed)
  assert np.bincount(labels[removed], minlength=2).tolist() == [45, 45]  # ceil(0.15 * 300) per class


def test_check_rejects_a_fraction_above_half():
  block = config("baseline:defense=ss,threat=2,attack=badnets,tiny").baseline.ss
  ss.check(block, None, np.full(10, 100), np.full(10, 10))
  block.remove_fraction = 0.6
  with pytest.raises(UserError, match="config.baseline.ss.remove_fraction"):
    ss.check(block, None, np.full(10, 100), np.full(10, 10))
