"""RNP: mask recovery on a toy network whose answer is known, the unlearning's stop at the clean threshold (a
scripted step, and the real gradient-ascent step), the subset it trains on, pruned channels staying pruned, the
recovery step on 8 devices against 1, and bad input; `-m extended`: its `train` end to end, and resumed."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from helpers import assert_trees_close
from helpers import config as load_config
from jaxpurify import finetune, parallel, validation
from jaxpurify.defenses.baselines import _neuron_masks, _repair, rnp
from jaxpurify.defenses.baselines.inputs import Inputs
from jaxpurify.encoders import build_backbone
from jaxpurify.errors import UserError
from jaxpurify.pipeline import Run
from jaxpurify.train.state import TrainState, create_state, make_optimizer

MODEL = ml_collections.ConfigDict(dict(name="resnet10", width=4, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25),
                                       dtype="float32"))
HEAD = ml_collections.ConfigDict(dict(hidden=(16, 8), dropout=0.0))
SGD = ml_collections.ConfigDict(dict(name="sgd", lr=0.1, momentum=0.0, weight_decay=0.0))


def test_recovery_keeps_the_channel_clean_accuracy_needs_and_drops_the_one_that_works_against_it():
  # An "unlearned" toy network: logit margin = 2 (h0 m0 + h1 m1 + 0 h2). Channel 0 carries the label, channel 1 is
  # twice its opposite (a channel unlearning left working against the clean task), channel 2 feeds nothing.
  rng = np.random.default_rng(0)
  labels = rng.integers(0, 2, 64).astype(np.int32)
  signal = (2 * labels - 1) * rng.uniform(0.5, 1.5, 64)
  batch = {"h": jnp.asarray(np.stack([signal, -2 * signal, rng.normal(size=64)], 1), jnp.float32),
           "label": jnp.asarray(labels)}
  readout = jnp.asarray([[-1.0, 1.0], [-1.0, 1.0], [0.0, 0.0]])

  def masked_logits(masks, batch, key):
    del key
    return (batch["h"] * masks["layer"]) @ readout

  tx = _neuron_masks.mask_optimizer(0.2)
  state = _neuron_masks.mask_state({"layer": np.ones(3, np.float32)}, tx, parallel.make_mesh())
  step = jax.jit(rnp.make_recover_step(masked_logits, tx, alpha=0.2))
  state, first = step(state, batch, jax.random.key(0))
  assert float(first["accuracy"]) == 0.0  # every prediction wrong before the recovery
  for _ in range(100):
    state, metrics = step(state, batch, jax.random.key(0))
  masks = np.asarray(state.params["layer"])
  assert masks[0] == 1.0 and masks[1] < 0.2 and masks[2] == 1.0, masks  # clipped at 1; the harmful one falls
  assert float(metrics["accuracy"]) == 1.0


def _scripted_state():
  return TrainState(step=jnp.zeros((), jnp.int32), params=jnp.zeros(()), batch_stats={}, opt_state=(),
                    extra=rnp.unlearn_extra())


def _scripted_step(state, batch, key):
  """Counts its calls in params; its batch accuracy is the batch's."""
  del key
  return state.replace(step=state.step + 1, params=state.params + 1), {"loss": -state.params,
                                                                        "accuracy": batch["accuracy"]}


@pytest.mark.parametrize("accuracies, stop_after, epoch_accuracy", [
    ((0.9, 0.7, 0.4, 0.2, 0.1, 0.0, 0.0, 0.0), 4, 0.3),  # epoch 2's mean is 0.3 <= 0.3: stops after step 4
    ((0.9, 0.7, 0.5, 0.5, 0.4, 0.4), 6, 0.4)])  # never at or below 0.3: all 6 steps (3 epochs)
def test_unlearning_stops_after_the_first_epoch_at_or_below_the_clean_threshold(accuracies, stop_after,
                                                                                  epoch_accuracy):
  step = jax.jit(rnp.until_unlearned(_scripted_step, steps_per_epoch=2, clean_threshold=0.3))
  state, stops = _scripted_state(), stop_after < len(accuracies)
  for i, accuracy in enumerate(accuracies):
    state, metrics = step(state, {"accuracy": jnp.float32(accuracy)}, jax.random.key(0))
    assert float(metrics["stopped"]) == float(stops and i + 1 >= stop_after)
    if i + 1 > stop_after:
      assert float(metrics["loss"]) == 0.0 and float(metrics["accuracy"]) == 0.0
  assert int(state.step) == int(state.params) == stop_after
  assert int(state.extra["epochs"]) == stop_after // 2
  assert float(state.extra["epoch_accuracy"]) == pytest.approx(epoch_accuracy)
  assert bool(state.extra["stopped"]) == (stop_after < len(accuracies))


def _classifier(mesh):
  return create_state(lambda: finetune.build_classifier(build_backbone(MODEL, 0), 3, HEAD, 0), make_optimizer(SGD),
                      mesh)


def _config():
  """The tiny config with the test model's normalisation and no crop (the batches' predictions are fixed)."""
  config = load_config("baseline:defense=rnp,threat=2,attack=badnets,tiny")
  config.model.update(mean=MODEL.mean, std=MODEL.std)
  config.finetune.augment.update(padding=0, flip_prob=0.0)
  return config


def test_gradient_ascent_unlearns_until_the_threshold_and_then_leaves_the_classifier_alone():
  mesh = parallel.make_mesh()
  graphdef, model = _classifier(mesh)
  images = np.random.default_rng(1).integers(0, 256, (8, 8, 8, 3), dtype=np.uint8)
  config = _config()
  predict = jax.jit(lambda params, stats, images: jnp.argmax(_neuron_masks.logits(
      graphdef, params, stats, _neuron_masks.augmented(jax.random.key(0), images, config)), -1))
  labels = np.asarray(predict(model.params, model.batch_stats, jnp.asarray(images)))  # every prediction right
  batch = parallel.put_batch({"image": images, "label": labels.astype(np.int32)}, mesh)
  tx = make_optimizer(SGD)
  state = TrainState(jnp.zeros((), jnp.int32), model.params, model.batch_stats, tx.init(model.params),
                     rnp.unlearn_extra())
  step = jax.jit(rnp.until_unlearned(rnp.make_unlearn_step(graphdef, tx, config), 1, 0.2))
  history = []
  while not bool(state.extra["stopped"]) and len(history) < 50:
    state, metrics = step(state, batch, jax.random.key(0))
    history.append((float(metrics["ce"]), float(metrics["accuracy"])))
  assert history[0][1] == 1.0 and history[-1][1] <= 0.2 < min(acc for _, acc in history[:-1])
  assert history[-1][0] > history[0][0]  # ascent: the cross-entropy rose
  steps, params = int(state.step), jax.device_get(state.params)
  assert steps == len(history) and int(state.extra["epochs"]) == steps
  state, metrics = step(state, batch, jax.random.key(0))
  assert int(state.step) == steps and float(metrics["stopped"]) == 1.0
  assert_trees_close(jax.device_get(state.params), params, rtol=0, atol=0)


def test_subset_takes_a_fraction_of_each_class_of_the_reserve_from_its_fit_part():
  labels = np.repeat(np.arange(3), [10, 20, 7])
  fit, held = _repair.held_out(labels, 0.3, 0)
  chosen = rnp.subset(labels, fit, 0.2, 0)
  assert np.isin(chosen, fit).all() and not np.isin(chosen, held).any()
  assert np.bincount(labels[chosen]).tolist() == [2, 4, 1]  # round(0.2 x 10, 20, 7)
  assert np.bincount(labels[rnp.subset(labels, fit, 1.0, 0)]).tolist() == [7, 14, 5]  # at most the fit part


def test_pruned_channels_are_zero_in_the_original_classifier_and_grow_with_the_threshold():
  mesh = parallel.make_mesh()
  graphdef, model = _classifier(mesh)
  rng = np.random.default_rng(2)
  values = {name: rng.uniform(0, 1, len(v)).astype(np.float32) for name, v in _neuron_masks.ones(graphdef,
                                                                                                  model).items()}
  levels = _neuron_masks.thresholds(0.05, 0.9)
  for low, high in zip(levels[:-1], levels[1:]):  # a channel pruned at one threshold stays pruned at the next
    for name in values:
      kept_low, kept_high = _neuron_masks.prune_masks(values, low)[name], _neuron_masks.prune_masks(values, high)[name]
      assert not np.any(kept_high & ~kept_low)
  config = _config()
  block = config.baseline.rnp
  block.max_acc_drop = 0.99  # any accuracy passes: the sweep ends at max_threshold
  images, labels = rng.integers(0, 256, (24, 8, 8, 3), dtype=np.uint8), np.repeat(np.arange(3), 8)
  inputs = Inputs(config, mesh, "ft_all", None, images[:0], labels[:0], 3, images, labels, (graphdef, model), None,
                  None, None, None)
  state, diagnostics = _neuron_masks.prune_by_values(inputs, block, values, np.arange(24))
  assert diagnostics["threshold"] == 0.9
  pruned_bn = {paths + (k,) for name, paths in _neuron_masks.bn_paths(graphdef, model).items() for k in
               ("scale", "bias")}
  keep = _neuron_masks.prune_masks(values, 0.9)
  paths = _neuron_masks.bn_paths(graphdef, model)
  for (path, got), original in zip(jax.tree_util.tree_leaves_with_path(state.params), jax.tree.leaves(model.params)):
    key = tuple(k.key for k in path if isinstance(k, jax.tree_util.DictKey))
    if key in pruned_bn:
      name = next(n for n, p in paths.items() if p == key[:-1])
      np.testing.assert_array_equal(got, np.where(keep[name], original, 0.0))
    else:
      np.testing.assert_array_equal(got, original)
  assert diagnostics["pruned"] == {name: int((~k).sum()) for name, k in keep.items()}


def _recover_setup(mesh):
  graphdef, model = _classifier(mesh)
  tx = _neuron_masks.mask_optimizer(0.2)
  state = _neuron_masks.mask_state(_neuron_masks.ones(graphdef, model), tx, mesh)
  masked_logits = rnp.classifier_masked_logits(graphdef, _neuron_masks.bn_paths(graphdef, model), _config())
  step = jax.jit(rnp.make_recover_step(masked_logits, tx, 0.2))
  rng = np.random.default_rng(3)
  batch = parallel.put_batch({"image": rng.integers(0, 256, (8, 8, 8, 3), dtype=np.uint8),
                              "label": rng.integers(0, 3, 8).astype(np.int32)}, mesh)
  return state, step, batch | {"model": {"params": model.params, "batch_stats": model.batch_stats}}


def test_recovery_step_on_eight_devices_equals_one_device():
  out = []
  for mesh in (jax.make_mesh((1,), ("data",), devices=jax.devices()[:1]), parallel.make_mesh()):
    state, step, batch = _recover_setup(mesh)
    for _ in range(2):
      state, metrics = step(state, batch, jax.random.key(0))
    out.append((float(metrics["loss"]), jax.device_get(state.params)))
  assert out[1][0] == pytest.approx(out[0][0], rel=1e-4)
  assert_trees_close(out[1][1], out[0][1])


def test_bad_settings_fail_in_one_line():
  config = load_config("baseline:defense=rnp,threat=2,attack=badnets,tiny")
  block = config.baseline.rnp
  rnp.check(block, config, np.full(8, 16), np.full(8, 3))  # 1 of each class's fit part: 8 images, 8 devices
  with pytest.raises(UserError, match=r"fraction=0.2 gives RNP 7 reserve images, fewer than one batch over the 8 "
                                      "devices") as err:
    rnp.check(block, config, np.full(7, 16), np.full(7, 3))
  assert "\n" not in str(err.value)
  for key, value, rule in (("fraction", 1.5, r"in \(0, 1\]"), ("recover_lr", 0.0, "a number above 0"),
                           ("max_acc_drop", 1.0, r"in \[0, 1\)")):
    bad = load_config("baseline:defense=rnp,threat=2,attack=badnets,tiny", f"baseline.rnp.{key}={value}")
    with pytest.raises(UserError, match=f"config.baseline.rnp.{key} must be {rule}") as err:
      validation.check_ranges(bad)
    assert "\n" not in str(err.value)


@pytest.mark.extended  # RNP's two stages, sweep and pruning on a tiny classifier
def test_train_unlearns_recovers_prunes_the_original_and_resumes_without_training(tmp_path):
  config = load_config("baseline:defense=rnp,threat=2,attack=badnets,tiny")
  mesh = parallel.make_mesh()
  graphdef, model = _classifier(mesh)
  rng = np.random.default_rng(4)
  size = config.data.image_size
  images, labels = rng.integers(0, 256, (48, size, size, 3), dtype=np.uint8), np.repeat(np.arange(3), 16)
  inputs = Inputs(config, mesh, "ft_head", None, images[:0], labels[:0], 3, images, labels, (graphdef, model), None,
                  None, None, None)
  run = Run(config, str(tmp_path))
  _, state, diagnostics = rnp.train(inputs, config.baseline.rnp, run)
  for stage in ("rnp_unlearn_ft_head", "rnp_recover_ft_head"):
    assert run.done(stage)["examples"] == 9  # round(0.2 x 16) = 3 per class from the fit part (11 per class)
  assert {"pruned", "threshold", "held_out_acc", "unlearn_epochs", "unlearn_acc", "unlearned"} <= set(diagnostics)
  assert jax.tree.structure(state.params) == jax.tree.structure(model.params)
  assert rnp.train(inputs, config.baseline.rnp, run)[2] == diagnostics
