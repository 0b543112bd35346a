"""Seed sifting: neighbour ranks against a NumPy brute force and by hand, 1 vs 8 devices, the depth features, the
scores and the seed choice, a mislabelled cluster kept out of the seeds, and the one-line errors."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from jaxpurify import augment, parallel
from jaxpurify.defenses.tcore import sift
from jaxpurify.encoders import build_backbone, encode_fn
from jaxpurify.errors import UserError

MODEL = ml_collections.ConfigDict(dict(name="resnet10", width=4, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25),
                                       dtype="float32"))


def _one_device_mesh():
  return jax.make_mesh((1,), ("data",), devices=jax.devices()[:1])


def _unit(x):
  return x / np.linalg.norm(x, axis=1, keepdims=True)


def _brute_force(features, labels):
  """The full N x N distance matrix in float64, self excluded -> (rank, margin)."""
  dist = np.sqrt(((features[:, None] - features[None]) ** 2).sum(-1))
  np.fill_diagonal(dist, np.inf)
  same = labels[:, None] == labels[None]
  d_same = np.where(same, dist, np.inf).min(1)
  d_other = np.where(same, np.inf, dist).min(1)
  return 1 + (dist < d_same[:, None]).sum(1), d_same / d_other


def _random_features(n=30, seed=0):
  rng = np.random.default_rng(seed)
  labels = rng.integers(0, 3, n)
  labels[5] = 3  # alone in its class
  return _unit(rng.normal(size=(n, 5))).astype(np.float32), labels


@pytest.mark.parametrize("chunk_rows", [7, 10, 64])  # 30 rows: padded, dividing, one chunk larger than N
def test_ranks_equal_a_numpy_brute_force(chunk_rows):
  features, labels = _random_features()
  rank, margin = sift.neighbour_ranks(jnp.asarray(features), jnp.asarray(labels), chunk_rows)
  want_rank, want_margin = _brute_force(features.astype(np.float64), labels)
  assert rank.dtype == jnp.int32 and margin.dtype == jnp.float32
  np.testing.assert_array_equal(rank, want_rank)
  np.testing.assert_allclose(margin, want_margin, rtol=1e-4)
  assert rank[5] == 30 and np.isinf(margin[5])


def test_ranks_by_hand_on_an_arc():
  # Unit vectors at angles 0, .1, .25, .3, 1 labelled a a b a b (chord lengths grow with the angle). 0 and 1 are
  # each other's nearest: rank 1. 2's nearest b (4, .75 away) lies behind 3, 1, 0: rank 4. 3's nearest a (1, .2
  # away) lies behind 2 (.05): rank 2. 4's nearest b (2, .75) lies behind 3 (.7): rank 2.
  angles = np.array([0.0, 0.1, 0.25, 0.3, 1.0])
  features = jnp.asarray(np.stack([np.cos(angles), np.sin(angles)], 1), jnp.float32)
  chord = lambda angle: 2 * np.sin(angle / 2)
  rank, margin = sift.neighbour_ranks(features, jnp.asarray([0, 0, 1, 0, 1]), 2)
  np.testing.assert_array_equal(rank, [1, 1, 4, 2, 2])
  np.testing.assert_allclose(margin, [chord(.1) / chord(.25), chord(.1) / chord(.15), chord(.75) / chord(.05),
                                      chord(.2) / chord(.05), chord(.75) / chord(.7)], rtol=1e-3)


def test_ranks_on_eight_devices_equal_one_device():
  features, labels = _random_features(40, seed=1)
  out = [jax.device_get(sift.neighbour_ranks(*parallel.put_replicated((features, labels.astype(np.int32)), mesh), 16))
         for mesh in (_one_device_mesh(), parallel.make_mesh([("data", -1)]))]
  np.testing.assert_array_equal(out[0][0], out[1][0])
  np.testing.assert_allclose(out[0][1], out[1][1], rtol=1e-6)


def test_sift_scores_sum_or_max_ranks_and_sum_margins():
  ranks, margins = np.array([[1, 3], [2, 1]]), np.array([[0.5, 0.25], [0.5, 1.0]])
  for aggregate, want in (("sum", [3, 4]), ("max", [2, 3])):
    primary, secondary = sift.sift_scores(ranks, margins, aggregate)
    np.testing.assert_array_equal(primary, want)
    np.testing.assert_allclose(secondary, [1.0, 1.25])
  with pytest.raises(ValueError, match="mean"):
    sift.sift_scores(ranks, margins, "mean")


def test_select_seeds_orders_by_primary_then_secondary_then_index():
  primary = np.array([2, 2, 1, 2, 2, 2, 1])
  secondary = np.array([0.5, 0.4, 0.9, 0.4, 0.4, 0.4, 0.8])
  labels = np.array([0, 0, 0, 1, 1, 1, 1])
  # class 0: 2 (primary 1), then 1 before 0 (secondary); class 1: 6, then 3 of the tied 3, 4, 5 (index)
  np.testing.assert_array_equal(sift.select_seeds(primary, secondary, labels, 2, 2), [1, 2, 3, 6])


def test_a_mislabelled_cluster_inside_another_class_is_never_seeded():
  rng = np.random.default_rng(3)
  centres = 5 * np.eye(3)
  clean = np.concatenate([c + rng.normal(scale=0.3, size=(20, 3)) for c in centres])
  poisons = centres[0] + rng.normal(scale=0.3, size=(6, 3))  # inside class 0, labelled 1
  labels = np.concatenate([np.repeat(np.arange(3), 20), np.ones(6, int)])
  features = _unit(np.concatenate([clean, poisons])).astype(np.float32)
  rank, margin = sift.neighbour_ranks(jnp.asarray(features), jnp.asarray(labels), 16)
  primary, secondary = sift.sift_scores(np.asarray(rank)[None], np.asarray(margin)[None], "sum")
  seeds = sift.select_seeds(primary, secondary, labels, 20, 3)
  np.testing.assert_array_equal(seeds, np.arange(60))  # class 1's 20 seeds are its 20 clean samples


def test_depth_features_are_replicated_unit_rows_from_the_input_to_the_encoders_feature():
  mesh = parallel.make_mesh([("data", -1)])
  encoder = build_backbone(MODEL, 0)
  images = np.random.default_rng(0).integers(0, 256, (12, 8, 8, 3), dtype=np.uint8)
  layers = ("input", "layer1", "layer2", "layer3", "layer4", "pooled")
  assert sift.depths(encoder) == ("input", "pooled", "layer1", "layer2", "layer3", "layer4")
  features = sift.depth_features(encoder, MODEL, images, 8, mesh, layers)
  assert [f.shape for f in features] == [(12, 192), (12, 4), (12, 8), (12, 16), (12, 32), (12, 32)]
  for f in features:
    assert f.dtype == jnp.float32 and f.sharding.is_fully_replicated and f.sharding.mesh == mesh
    np.testing.assert_allclose(np.linalg.norm(f, axis=1), 1, rtol=1e-5)
  pixels = np.asarray(augment.normalize(augment.to_float(jnp.asarray(images)), MODEL.mean, MODEL.std))
  np.testing.assert_allclose(features[0], _unit(pixels.reshape(12, -1)), atol=1e-6)
  pooled = np.asarray(jax.jit(encode_fn(encoder, MODEL))(images))
  np.testing.assert_allclose(features[-1], _unit(pooled), atol=1e-5)
  np.testing.assert_allclose(features[-2], _unit(pooled), atol=1e-5)  # a ResNet pools its last tap


def test_sift_on_eight_devices_equals_one_device():
  images = np.random.default_rng(1).integers(0, 256, (20, 8, 8, 3), dtype=np.uint8)
  labels = np.repeat(np.arange(3), [8, 6, 6])
  block = ml_collections.ConfigDict(dict(layers=("input", "layer2", "layer4"), aggregate="max", seeds_per_class=3,
                                         chunk_rows=8))
  encoder = build_backbone(MODEL, 0)
  out = [sift.sift(encoder, MODEL, images, labels, 3, block, 8, mesh)
         for mesh in (_one_device_mesh(), parallel.make_mesh([("data", -1)]))]
  for key in ("seeds", "rank", "primary"):
    np.testing.assert_array_equal(out[0][key], out[1][key])
  np.testing.assert_allclose(out[0]["margin"], out[1]["margin"], rtol=1e-4)
  assert out[0]["rank"].shape == out[0]["margin"].shape == (3, 20)
  np.testing.assert_array_equal(out[0]["primary"], out[0]["rank"].max(0))
  assert len(out[0]["seeds"]) == 9 and np.array_equal(np.bincount(labels[out[0]["seeds"]]), [3, 3, 3])


def test_seed_budgets_and_depths_that_do_not_fit_fail_in_one_line():
  labels = np.array([0] * 6 + [1] * 6 + [2] * 3)
  with pytest.raises(UserError, match=r"^class 2 holds 3 samples, fewer than the seed budget 5; lower "
                                      r"config\.tcore\.sift\.seeds_per_class$"):
    sift.check(5, labels, 3)
  with pytest.raises(UserError, match=r"config\.tcore\.sift\.seeds_per_class is 0"):
    sift.check(0, labels, 3)
  sift.check(3, labels, 3)
  block = ml_collections.ConfigDict(dict(layers=("stage9",), aggregate="sum", seeds_per_class=1, chunk_rows=8))
  with pytest.raises(UserError, match=r"config\.tcore\.sift\.layers names unknown depth\(s\) stage9; set it to one "
                                      r"or more of input, pooled, layer1, layer2, layer3, layer4"):
    sift.sift(build_backbone(MODEL, 0), MODEL, np.zeros((4, 8, 8, 3), np.uint8), np.array([0, 0, 1, 1]), 2, block, 8,
              parallel.make_mesh([("data", -1)]))
