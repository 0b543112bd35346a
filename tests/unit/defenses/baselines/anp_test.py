"""ANP: the perturbed BatchNorm forward against a NumPy BatchNorm, the masked forward against the pruned classifier,
the noise's signed ascent against its formula, the threshold sweep on a synthetic accuracy curve, and bad input;
`-m extended`: the mask step on 8 devices against 1, and its `train` end to end on a tiny classifier, resumed."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from helpers import assert_trees_close
from helpers import config as load_config
from jaxpurify import finetune, parallel, validation
from jaxpurify.defenses.baselines import _neuron_masks, _repair, anp
from jaxpurify.defenses.baselines.inputs import Inputs
from jaxpurify.encoders import build_backbone
from jaxpurify.errors import UserError
from jaxpurify.pipeline import Run
from jaxpurify.train.state import create_state, make_optimizer

MODEL = ml_collections.ConfigDict(dict(name="resnet10", width=4, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25),
                                       dtype="float32"))
HEAD = ml_collections.ConfigDict(dict(hidden=(16, 8), dropout=0.0))
SGD = ml_collections.ConfigDict(dict(name="sgd", lr=0.1, momentum=0.0, weight_decay=0.0))


def _classifier(mesh, seed=0):
  """A tiny classifier with random BatchNorm scales, biases and running statistics (not the init's 1, 0, 0, 1)."""
  graphdef, state = create_state(lambda: finetune.build_classifier(build_backbone(MODEL, seed), 3, HEAD, seed),
                                 make_optimizer(SGD), mesh)
  rng = np.random.default_rng(seed)

  def draw(path, x):  # 1-D leaves: BatchNorm scales, variances (positive), biases, means (and the head's biases)
    if x.ndim != 1:
      return x
    positive = path[-2].key in ("scale", "var")
    return jnp.asarray(rng.uniform(0.5, 1.5, x.shape) if positive else rng.normal(0, 0.3, x.shape), x.dtype)

  params = jax.tree_util.tree_map_with_path(draw, state.params)
  batch_stats = jax.tree_util.tree_map_with_path(draw, state.batch_stats)
  return graphdef, state.replace(params=parallel.put_replicated(params, mesh),
                                 batch_stats=parallel.put_replicated(batch_stats, mesh))


def _numpy_batchnorm(x, mean, var, scale, bias, scale_mult, bias_mult, eps=1e-5):
  return (x - mean) / np.sqrt(var + eps) * scale * scale_mult + bias * bias_mult


@pytest.mark.parametrize("train", [False, True])
def test_perturbed_batchnorm_is_the_numpy_batchnorm_with_scale_times_m_plus_delta_and_bias_times_1_plus_xi(train):
  graphdef, state = _classifier(parallel.make_mesh())
  paths = _neuron_masks.bn_paths(graphdef, state)
  rng = np.random.default_rng(1)
  mask, delta, xi = rng.uniform(0, 1, 4), rng.uniform(-0.4, 0.4, 4), rng.uniform(-0.4, 0.4, 4)
  params = _neuron_masks.scaled(state.params, paths, {"stem": jnp.asarray(mask + delta, jnp.float32)},
                                {"stem": jnp.asarray(1 + xi, jnp.float32)})
  bn = nnx.merge(graphdef, params, state.batch_stats).backbone.stem_bn
  x = rng.normal(size=(3, 5, 5, 4)).astype(np.float32)
  got = np.asarray(bn(jnp.asarray(x), use_running_average=not train))
  pure, stats = nnx.to_pure_dict(state.params), nnx.to_pure_dict(state.batch_stats)
  scale, bias = (np.asarray(pure["backbone"]["stem_bn"][k]) for k in ("scale", "bias"))
  mean, var = ((x.mean((0, 1, 2)), x.var((0, 1, 2))) if train else
               (np.asarray(stats["backbone"]["stem_bn"]["mean"]), np.asarray(stats["backbone"]["stem_bn"]["var"])))
  np.testing.assert_allclose(got, _numpy_batchnorm(x, mean, var, scale, bias, mask + delta, 1 + xi), rtol=1e-4,
                             atol=1e-5)
  changed = [jax.tree_util.keystr(p) for (p, a), b in zip(jax.tree_util.tree_leaves_with_path(params),
                                                           jax.tree.leaves(state.params)) if not np.array_equal(a, b)]
  assert changed == ["['backbone']['stem_bn']['bias'].value", "['backbone']['stem_bn']['scale'].value"]


def test_keep_multipliers_give_the_pruned_classifiers_logits():
  mesh = parallel.make_mesh()
  graphdef, state = _classifier(mesh)
  keep = {name: np.arange(len(v)) % 3 != 0 for name, v in _neuron_masks.ones(graphdef, state).items()}
  multipliers = {k: jnp.asarray(v, jnp.float32) for k, v in keep.items()}
  x = jnp.asarray(np.random.default_rng(2).normal(size=(8, 8, 8, 3)), jnp.float32)
  paths = _neuron_masks.bn_paths(graphdef, state)
  forward = jax.jit(lambda params, stats, multipliers: _neuron_masks.logits(
      graphdef, _neuron_masks.scaled(params, paths, multipliers, multipliers), stats, x))
  pruned = _repair.prune(graphdef, state, keep)
  ones = jax.tree.map(jnp.ones_like, multipliers)  # the pruned classifier itself, through the same compiled forward
  np.testing.assert_allclose(forward(state.params, state.batch_stats, multipliers),
                             forward(pruned.params, pruned.batch_stats, ones), rtol=1e-5, atol=1e-6)


def test_noise_takes_one_signed_ascent_step_from_its_uniform_start_and_stays_within_eps():
  eps, w = 0.4, {"a": jnp.array([2.0, -1.0, 0.5, -3.0]), "b": jnp.array([-0.1, 0.7])}

  def loss(delta, xi):  # its gradient: +w for delta, -w for xi
    return sum(jnp.sum(w[k] * delta[k]) - jnp.sum(w[k] * xi[k]) for k in w)

  key = jax.random.key(3)
  delta, xi = anp.adversarial_noise(key, loss, w, eps, steps=1)
  delta_key, xi_key = jax.random.split(key)
  for got, start_key, sign in ((delta, delta_key, 1), (xi, xi_key, -1)):
    start = anp._uniform_like(start_key, w, eps)  # pylint: disable=protected-access
    for k in w:
      assert np.all(np.abs(np.asarray(start[k])) <= eps)
      want = np.clip(np.asarray(start[k]) + eps * sign * np.sign(np.asarray(w[k])), -eps, eps)
      np.testing.assert_allclose(got[k], want, rtol=1e-6)


def test_thresholds_run_from_zero_to_the_maximum_inclusive():
  levels = _neuron_masks.thresholds(0.05, 0.9)
  assert len(levels) == 19 and levels[0] == 0.0 and levels[-1] == 0.9
  np.testing.assert_allclose(np.diff(levels), 0.05)


def test_sweep_keeps_the_largest_threshold_within_the_relative_accuracy_drop():
  values = {"a": np.array([0.0, 0.12, 0.5, 0.95]), "b": np.array([0.33, 0.71, 1.0])}
  curve = {0: 0.90, 1: 0.90, 2: 0.88, 3: 0.85, 4: 0.80, 5: 0.70, 6: 0.5, 7: 0.1}  # accuracy by channels pruned
  calls = []

  def accuracy_fn(keep):
    calls.append(keep)
    return curve[sum(int((~k).sum()) for k in keep.values())]

  levels = _neuron_masks.thresholds(0.05, 0.9)
  keep, threshold, record = _neuron_masks.sweep(values, levels, accuracy_fn, max_acc_drop=0.1)
  # 0.81 is allowed: 3 pruned (0.0, 0.12, 0.33) at 0.35, 0.40 and 0.45; 4 pruned (0.5) at 0.50 is 0.80 < 0.81
  assert threshold == 0.45 and record["held_out_acc"] == 0.85 and record["held_out_acc_unpruned"] == 0.90
  np.testing.assert_array_equal(keep["a"], [False, False, True, True])
  np.testing.assert_array_equal(keep["b"], [False, True, True])
  assert len(calls) == 1 + 5  # the unpruned model, then one per distinct pruned set (1 to 5 channels)
  assert [row[1] for row in record["sweep"]] == [1] * 3 + [2] * 4 + [3] * 3 + [4] * 5 + [5] * 4
  keep, threshold, record = _neuron_masks.sweep(values, levels, lambda k: 0.9 if all(map(np.all, k.values())) else
                                                0.1, max_acc_drop=0.1)
  assert threshold is None and all(map(np.all, keep.values())) and record["held_out_acc"] == 0.9


def test_choose_takes_the_last_level_within_the_drop_even_after_a_dip():
  assert _neuron_masks.choose([0.9, 0.7, 0.85, 0.6], base=0.9, max_acc_drop=0.1) == 2
  assert _neuron_masks.choose([0.5], base=0.9, max_acc_drop=0.1) is None
  assert _neuron_masks.choose([0.9, 0.89], base=0.9, max_acc_drop=0.0) == 0


def _step_setup(mesh):
  """The ANP step of the tiny classifier with its masks at 1, and a batch of 8."""
  graphdef, model = _classifier(mesh)
  tx = _neuron_masks.mask_optimizer(0.2)
  state = _neuron_masks.mask_state(_neuron_masks.ones(graphdef, model), tx, mesh)
  config = load_config("baseline:defense=anp,tiny")
  config.model.update(mean=MODEL.mean, std=MODEL.std)
  block = config.baseline.anp
  step = jax.jit(anp.make_step(graphdef, _neuron_masks.bn_paths(graphdef, model), tx, block, config))
  rng = np.random.default_rng(4)
  batch = parallel.put_batch({"image": rng.integers(0, 256, (8, 8, 8, 3), dtype=np.uint8),
                              "label": rng.integers(0, 3, 8).astype(np.int32)}, mesh)
  return state, step, batch | {"model": {"params": model.params, "batch_stats": model.batch_stats}}


@pytest.mark.extended  # a ResNet step compiled on 1 and 8 devices (~12 s)
def test_mask_step_on_eight_devices_equals_one_device_and_keeps_masks_in_the_unit_interval():
  out = []
  for mesh in (jax.make_mesh((1,), ("data",), devices=jax.devices()[:1]), parallel.make_mesh()):
    state, step, batch = _step_setup(mesh)
    for _ in range(2):
      state, metrics = step(state, batch, jax.random.key(0))
    out.append((jax.device_get(metrics), jax.device_get(state.params)))
  (metrics_1, masks_1), (metrics_8, masks_8) = out
  assert metrics_8["loss"] == pytest.approx(metrics_1["loss"], rel=1e-4)
  assert_trees_close(masks_8, masks_1)
  leaves = np.concatenate([np.ravel(m) for m in jax.tree.leaves(masks_8)])
  assert leaves.min() >= 0 and leaves.max() <= 1 and leaves.min() < 1  # moved, and clipped


def test_bad_settings_fail_in_one_line():
  config = load_config("baseline:defense=anp,threat=2,attack=badnets,tiny")
  block = config.baseline.anp
  anp.check(block, config, np.full(8, 16), np.full(8, 2))  # fit part: 1 per class = 8 images, 8 devices
  with pytest.raises(UserError, match="reserve's fit part, 7 images, fewer than one batch over the 8 devices"):
    anp.check(block, config, np.full(7, 16), np.full(7, 2))
  for key, value, rule in (("pgd_steps", 0, "an integer of at least 1"), ("mask_lr", 0.0, "a number above 0"),
                           ("max_acc_drop", 1.0, r"in \[0, 1\)")):
    bad = load_config("baseline:defense=anp,threat=2,attack=badnets,tiny", f"baseline.anp.{key}={value}")
    with pytest.raises(UserError, match=f"config.baseline.anp.{key} must be {rule}") as err:
      validation.check_ranges(bad)
    assert "\n" not in str(err.value)


@pytest.mark.extended  # ANP's stage, sweep and pruning on a tiny classifier; its compare cell runs in the harness
def test_train_prunes_by_the_learnt_masks_and_resumes_without_training(tmp_path):
  config = load_config("baseline:defense=anp,threat=2,attack=badnets,tiny")
  mesh = parallel.make_mesh()
  graphdef, model = _classifier(mesh)
  rng = np.random.default_rng(5)
  size = config.data.image_size
  images, labels = rng.integers(0, 256, (48, size, size, 3), dtype=np.uint8), np.repeat(np.arange(3), 16)
  inputs = Inputs(config, mesh, "ft_all", None, images[:0], labels[:0], 3, images, labels, (graphdef, model), None,
                  None, None, None)
  run = Run(config, str(tmp_path))
  _, state, diagnostics = anp.train(inputs, config.baseline.anp, run)
  assert run.done("anp_masks_ft_all")["steps"] == config.baseline.anp.iters
  assert set(diagnostics) == {"pruned", "threshold", "held_out_acc", "held_out_acc_unpruned", "sweep"}
  assert diagnostics["held_out_acc"] >= 0.9 * diagnostics["held_out_acc_unpruned"]
  values = anp.learn_masks(inputs, config.baseline.anp, run, _repair.held_out(labels, 0.3, config.seed)[0])
  threshold = -np.inf if diagnostics["threshold"] is None else diagnostics["threshold"]
  masks = _neuron_masks.prune_masks(values, threshold)  # the returned classifier is pruned at the chosen threshold
  assert_trees_close(jax.device_get(state.params), jax.device_get(_repair.prune(graphdef, model, masks).params),
                     rtol=0, atol=0)
  assert anp.train(inputs, config.baseline.anp, run)[2] == diagnostics  # resumed: the same masks and choice
