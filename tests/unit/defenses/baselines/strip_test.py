"""STRIP: the entropy and the blended scores against NumPy, the partner draw, a toy linear classifier whose trigger
forces one class (the triggered images are removed) on 1 and 8 devices, and `suspects` on a tiny classifier."""

import jax
import ml_collections
import numpy as np
import optax
import pytest
from flax import nnx

from jaxpurify import finetune, parallel
from jaxpurify.defenses.baselines import strip
from jaxpurify.defenses.baselines.inputs import Inputs
from jaxpurify.encoders import build_backbone
from jaxpurify.errors import UserError
from jaxpurify.train.state import create_state

MEAN, STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)
BLOCK = ml_collections.ConfigDict(dict(alpha=1.0, blends=8, clean_quantile=0.1, batch_size=16))
NUM_CLASSES, SIDE = 5, 8


def _np_entropy(logits):
  logits = np.asarray(logits, np.float64)
  p = np.exp(logits - logits.max(-1, keepdims=True))
  p = p / p.sum(-1, keepdims=True) + 1e-8
  return -(p * np.log(p)).sum(-1)


def test_entropy_matches_numpy():
  logits = np.random.default_rng(0).normal(scale=4, size=(6, 7)).astype(np.float32)
  np.testing.assert_allclose(strip.entropy(logits), _np_entropy(logits), rtol=1e-5, atol=1e-6)
  assert float(strip.entropy(np.array([0.0, 0.0]))) == pytest.approx(np.log(2), rel=1e-6)


def test_partner_indices_are_distinct_in_range_and_never_the_image_itself():
  key = jax.random.key(0)
  for index in range(12):
    drawn = np.asarray(strip.partner_indices(key, index, 11, 12, exclude_self=True))
    assert sorted(drawn) == sorted(set(range(12)) - {index})
  drawn = np.asarray(strip.partner_indices(key, 3, 5, 12, exclude_self=False))
  assert len(set(drawn)) == 5 and drawn.min() >= 0 and drawn.max() < 12


def _linear():
  """A linear classifier on normalised 8x8 images: class 0's logit is 20 (mean of the top-left 3x3 patch - 1), so a
  saturated patch (normalised 2, about 2 after blending) forces class 0; the other classes have small random
  weights -> (apply, weights)."""
  rng = np.random.default_rng(1)
  w = rng.normal(scale=0.05, size=(SIDE, SIDE, 3, NUM_CLASSES)).astype(np.float32)
  w[..., 0] = 0.0
  w[:3, :3, :, 0] = 20.0 / 27
  b = np.zeros(NUM_CLASSES, np.float32)
  b[0] = -20.0
  apply = lambda weights, x: x.reshape(x.shape[0], -1) @ weights["w"].reshape(-1, NUM_CLASSES) + weights["b"]
  return apply, {"w": w, "b": b}


def _images(rng, n, triggered=0):
  images = rng.integers(0, 256, (n + triggered, SIDE, SIDE, 3), dtype=np.uint8)
  images[n:, :3, :3] = 255
  return images


def _np_scores(apply, weights, images, pool, key, blends, exclude_self):
  """Independent scores: the partners from partner_indices, then blend, logits and entropy in NumPy."""
  normalize = lambda u: (u.astype(np.float64) / 255 - np.array(MEAN)) / np.array(STD)
  out = []
  for i, image in enumerate(images):
    partners = np.asarray(strip.partner_indices(key, i, blends, len(pool), exclude_self))
    blended = normalize(image)[None] + normalize(pool[partners])
    logits = blended.reshape(blends, -1) @ weights["w"].reshape(-1, NUM_CLASSES).astype(np.float64) + weights["b"]
    out.append(_np_entropy(logits).mean())
  return np.array(out)


def test_scores_match_numpy_with_a_padded_last_batch():
  mesh = parallel.make_mesh()
  apply, weights = _linear()
  rng = np.random.default_rng(2)
  images, pool = _images(rng, 20, triggered=2), _images(rng, 12)
  key = jax.random.key(3)
  for exclude_self, x in ((False, images), (True, pool)):
    got = strip.scores(apply, parallel.put_replicated(weights, mesh), x, parallel.put_replicated(pool, mesh), key,
                       BLOCK, MEAN, STD, exclude_self, mesh)
    np.testing.assert_allclose(got, _np_scores(apply, weights, x, pool, key, BLOCK.blends, exclude_self),
                               rtol=1e-4, atol=1e-6)


def test_clean_threshold_is_the_toolbox_order_statistic():
  assert strip.clean_threshold(np.array([5.0, 1.0, 4.0, 2.0, 3.0]), 0.1) == 1.0  # position int(0.5) = 0
  assert strip.clean_threshold(np.arange(20.0)[::-1], 0.1) == 2.0  # position 2


def test_triggered_images_are_removed_alike_on_one_and_eight_devices():
  apply, weights = _linear()
  rng = np.random.default_rng(4)
  victim, reserve = _images(rng, 40, triggered=8), _images(rng, 30)
  removed = []
  for mesh in (jax.make_mesh((1,), ("data",), devices=jax.devices()[:1]), parallel.make_mesh()):
    removed.append(strip.cleanse(apply, parallel.put_replicated(weights, mesh), victim, reserve, 0, BLOCK, MEAN, STD,
                                 mesh))
  np.testing.assert_array_equal(removed[0], removed[1])
  removed = removed[1]
  assert removed.dtype == np.int64 and np.all(np.diff(removed) > 0)
  assert set(range(40, 48)) <= set(removed.tolist())  # every triggered image
  assert np.sum(removed < 40) <= 8  # about the 10% false-positive quantile of the 40 clean ones


def test_too_few_reserve_images_and_bad_settings_are_user_errors():
  counts = (np.full(10, 100), np.full(10, 10))
  with pytest.raises(UserError, match="blends=8 needs more than that many reserve images, there are 8"):
    strip.check(BLOCK, None, np.full(5, 10), np.full(4, 2))
  strip.check(BLOCK, None, *counts)
  with pytest.raises(UserError, match="clean_quantile"):
    strip.check(ml_collections.ConfigDict({**BLOCK.to_dict(), "clean_quantile": 1.0}), None, *counts)
  with pytest.raises(UserError, match="batch_size"):
    strip.check(ml_collections.ConfigDict({**BLOCK.to_dict(), "batch_size": 12}), None, *counts)


def test_suspects_scores_with_the_undefended_classifier():
  model_config = ml_collections.ConfigDict(dict(name="resnet10", width=4, mean=MEAN, std=STD, dtype="float32"))
  head = ml_collections.ConfigDict(dict(hidden=(16, 8), dropout=0.0))
  mesh = parallel.make_mesh()
  graphdef, state = create_state(lambda: finetune.build_classifier(build_backbone(model_config, 0), 3, head, 0),
                                 optax.sgd(0.1), mesh)
  rng = np.random.default_rng(6)
  victim, reserve = _images(rng, 20), _images(rng, 10)
  block = ml_collections.ConfigDict(dict(alpha=1.0, blends=4, clean_quantile=0.3, batch_size=16))
  config = ml_collections.ConfigDict(dict(seed=0, model=model_config))
  inputs = Inputs(config, mesh, "ft_all", None, victim, np.zeros(20, int), 3, reserve, np.zeros(10, int),
                  (graphdef, state), None, None, None, None)
  removed = strip.suspects(inputs, block, None)
  # the same rule from an independent forward of the classifier on blends made in NumPy
  apply = jax.jit(lambda params, batch_stats, x: nnx.merge(graphdef, params, batch_stats)(x))
  forward = lambda x: apply(state.params, state.batch_stats, parallel.put_replicated(x, mesh))
  normalize = lambda u: (u.astype(np.float32) / 255 - np.array(MEAN, np.float32)) / np.array(STD, np.float32)
  key = jax.random.key(0)

  def independent_scores(images, stream, exclude_self):
    partners = [np.asarray(strip.partner_indices(jax.random.fold_in(key, stream), i, 4, 10, exclude_self))
                for i in range(len(images))]
    blended = np.stack([normalize(x)[None] + normalize(reserve[p]) for x, p in zip(images, partners)])
    return _np_entropy(forward(blended.reshape(-1, SIDE, SIDE, 3))).reshape(len(images), 4).mean(1)

  threshold = np.sort(independent_scores(reserve, strip.RESERVE, True))[3]
  victim_scores = independent_scores(victim, strip.VICTIM, False)
  certain = np.abs(victim_scores - threshold) > 1e-5  # float32 ties could fall either way
  np.testing.assert_array_equal(np.isin(np.arange(20), removed)[certain], (victim_scores < threshold)[certain])
