"""T-Core: confusion training's pieces against hand-computed values, the confusion step against an independent
loss and on 1 vs 8 devices, bootstrapping's admission rule and the config checks (the pipeline end to end is in
threat_test.py, beside the threat harness it builds on)."""


import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from flax import nnx

from configs import tcore as tcore_config
from helpers import assert_trees_close
from jaxpurify import augment, finetune, parallel, validation
from jaxpurify.defenses import tcore
from jaxpurify.defenses.tcore import bootstrap, confusion
from jaxpurify.evaluation.metrics import detection, poison_counts
from jaxpurify.encoders import build_backbone
from jaxpurify.errors import UserError
from jaxpurify.train.state import create_state

MODEL = ml_collections.ConfigDict(dict(name="resnet10", width=4, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25),
                                       dtype="float32"))
HEAD = ml_collections.ConfigDict(dict(hidden=(16, 8), dropout=0.0))
AUGMENT = ml_collections.ConfigDict(dict(padding=0, flip_prob=0.0))


def test_class_weights_are_one_over_sqrt_frequency():
  weights = confusion.class_weights(np.array([0, 0, 0, 1]), 3)
  np.testing.assert_allclose(weights, [1 / np.sqrt(0.751), 1 / np.sqrt(0.251), 1 / np.sqrt(0.001)], rtol=1e-6)


def test_confused_labels_never_repeat_the_prediction_and_visit_every_other_class():
  pred = jnp.array([0, 3, 4])
  seen = np.stack([np.asarray(confusion.confused_labels(pred, jnp.int32(s), 5)) for s in range(8)])
  assert not (seen == np.asarray(pred)).any()
  for i, p in enumerate([0, 3, 4]):
    assert set(seen[:4, i]) == set(range(5)) - {p}


def test_sample_losses_match_optax():
  logits = np.random.default_rng(0).normal(size=(6, 4)).astype(np.float32) * 5
  labels = np.array([0, 1, 2, 3, 0, 1])
  np.testing.assert_allclose(confusion.sample_losses(logits, labels),
                             optax.softmax_cross_entropy_with_integer_labels(logits, labels), rtol=1e-5)


def test_distill_keeps_the_lowest_losses_and_tops_up_each_class():
  losses = np.array([0.1, 0.2, 0.3, 5.0, 6.0, 0.05, 7.0, 8.0])
  labels = np.array([0, 0, 0, 1, 1, 0, 2, 2])
  # lowest round(0.25 * 8) = 2: positions 5 and 0; top-up to 1 per class adds 3 (class 1) and 6 (class 2)
  np.testing.assert_array_equal(confusion.distill(losses, labels, 0.25, 1), [0, 3, 5, 6])


def test_split_trusted_leaves_out_the_low_loss_region_and_caps_each_class():
  losses = np.array([0.1, 3.0, 2.0, 1.0, 0.2, 4.0, 5.0, 0.3])
  labels = np.array([0, 0, 0, 0, 1, 1, 1, 1])
  seeds = np.array([2])
  trusted, suspected = confusion.split_trusted(losses, labels, seeds, 0.25, 0.5, 0.0)
  np.testing.assert_array_equal(suspected, [0, 4])  # the two lowest of eight
  # class 0: room 2 (cap 0.5 * 4) - 1 seed = 1 -> highest loss outside: 1; class 1: 6 and 5
  np.testing.assert_array_equal(trusted, [1, 2, 5, 6])
  # a seed inside the suspected region loses its trust (and its place in the cap): class 0 gets 1 and 2
  trusted, _ = confusion.split_trusted(losses, labels, np.array([0]), 0.25, 0.5, 0.0)
  np.testing.assert_array_equal(trusted, [1, 2, 5, 6])
  # ... unless it is within its class's floor of seeds (the highest-loss ones): seeds 0 and 3 of class 0, floor 1
  # keeps 3 (outside anyway) and drops 0; floor 1.0 keeps both, leaving no room in class 0's cap of 2
  trusted, _ = confusion.split_trusted(losses, labels, np.array([0, 3]), 0.25, 0.5, 0.5)
  np.testing.assert_array_equal(trusted, [1, 3, 5, 6])
  trusted, _ = confusion.split_trusted(losses, labels, np.array([0, 3]), 0.25, 0.5, 1.0)
  np.testing.assert_array_equal(trusted, [0, 3, 5, 6])


def test_admit_takes_confident_agreeing_samples_up_to_the_fraction():
  logits = np.log(np.array([[0.95, 0.05], [0.99, 0.01], [0.6, 0.4], [0.02, 0.98], [0.97, 0.03], [0.01, 0.99]]))
  labels = np.array([0, 0, 0, 1, 1, 1])
  # class 0: trusted {0}; fraction 1 -> room 2; 1 agrees at 0.99, 2 is under the threshold.
  # class 1: 4 disagrees (predicted 0); 3 (0.98) and 5 (0.99) agree, room 3.
  everyone = np.arange(6)
  np.testing.assert_array_equal(bootstrap.admit(logits, labels, np.array([0]), everyone, 1.0, 0.9), [0, 1, 3, 5])
  np.testing.assert_array_equal(bootstrap.admit(logits, labels, np.array([0]), everyone, 0.34, 0.9), [0, 5])
  # samples outside the pool (suspected) are never admitted
  np.testing.assert_array_equal(bootstrap.admit(logits, labels, np.array([0]), np.array([1, 3]), 1.0, 0.9), [0, 1, 3])


def test_poison_counts_and_detection():
  assert poison_counts(np.array([1, 2, 3, 4]), np.array([2, 9])) == {"count": 4, "poisoned": 1,
                                                                           "purity": 0.75}
  out = detection(np.array([2, 3]), np.array([2, 9, 10]))
  assert out["suspected"] == 2 and out["precision"] == 0.5 and out["recall"] == pytest.approx(1 / 3)


def _confusion_setup(mesh, lam=4.0):
  encoder = build_backbone(MODEL, 0)
  tx = optax.sgd(0.1, momentum=0.7)
  graphdef, state = create_state(lambda: finetune.build_classifier(encoder, 3, HEAD, 0), tx, mesh)
  step = confusion.make_confusion_step(graphdef, tx, "all", AUGMENT, MODEL.mean, MODEL.std, lam, 3)
  rng = np.random.default_rng(1)
  batch = {"image": rng.integers(0, 256, (8, 8, 8, 3), dtype=np.uint8), "label": rng.integers(0, 3, 8).astype(np.int32),
           "weight": rng.uniform(0.5, 2, 8).astype(np.float32),
           "seed_image": rng.integers(0, 256, (8, 8, 8, 3), dtype=np.uint8),
           "seed_pred": rng.integers(0, 3, 8).astype(np.int32)}
  return graphdef, state, step, batch


def test_confusion_loss_is_the_weighted_mix_of_an_independent_forward():
  mesh = parallel.make_mesh([("data", -1)])
  lam = 4.0
  graphdef, state, step, batch = _confusion_setup(mesh, lam)
  model = nnx.merge(graphdef, state.params, state.batch_stats, copy=True)
  x = augment.normalize(augment.to_float(jnp.concatenate([batch["image"], batch["seed_image"]])),
                        jnp.asarray(MODEL.mean), jnp.asarray(MODEL.std))
  logits = np.asarray(model(x, train_backbone=True), np.float64)
  confused = (batch["seed_pred"] + 1) % 3  # step 0
  ce = confusion.sample_losses(logits[:8], batch["label"])
  distilled = np.sum(batch["weight"] * ce) / np.sum(batch["weight"])
  confusing = confusion.sample_losses(logits[8:], confused).mean()
  _, metrics = jax.jit(step)(state, parallel.put_batch(batch, mesh), jax.random.key(0))
  np.testing.assert_allclose(float(metrics["loss"]), ((lam - 1) * confusing + distilled) / lam, rtol=1e-4)


def test_confusion_step_on_eight_devices_equals_one_device():
  out = []
  for mesh in (jax.make_mesh((1,), ("data",), devices=jax.devices()[:1]), parallel.make_mesh()):
    _, state, step, batch = _confusion_setup(mesh)
    state, metrics = jax.jit(step)(state, parallel.put_batch(batch, mesh), jax.random.key(0))
    out.append((float(metrics["loss"]), jax.device_get(state.params)))
  assert out[1][0] == pytest.approx(out[0][0], rel=1e-4)
  assert_trees_close(out[1][1], out[0][1])


# ---------------------------------------------------------------------------------------------------------------
# Config and checks


def test_tcore_config_wires_threat_protocol_and_components():
  config = tcore_config.get_config("threat=3,attack=blended,protocol=both,quick")
  assert config.experiment == "tcore" and config.threat == 3 and config.poison.attack == "blended"
  assert tuple(config.finetune.protocols) == ("ft_head", "ft_all")
  assert len(config.tcore.expand.ratios) == len(config.tcore.expand.iters) == len(config.tcore.expand.lambdas)
  full = tcore_config.get_config("threat=2,attack=badnets")
  assert tuple(full.tcore.expand.lambdas) == (20.0, 20.0, 20.0, 30.0, 30.0)  # Confusion Training's CIFAR-10
  assert full.tcore.filter.u == 3.0 and full.tcore.filter.std_ddof == 1  # CLP's


@pytest.mark.parametrize("change, message", [
    ({"skip": ("sift", "expand")}, "no trusted core"),
    ({"skip": ("prune",)}, "unknown T-Core component"),
    ({"filter.u": 0.0}, "config.tcore.filter.u must be a number above 0"),
    ({"filter.u_grid": (2.0, -1.0)}, r"config.tcore.filter.u_grid must be a number above 0, got \(2.0, -1.0\)"),
    ({"sift.seeds_per_class": 500}, "seed budget"),
    ({"expand.iters": (10,)}, "one per round"),
])
def test_bad_tcore_settings_fail_in_one_line(change, message):
  config = tcore_config.get_config("threat=2,attack=badnets,quick")
  for key, value in change.items():
    *parents, leaf = key.split(".")
    block = config.tcore
    for part in parents:
      block = block[part]
    block[leaf] = value
  labels = np.repeat(np.arange(10), 100)
  with pytest.raises(UserError, match=message) as err:
    validation.check_ranges(config)  # what experiments.check runs first
    tcore.check(config, labels, 10)
  assert "\n" not in str(err.value)
