"""ASSET: the medcouple and the adjusted outlyingness against a NumPy transcription of their definitions, the
threshold against scikit-learn's Gaussian fit, the separating MLP marking a planted cluster, the offset step
against an independent variance and on 8 devices against 1, the config checks, and a tiny `suspects` that resumes
from its stage."""

import json
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from flax import nnx
from sklearn.mixture import GaussianMixture

from helpers import assert_trees_close, config as load_config
from jaxpurify import augment, finetune, parallel, stages
from jaxpurify.defenses.baselines import asset
from jaxpurify.defenses.baselines.inputs import Inputs
from jaxpurify.encoders import build_backbone
from jaxpurify.errors import UserError
from jaxpurify.pipeline import Run
from jaxpurify.train.state import make_optimizer

MODEL = ml_collections.ConfigDict(dict(name="resnet10", width=4, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25),
                                       dtype="float32"))
HEAD = ml_collections.ConfigDict(dict(hidden=(16, 8), dropout=0.0))


def _medcouple_reference(x: np.ndarray) -> float:
  """Hubert and Vandervieren's medcouple by its definition, pair by pair (the kernel of two values tied with the
  median: -1, 0 or +1 as their tie ranks i + j (1-based) fall below, at or above k + 1)."""
  z = np.sort(x.astype(np.float64)) - np.median(x.astype(np.float64))
  ties = np.flatnonzero(z == 0)
  h = []
  for i in np.flatnonzero(z >= 0):
    for j in np.flatnonzero(z <= 0):
      if z[i] == 0 and z[j] == 0:
        a, b = np.searchsorted(ties, i) + 1, np.searchsorted(ties, j) + 1
        h.append(np.sign(a + b - 1 - len(ties)))
      else:
        h.append((z[i] + z[j]) / (z[i] - z[j]))
  return float(np.median(h))


def _outlyingness_reference(x: np.ndarray) -> np.ndarray:
  x = x.astype(np.float64)
  median = np.sort(x)[(len(x) - 1) // 2]  # torch.median: the lower middle value
  q1, q3 = np.quantile(x, [0.25, 0.75])
  mc, iqr = _medcouple_reference(x), q3 - q1
  low_exp, high_exp = (-4, 3) if mc > 0 else (-3, 4)
  low, high = q1 - 1.5 * np.exp(low_exp * mc) * iqr, q3 + 1.5 * np.exp(high_exp * mc) * iqr
  return np.array([(s - median) / (high - median) if s > median else (median - s) / (median - low) for s in x])


SAMPLES = {
    "normal, even": np.random.default_rng(0).normal(size=64),
    "right-skewed, odd": np.random.default_rng(1).lognormal(size=65),
    "left-skewed": -np.random.default_rng(2).lognormal(size=40),
    "ties at the median": np.round(np.random.default_rng(3).normal(size=41)),
}


@pytest.mark.parametrize("name", SAMPLES)
def test_medcouple_and_adjusted_outlyingness_match_their_definitions(name):
  x = SAMPLES[name].astype(np.float32)
  np.testing.assert_allclose(float(jax.jit(asset.medcouple)(x)), _medcouple_reference(x), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(jax.jit(asset.adjusted_outlyingness)(x), _outlyingness_reference(x), rtol=1e-4,
                             atol=1e-6)


def test_adjusted_outlyingness_marks_a_planted_tail():
  x = np.concatenate([np.random.default_rng(4).normal(0.5, 0.05, 120), [0.95, 0.97, 0.99]]).astype(np.float32)
  marked = np.flatnonzero(np.asarray(jax.jit(asset.adjusted_outlyingness)(x)) > 2)
  np.testing.assert_array_equal(marked, np.flatnonzero(_outlyingness_reference(x) > 2))
  assert {120, 121, 122} <= set(marked.tolist()) and len(marked) <= 5


def test_threshold_is_the_demos_formula_on_sklearns_gaussian_fit_of_the_lower_half():
  rng = np.random.default_rng(5)
  scores = np.concatenate([rng.normal(2.0, 0.8, 900), rng.normal(9.0, 0.5, 100)])
  lower = scores[scores <= np.quantile(scores, 0.5, method="lower")]
  fit = GaussianMixture(n_components=1, covariance_type="full").fit(lower.reshape(-1, 1))
  sd, eps = np.sqrt(fit.covariances_.item()), 1e-6
  expected = (sd * np.sqrt(-2 * np.log(eps) * sd * np.sqrt(2 * np.pi)) + fit.means_.item()) / fit.weights_.item()
  t = asset.threshold(scores, eps)
  np.testing.assert_allclose(t, expected, rtol=1e-6)
  assert (scores[900:] >= t).all() and (scores[:900] >= t).mean() < 0.02  # the high mode is flagged


def test_separating_mlp_marks_a_planted_cluster():
  rng = np.random.default_rng(6)
  base = rng.normal(size=(64, 16)).astype(np.float32)
  batch = rng.normal(size=(64, 16)).astype(np.float32)
  batch[:4] += 4.0  # a cluster the clean base set does not have
  outlyingness = jax.jit(lambda key: asset.adjusted_outlyingness(
      asset.mlp_scores(asset.fit_mlp(key, optax.adam(1e-3), batch, base, 32, 20), batch)))
  marked = np.flatnonzero(np.asarray(outlyingness(jax.random.key(0))) > 2)
  assert set(marked.tolist()) == {0, 1, 2, 3}


def _step_setup(mesh, protocol="ft_head"):
  sgd = ml_collections.ConfigDict(dict(name="sgd", lr=0.1, momentum=0.0, weight_decay=0.0))
  tx = make_optimizer(sgd, trainable=finetune.head_only if protocol == "ft_head" else None)
  graphdef, state = asset.offset_state(build_backbone(MODEL, 0), 3, HEAD, 0, tx, mesh)
  rng = np.random.default_rng(0)
  feature = rng.normal(size=(16, 8)).astype(np.float32)
  feature[:2] += 5.0  # two samples the MLP tells apart from the base batch: marked, far above the level 2
  batch = {"feature": feature, "base_feature": rng.normal(size=(8, 8)).astype(np.float32),
           "image": rng.integers(0, 256, (16, 8, 8, 3), dtype=np.uint8),
           "label": rng.integers(0, 3, 16).astype(np.int32),
           "base_image": rng.integers(0, 256, (8, 8, 8, 3), dtype=np.uint8)}
  step = asset.make_offset_step(graphdef, tx, optax.sgd(0.5), protocol, MODEL.mean, MODEL.std, 16, 10, 2.0, 2)
  return graphdef, state, jax.jit(step), parallel.put_batch(batch, mesh)


def _base_variance(graphdef, state, base_images) -> float:
  """The mean over the base batch of the logits' variance over the classes, by an independent forward (FT-head:
  inference BatchNorm)."""
  model = nnx.merge(graphdef, state.params, state.batch_stats, copy=True)
  x = augment.normalize(augment.to_float(jnp.asarray(base_images)), jnp.asarray(MODEL.mean), jnp.asarray(MODEL.std))
  return float(np.asarray(model(x), np.float64).var(axis=1, ddof=1).mean())


@pytest.mark.extended  # 26 s of CI time on 2 cores; ASSET's other tests run by default
def test_offset_step_on_eight_devices_equals_one_device_and_descends_the_base_variance():
  """FT-head, as the tiny `suspects` below (the encoder's backward passes would double the compile time)."""
  out = []
  for mesh in (jax.make_mesh((1,), ("data",), devices=jax.devices()[:1]), parallel.make_mesh()):
    graphdef, state, step, batch = _step_setup(mesh)
    variance = _base_variance(graphdef, state, jax.device_get(batch["base_image"]))
    backbone = jax.device_get(state.params["backbone"])
    state, metrics = step(state, batch, jax.random.key(0))
    metrics = jax.device_get(metrics)
    assert float(metrics["loss"]) == pytest.approx(variance, rel=1e-4)
    out.append((metrics, jax.device_get(state.params)))
  assert float(out[1][0]["marked"]) == float(out[0][0]["marked"]) == 2 / 16
  for name in ("loss", "ascent_ce", "mlp_loss"):
    assert float(out[1][0][name]) == pytest.approx(float(out[0][0][name]), rel=1e-4)
  assert_trees_close(out[1][1], out[0][1])
  assert_trees_close(out[1][1]["backbone"], backbone, rtol=0, atol=0)  # frozen


def test_offset_step_under_ft_all_keeps_the_state_structure():
  """Traced only (compiling FT-all's two encoder backward passes would double this file's time)."""
  _, state, step, batch = _step_setup(parallel.make_mesh(), "ft_all")
  out, metrics = jax.eval_shape(step, state, batch, jax.random.key(0))
  assert jax.tree.structure(out) == jax.tree.structure(state)
  assert [(a.shape, a.dtype) for a in jax.tree.leaves(out)] == [(a.shape, a.dtype) for a in jax.tree.leaves(state)]
  assert set(metrics) == {"loss", "ascent_ce", "marked", "mlp_loss", "l2_grads", "l2_params", "l2_updates"}


@pytest.mark.parametrize("change, message", [
    ({"base_batch_size": 12}, "config.baseline.asset.base_batch_size=12 is not divisible"),
    ({"threshold_eps": 1.0}, "config.baseline.asset.threshold_eps=1.0 must be below 1"),
])
def test_bad_asset_settings_fail_in_one_line(change, message):
  block = load_config("baseline:defense=asset,tiny").baseline.asset
  asset.check(block, None, np.full(10, 100), np.full(10, 10))
  block.update(change)
  with pytest.raises(UserError, match=message) as err:
    asset.check(block, None, np.full(10, 100), np.full(10, 10))
  assert "\n" not in str(err.value)


def _inputs(config, n=128, m=64):
  rng = np.random.default_rng(8)
  image = lambda k: rng.integers(0, 256, (k, 32, 32, 3), dtype=np.uint8)
  features = rng.normal(size=(n, 16)).astype(np.float32)
  return Inputs(config, parallel.make_mesh(config.mesh), "ft_head", build_backbone(config.model, 0), image(n),
                rng.integers(0, 10, n), 10, image(m), rng.integers(0, 10, m), (None, None), features,
                rng.normal(size=(m, 16)).astype(np.float32), np.zeros((n, 10), np.float32),
                np.zeros((m, 10), np.float32))


def test_suspects_are_sorted_indices_and_resume_from_the_offset_stage(tmp_path, monkeypatch):
  config = load_config("baseline:defense=asset,threat=2,attack=badnets,tiny")
  inputs, block = _inputs(config), config.baseline.asset
  removed = asset.suspects(inputs, block, Run(config, str(tmp_path)))
  assert removed.dtype == np.int64 and (np.diff(removed) > 0).all() and removed.size < 128
  assert removed.size == 0 or (0 <= removed[0] and removed[-1] < 128)
  with open(os.path.join(tmp_path, "asset_offset_ft_head", "done.json")) as f:
    assert json.load(f)["steps"] == 2  # 128 samples at batch 64, one epoch

  def no_training(*args, **kwargs):
    raise AssertionError("a finished stage trained again")

  monkeypatch.setattr(stages, "train", no_training)
  np.testing.assert_array_equal(asset.suspects(inputs, block, Run(config, str(tmp_path))), removed)


def test_a_reserve_smaller_than_a_base_batch_is_refused():
  config = load_config("baseline:defense=asset,threat=2,attack=badnets,tiny")
  with pytest.raises(UserError, match="base_batch_size=32 from the 16 reserved clean images"):
    asset.check(config.baseline.asset, config, np.full(10, 100), np.full(8, 2))
