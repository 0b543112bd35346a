"""ABL: the flooding loss and its gradient against NumPy, the isolation and unlearning batch against hand-computed
values, the unlearning step raising its batch's loss, the isolation step on 8 devices against 1, and the check
(ABL's `train` runs end to end, and resumes, in tests/e2e/run_compare_test.py)."""


import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from helpers import assert_trees_close
from helpers import config as load_config
from jaxpurify import finetune, parallel
from jaxpurify.defenses.baselines import abl
from jaxpurify.encoders import build_backbone
from jaxpurify.errors import UserError
from jaxpurify.train.state import create_state, make_optimizer

MODEL = ml_collections.ConfigDict(dict(name="resnet10", width=4, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25),
                                       dtype="float32"))
HEAD = ml_collections.ConfigDict(dict(hidden=(16, 8), dropout=0.0))
AUGMENT = ml_collections.ConfigDict(dict(padding=0, flip_prob=0.0))


def test_flooding_is_the_numpy_value_and_its_gradient_flips_sign_below_the_level():
  rng = np.random.default_rng(0)
  logits = (3 * rng.normal(size=(6, 4))).astype(np.float32)
  labels = np.array([0, 1, 2, 3, 1, 2])
  shifted = logits.astype(np.float64) - logits.max(axis=1, keepdims=True)
  probs = np.exp(shifted) / np.exp(shifted).sum(axis=1, keepdims=True)
  ce = -np.log(probs[np.arange(6), labels]).mean()
  ce_grad = (probs - np.eye(4)[labels]) / 6
  flooding = lambda z, level: abl.flooded(optax.softmax_cross_entropy_with_integer_labels(z, labels).mean(), level)
  for level, sign in ((ce - 0.5, 1.0), (ce + 0.5, -1.0)):  # above the level: descent; below it: ascent
    value, grad = jax.value_and_grad(flooding)(jnp.asarray(logits), level)
    np.testing.assert_allclose(float(value), abs(ce - level) + level, rtol=1e-5)
    np.testing.assert_allclose(grad, sign * ce_grad, rtol=1e-4, atol=1e-7)


def test_isolate_takes_the_lowest_losses():
  losses = np.array([0.5, 0.1, 0.9, 0.05, 0.3, 2.0, 0.1, 0.7, 1.0, 0.2])
  np.testing.assert_array_equal(abl.isolate(losses, 0.3), [1, 3, 6])  # 0.05, then the tied 0.1s
  np.testing.assert_array_equal(abl.isolate(losses, 0.25), [1, 3])  # int(2.5) = 2; the earlier 0.1 wins the tie
  assert abl.isolate(losses, 0.05).size == 0


def test_unlearning_batch_is_the_smaller_of_the_two_split_over_the_devices():
  assert abl.unlearn_batch_size(47, 128, 1) == 47
  assert abl.unlearn_batch_size(47, 128, 8) == 40
  assert abl.unlearn_batch_size(500, 128, 8) == 128
  assert abl.unlearn_batch_size(5, 64, 8) == 0


def _setup(mesh, protocol, objective):
  """A tiny classifier under SGD 0.1 (protocol's trainable set), its jitted `finetune.make_step` of `objective`
  and a batch of 8 random 8x8 images on `mesh`."""
  encoder = build_backbone(MODEL, 0)
  tx = make_optimizer(ml_collections.ConfigDict(dict(name="sgd", lr=0.1, momentum=0.0, weight_decay=0.0)),
                      trainable=finetune.head_only if protocol == "ft_head" else None)
  graphdef, state = create_state(lambda: finetune.build_classifier(encoder, 3, HEAD, 0), tx, mesh)
  step = jax.jit(finetune.make_step(graphdef, tx, protocol, AUGMENT, MODEL.mean, MODEL.std, objective=objective))
  rng = np.random.default_rng(1)
  batch = {"image": rng.integers(0, 256, (8, 8, 8, 3), dtype=np.uint8),
           "label": rng.integers(0, 3, 8).astype(np.int32)}
  return state, step, parallel.put_batch(batch, mesh)


def test_unlearning_step_raises_the_cross_entropy_of_its_batch_and_leaves_the_frozen_encoder():
  state, step, batch = _setup(parallel.make_mesh(), "ft_head", jnp.negative)  # FT-all's step: the test below
  backbone = jax.device_get(state.params["backbone"])
  state, first = step(state, batch, jax.random.key(0))
  state, second = step(state, batch, jax.random.key(0))  # the same batch, no augmentation, no dropout
  assert float(first["loss"]) == pytest.approx(-float(first["ce"]))
  assert float(second["ce"]) > float(first["ce"]) + 1e-3
  assert_trees_close(jax.device_get(state.params["backbone"]), backbone, rtol=0, atol=0)


def test_isolation_step_on_eight_devices_equals_one_device():
  out = []
  for mesh in (jax.make_mesh((1,), ("data",), devices=jax.devices()[:1]), parallel.make_mesh()):
    state, step, batch = _setup(mesh, "ft_all", lambda ce: abl.flooded(ce, 0.5))
    state, metrics = step(state, batch, jax.random.key(0))
    out.append((float(metrics["loss"]), jax.device_get(state.params)))
  assert out[1][0] == pytest.approx(out[0][0], rel=1e-4)
  assert_trees_close(out[1][1], out[0][1])


def test_bad_isolation_fraction_fails_in_one_line():
  config = load_config("baseline:defense=abl,tiny")
  block = config.baseline.abl
  abl.check(block, config, np.full(10, 100), np.full(10, 10))
  block.isolation_fraction = 1.0
  with pytest.raises(UserError, match="config.baseline.abl.isolation_fraction must be below 1") as err:
    abl.check(block, config, np.full(10, 100), np.full(10, 10))
  assert "\n" not in str(err.value)


def test_an_isolated_set_smaller_than_one_batch_is_refused():
  config = load_config("baseline:defense=abl,threat=2,attack=badnets,tiny")  # 1% of 128: 1 sample, 8 devices
  with pytest.raises(UserError, match=r"isolation_fraction=0.01 isolates 1 of 128 samples.*at least 0.0625"):
    abl.check(config.baseline.abl, config, np.full(8, 16), np.full(8, 2))
