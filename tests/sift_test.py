"""Seed sifting: neighbour ranks against a NumPy brute force and by hand, 1 vs 8 devices, seed selection, and a
poison cluster kept out of the seeds."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from jaxpurify import parallel
from jaxpurify.defenses import sift
from jaxpurify.encoders import build_backbone, encode_fn
from jaxpurify.errors import UserError

MODEL = ml_collections.ConfigDict(dict(name="resnet18", width=4, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25)))


def _brute_force(features, labels):
  dist = np.sqrt(np.maximum(((features[:, None] - features[None]) ** 2).sum(-1), 0))
  np.fill_diagonal(dist, np.inf)
  same = labels[:, None] == labels[None]
  d_same = np.where(same, dist, np.inf).min(1)
  d_other = np.where(same, np.inf, dist).min(1)
  return 1 + (dist < d_same[:, None]).sum(1), d_same / d_other


def _unit(x):
  return x / np.linalg.norm(x, axis=1, keepdims=True)


@pytest.mark.parametrize("chunk_rows", [7, 10, 64])
def test_ranks_equal_a_numpy_brute_force(chunk_rows):
  rng = np.random.default_rng(0)
  features = _unit(rng.normal(size=(30, 5))).astype(np.float32)
  labels = rng.integers(0, 3, 30)
  rank, margin = sift.neighbour_ranks(jnp.asarray(features), jnp.asarray(labels), chunk_rows)
  want_rank, want_margin = _brute_force(features.astype(np.float64), labels)
  np.testing.assert_array_equal(rank, want_rank)
  np.testing.assert_allclose(margin, want_margin, rtol=1e-4)


def test_ranks_by_hand_on_an_arc():
  # unit vectors at angles 0, .1, .25, .3, 1; labels a a b a b. Sample 3's nearest 'a' (sample 1, .2 away) lies
  # behind sample 2 (.05 away): rank 2. Sample 2's nearest 'b' (.75 away) lies behind 3, 1 and 0: rank 4.
  angles = np.array([0.0, 0.1, 0.25, 0.3, 1.0])
  features = np.stack([np.cos(angles), np.sin(angles)], 1).astype(np.float32)
  rank, margin = sift.neighbour_ranks(jnp.asarray(features), jnp.asarray([0, 0, 1, 0, 1]), 2)
  np.testing.assert_array_equal(rank, [1, 1, 4, 2, 2])
  assert margin[3] == pytest.approx(np.sin(0.1) / np.sin(0.025), rel=1e-3)  # chord(.2) / chord(.05)
  rank, margin = sift.neighbour_ranks(jnp.asarray(features), jnp.asarray([0, 0, 1, 0, 2]), 2)
  assert rank[4] == 5 and np.isinf(margin[4])  # alone in its class


def test_select_seeds_orders_by_rank_then_margin_then_position():
  primary = np.array([2, 2, 1, 3, 2, 2])
  secondary = np.array([0.5, 0.4, 0.9, 0.1, 0.4, 0.3])
  labels = np.array([0, 0, 0, 1, 1, 1])
  np.testing.assert_array_equal(sift.select_seeds(primary, secondary, labels, 2, 2), [1, 2, 4, 5])


def test_a_mislabelled_cluster_inside_another_class_is_never_seeded():
  rng = np.random.default_rng(3)
  centres = np.eye(3)[:, :3] * 5
  clean = np.concatenate([c + rng.normal(scale=0.3, size=(20, 3)) for c in centres])
  labels = np.repeat(np.arange(3), 20)
  poisons = centres[0] + rng.normal(scale=0.3, size=(6, 3))  # inside class 0, labelled 1
  features = _unit(np.concatenate([clean, poisons])).astype(np.float32)
  labels = np.concatenate([labels, np.ones(6, int)])
  rank, margin = sift.neighbour_ranks(jnp.asarray(features), jnp.asarray(labels), 16)
  primary, secondary = sift.sift_scores(np.asarray(rank)[None], np.asarray(margin)[None], "sum")
  seeds = sift.select_seeds(primary, secondary, labels, 10, 3)
  assert not np.isin(np.arange(60, 66), seeds).any()


def test_depth_features_are_unit_rows_and_the_last_is_the_encoders_feature():
  mesh = parallel.make_mesh([("data", -1)])
  encoder = build_backbone(MODEL, 0)
  images = np.random.default_rng(0).integers(0, 256, (12, 8, 8, 3), dtype=np.uint8)
  features = sift.depth_features(encoder, MODEL, images, 8, mesh)
  assert [f.shape for f in features] == [(12, 192), (12, 4), (12, 8), (12, 16), (12, 32)]
  for f in features:
    np.testing.assert_allclose(np.linalg.norm(f, axis=1), 1, rtol=1e-5)
  pooled = np.asarray(jax.jit(encode_fn(encoder, MODEL))(images))
  np.testing.assert_allclose(features[-1], _unit(pooled), atol=1e-5)


def test_sift_on_eight_devices_equals_one_device():
  images = np.random.default_rng(1).integers(0, 256, (24, 8, 8, 3), dtype=np.uint8)
  labels = np.repeat(np.arange(3), 8)
  block = ml_collections.ConfigDict(dict(layers=sift.DEPTHS, aggregate="sum", seeds_per_class=3, chunk_rows=8))
  meshes = (jax.make_mesh((1,), ("data",), devices=jax.devices()[:1]), parallel.make_mesh())
  out = [sift.sift(build_backbone(MODEL, 0), MODEL, images, labels, 3, block, 8, mesh) for mesh in meshes]
  np.testing.assert_array_equal(out[0]["seeds"], out[1]["seeds"])
  np.testing.assert_array_equal(out[0]["rank"], out[1]["rank"])
  assert out[0]["rank"].shape == (5, 24) and len(out[0]["seeds"]) == 9


def test_a_seed_budget_larger_than_a_class_fails_in_one_line():
  with pytest.raises(UserError, match="class 2 holds 3 samples, fewer than the seed budget 5"):
    sift.check(5, np.array([0] * 6 + [1] * 6 + [2] * 3), 3)
  block = ml_collections.ConfigDict(dict(layers=("stage9",), aggregate="sum", seeds_per_class=1, chunk_rows=8))
  with pytest.raises(UserError, match="config.tcore.sift.layers"):
    sift.sift(build_backbone(MODEL, 0), MODEL, np.zeros((4, 8, 8, 3), np.uint8), np.array([0, 0, 1, 1]), 2, block, 8,
              parallel.make_mesh([("data", -1)]))
