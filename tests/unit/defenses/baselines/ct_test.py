"""CT: the final test's pieces against independent NumPy / scikit-learn / SciPy references (the chunklet's size,
the Gaussian density with singular covariances, the class likelihood ratios of the official simplified test on a
class with a planted population predicted as it and one without, and its degenerate cases), the flagging rule,
the per-class distillation top-up, the confusion-only step against an independent loss and on 8 devices against
1, the alternating batches, the checks, and a tiny `suspects` that resumes from its stages."""

import json
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from flax import nnx
from scipy.stats import multivariate_normal
from sklearn.decomposition import PCA

from helpers import assert_trees_close, config as load_config
from jaxpurify import augment, finetune, parallel, stages
from jaxpurify.defenses.baselines import ct
from jaxpurify.defenses.baselines.inputs import Inputs
from jaxpurify.defenses.tcore import confusion
from jaxpurify.encoders import build_backbone
from jaxpurify.errors import UserError
from jaxpurify.pipeline import Run
from jaxpurify.train.state import create_state

MODEL = ml_collections.ConfigDict(dict(name="resnet10", width=4, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25),
                                       dtype="float32"))
HEAD = ml_collections.ConfigDict(dict(hidden=(16, 8), dropout=0.0))
AUGMENT = ml_collections.ConfigDict(dict(padding=0, flip_prob=0.0))


def test_chunklet_sizes_are_the_officials_median_positions():
  counts = np.array([0, 9, 19, 20, 32, 500, 5001])
  for fraction in (0.1, 0.05, 0.3):
    official = [len(range(int(n / 2 - n * fraction / 2), int(n / 2 + n * fraction / 2))) for n in counts]
    np.testing.assert_array_equal(ct.chunklet_sizes(counts, fraction), official)
  ct.check_chunklets(np.array([11, 32]), 0.1)  # 2 and 3 samples
  with pytest.raises(UserError, match="class 1 has 10 samples, 1 in the chunklet") as err:
    ct.check_chunklets(np.array([11, 10]), 0.1)
  assert "\n" not in str(err.value)


def test_gaussian_log_density_is_scipys_with_singular_covariances_allowed():
  rng = np.random.default_rng(0)
  x, mean = rng.normal(size=(50, 2)), np.array([0.3, -0.2])
  full = np.array([[1.5, 0.4], [0.4, 0.7]])
  np.testing.assert_allclose(ct.gaussian_log_density(x, mean, full),
                             multivariate_normal.logpdf(x, mean, full, allow_singular=True), rtol=1e-12)
  singular = np.array([[2.0, 2.0], [2.0, 2.0]])  # support: the line through the mean along (1, 1)
  x[:20] = mean + rng.normal(size=(20, 1)) * np.array([1.0, 1.0])
  log_density = ct.gaussian_log_density(x, mean, singular)
  np.testing.assert_allclose(log_density, multivariate_normal.logpdf(x, mean, singular, allow_singular=True),
                             rtol=1e-12)
  assert np.isfinite(log_density[:20]).all() and np.isneginf(log_density[20:]).all()


def _reference_log_ratio(features, isolated):
  """The official `identify_poison_samples_simplified` for one class, sample by sample: scikit-learn's PCA to 2-D,
  a Gaussian per group (np.cov + 0.001), SciPy's densities with singular covariances allowed; the log of its
  ratio."""
  x = PCA(n_components=2, svd_solver="full").fit_transform(features)
  if not 2 <= isolated.sum() <= len(x) - 2:
    return np.log(1.0)
  mu = [x[~isolated].mean(0), x[isolated].mean(0)]
  cov = [np.cov(x[~isolated].T) + 0.001, np.cov(x[isolated].T) + 0.001]
  single = two = 0.0
  for sample, group in zip(x, isolated.astype(int)):
    single += multivariate_normal.logpdf(sample, mu[0], cov[0], allow_singular=True)
    two += multivariate_normal.logpdf(sample, mu[group], cov[group], allow_singular=True)
  return np.log(np.exp((two - single) / len(x)))


def test_class_log_ratios_flag_the_class_with_a_planted_population_as_the_official_reference_does():
  rng = np.random.default_rng(3)
  scales = np.array([3.0, 2.0, 1.0, 0.5, 0.5, 0.5])
  clean = lambda n: rng.normal(size=(n, 6)) * scales
  planted = rng.normal(size=(90, 6)) * 0.7 + np.array([4.0, -3.0, 2.0, 0.0, 0.0, 0.0])
  features = np.concatenate([clean(300), clean(210), planted, clean(100)])
  labels = np.repeat([0, 1, 2], [300, 300, 100])
  # class 0: a random 40% keeps its label, no sub-population of its own; class 1: the planted 90 and 10 clean
  # keep theirs; class 2: a single one (not tested); class 3 has no members (not tested)
  keeps = np.concatenate([rng.random(300) < 0.4, np.arange(300) >= 200, np.arange(100) == 0])
  predictions = np.where(keeps, labels, (labels + 1 + rng.integers(0, 3, 700)) % 4)
  log_ratios = ct.class_log_ratios(features, labels, predictions, 4)
  reference = [_reference_log_ratio(features[labels == c], predictions[labels == c] == c) for c in range(3)]
  np.testing.assert_allclose(log_ratios[:3], reference, rtol=1e-9)
  assert log_ratios[2] == log_ratios[3] == 0.0
  assert log_ratios[0] < np.log(1.5) and log_ratios[1] > np.log(2.0)
  flagged = ct.flagged_classes(log_ratios, 2.0, 1.5)
  np.testing.assert_array_equal(flagged, [False, True, False, False])
  np.testing.assert_array_equal(ct.flagged_members(labels, predictions, flagged), np.arange(500, 600))


def test_class_log_ratio_needs_two_samples_in_each_group_and_takes_singular_covariances():
  features = np.random.default_rng(5).normal(size=(10, 4))
  assert ct.class_log_ratio(features, np.arange(10) < 9) == 0.0  # one sample in the other group
  # one point: both covariances 0.001 everywhere (singular), every sample at both means: ratio 1
  assert ct.class_log_ratio(np.ones((10, 4)), np.arange(10) < 5) == 0.0


def test_flagged_classes_gives_the_lower_threshold_to_the_largest_ratio_only():
  flag = lambda ratios: ct.flagged_classes(np.log(ratios), 2.0, 1.5)
  np.testing.assert_array_equal(flag([1.2, 1.7, 1.6, 2.5]), [False, False, False, True])
  np.testing.assert_array_equal(flag([1.2, 1.7, 1.6, 1.1]), [False, True, False, False])
  np.testing.assert_array_equal(flag([2.2, 1.7, 1.6, 2.5]), [True, False, False, True])
  np.testing.assert_array_equal(flag([1.2, 1.4, 1.0]), [False, False, False])


def test_distill_tops_up_each_class_to_its_own_minimum():
  losses = np.array([0.1, 0.2, 0.3, 5.0, 6.0, 0.05, 7.0, 8.0, 9.0])
  labels = np.array([0, 0, 0, 1, 1, 0, 2, 2, 2])
  # lowest round(0.2 * 9) = 2: positions 5 and 0; class 1 needs none, class 2 two (6 and 7)
  np.testing.assert_array_equal(confusion.distill(losses, labels, 0.2, np.array([1, 0, 2])), [0, 5, 6, 7])


def _training_forward(graphdef, params, batch_stats, images):
  """A classifier's logits of uint8 images in training mode (batch statistics), without augmentation."""
  x = augment.normalize(augment.to_float(images), jnp.asarray(MODEL.mean), jnp.asarray(MODEL.std))
  return nnx.merge(graphdef, params, batch_stats, copy=True)(x, train_backbone=True)


@pytest.mark.extended  # 20 s of CI time on 2 cores; T-Core's confusion step test covers the same loss by default
def test_confusion_only_step_is_the_confused_cross_entropy_and_the_same_on_eight_devices_as_on_one():
  encoder, tx, rng = build_backbone(MODEL, 0), optax.sgd(0.1, momentum=0.7), np.random.default_rng(4)
  batch = {"seed_image": rng.integers(0, 256, (8, 8, 8, 3), dtype=np.uint8),
           "seed_pred": rng.integers(0, 3, 8).astype(np.int32)}
  out = []
  for mesh in (jax.make_mesh((1,), ("data",), devices=jax.devices()[:1]), parallel.make_mesh()):
    graphdef, state = create_state(lambda: finetune.build_classifier(encoder, 3, HEAD, 0), tx, mesh)
    step = confusion.make_confusion_only_step(graphdef, tx, "all", AUGMENT, MODEL.mean, MODEL.std, 3)
    if not out:  # the training-mode forward, jitted (an eager one costs more than the step's compile)
      forward = jax.jit(_training_forward, static_argnums=0)
      logits = np.asarray(forward(graphdef, state.params, state.batch_stats, batch["seed_image"]), np.float64)
      expected = confusion.sample_losses(logits, (batch["seed_pred"] + 1) % 3).mean()  # step 0: shift by 1
    state, metrics = jax.jit(step)(state, parallel.put_batch(batch, mesh), jax.random.key(0))
    np.testing.assert_allclose(float(metrics["loss"]), expected, rtol=1e-4)
    out.append(jax.device_get(state.params))
  assert_trees_close(out[1], out[0])


def test_confusion_batches_bring_the_inspected_set_every_factor_steps():
  mesh = parallel.make_mesh()
  rs = confusion.RoundSettings("all", None, 1, 2.0, 0.1, 0.0, 0.0, 4, 8, 8, 1)
  inspected = {"image": np.arange(32 * 2 * 2 * 3, dtype=np.uint8).reshape(32, 2, 2, 3) % 251,
               "label": np.arange(32, dtype=np.int32), "weight": np.ones(32, np.float32)}
  confusers = {"seed_image": np.zeros((16, 2, 2, 3), np.uint8), "seed_pred": np.arange(16, dtype=np.int32)}
  batch_fn = confusion.confusion_batches(rs, inspected, confusers, mesh, 0, batch_factor=2)
  plain = confusion.confusion_batches(rs, inspected, confusers, mesh, 0)
  assert set(batch_fn(1)) == {"seed_image", "seed_pred"} and set(batch_fn(2)) == set(inspected) | set(confusers)
  np.testing.assert_array_equal(batch_fn(2)["label"], plain(1)["label"])  # the 2nd inspected batch at step 2
  np.testing.assert_array_equal(batch_fn(3)["seed_pred"], plain(3)["seed_pred"])  # a confusion batch every step
  picked = confusion.alternating_step(lambda *a: "mixed", lambda *a: "alone")
  assert [picked(None, batch_fn(i), None) for i in range(3)] == ["mixed", "alone", "mixed"]


@pytest.mark.parametrize("change, message", [
    ({"ratios": ()}, "ratios is empty"),
    ({"iters": (10,)}, r"iters has 1 entries for 5 rounds"),
    ({"lambdas": (20.0, 20.0, 1.0, 30.0, 30.0)}, "lambdas must be > 1"),
    ({"final_lambda": 1.0}, "final_lambda=1.0 must be > 1"),
])
def test_bad_ct_settings_fail_in_one_line(change, message):
  block = load_config("baseline:defense=ct,threat=2,attack=badnets").baseline.ct
  block.update(change)
  with pytest.raises(UserError, match=message) as err:
    ct.check(block, None, np.full(10, 100), np.full(10, 10))
  assert "\n" not in str(err.value)


def test_ct_needs_two_classes_a_reserve_and_chunklets_of_two():
  config = load_config("baseline:defense=ct,threat=2,attack=badnets,tiny")
  with pytest.raises(UserError, match="at least 2 classes"):
    ct.check(config.baseline.ct, config, np.full(1, 100), np.full(1, 10))
  with pytest.raises(UserError, match="clean_fraction above 0"):
    ct.check(config.baseline.ct, config, np.full(10, 100), np.zeros(10, int))
  with pytest.raises(UserError, match="class 0 has 8 samples, 1 in the chunklet"):
    ct.check(config.baseline.ct, config, np.full(3, 8), np.full(3, 2))


def _inputs(config, n=96, reserve=24, classes=3):
  """A victim set of n random 16x16 images in `classes` balanced classes, a reserve of `reserve`, and random
  undefended logits of the reserve (the only output of the undefended model CT reads)."""
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (n + reserve, 16, 16, 3), dtype=np.uint8)
  labels = np.arange(n + reserve) % classes
  empty = np.zeros((0, 1), np.float32)
  return Inputs(config, parallel.make_mesh(config.mesh), "ft_all", build_backbone(config.model, 0), images[:n],
                labels[:n], classes, images[n:], labels[n:], (None, None), empty, empty, empty,
                rng.normal(size=(reserve, classes)).astype(np.float32))


@pytest.mark.extended  # 30 s: CT's rounds end to end; its step, batches and test run by default
def test_suspects_runs_the_rounds_and_the_test_and_resumes_from_its_stages(tmp_path, monkeypatch):
  config = load_config("baseline:defense=ct,threat=2,attack=badnets,tiny")
  block = config.baseline.ct
  block.update(dict(ratios=(0.5,), lambdas=(block.final_lambda,), lrs=(1e-3,), iters=(1,), pretrain_epochs=(1,),
                    batch_size=16, seed_batch_size=16))  # the final round's steps are round 0's: compiled once
  inputs = _inputs(config)
  removed = ct.suspects(inputs, block, Run(config, str(tmp_path)))
  assert removed.dtype == np.int64 and np.all(np.diff(removed) > 0) and (removed.size == 0 or removed[-1] < 96)
  # 96 samples at batch 16 -> 6 pretraining steps; 48 distilled + 24 reserve -> 4; 1 (mixed) confusion step each
  for stage, steps in (("ct0_pretrain", 6), ("ct0_confuse_ft_all", 1), ("ct_final_pretrain_ft_all", 4),
                       ("ct_final_confuse_ft_all", 1)):
    with open(os.path.join(tmp_path, stage, "done.json")) as f:
      assert json.load(f)["steps"] == steps

  def no_training(*args, **kwargs):
    raise AssertionError("a finished stage trained again")

  monkeypatch.setattr(stages, "train", no_training)
  np.testing.assert_array_equal(ct.suspects(inputs, block, Run(config, str(tmp_path))), removed)
