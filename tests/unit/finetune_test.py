"""FT-head and FT-all: the frozen encoder, sharded == single-device, the loss, an objective of it, learning, and
encoder masks."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from flax import nnx

from helpers import assert_trees_close
from jaxpurify import augment, finetune, parallel
from jaxpurify.encoders import build_backbone
from jaxpurify.train.state import create_state, make_optimizer

MODEL = ml_collections.ConfigDict(dict(name="resnet10", width=4, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25),
                                       dtype="float32"))
HEAD = ml_collections.ConfigDict(dict(hidden=(16, 8), dropout=0.5))


def _images(n=8, size=8, seed=0):
  return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


def _setup(protocol, mesh, num_classes=3, **step_options):
  """-> (encoder, graphdef, state, jitted step) of a tiny classifier under SGD; step_options go to make_step."""
  encoder = build_backbone(MODEL, 0)
  tx = make_optimizer(ml_collections.ConfigDict(dict(name="sgd", lr=0.1, weight_decay=5e-4, momentum=0.9)),
                      trainable=finetune.head_only if protocol == "ft_head" else None)
  graphdef, state = create_state(lambda: finetune.build_classifier(encoder, num_classes, HEAD, 0), tx, mesh)
  aug = ml_collections.ConfigDict(dict(padding=1, flip_prob=0.5))
  step = jax.jit(finetune.make_step(graphdef, tx, protocol, aug, MODEL.mean, MODEL.std, **step_options),
                 donate_argnums=0)
  return encoder, graphdef, state, step


def _batch(mesh, n=16, seed=0):
  batch = {"image": _images(n, 8, seed), "label": (np.arange(n) % 3).astype(np.int32)}
  return parallel.put_batch(batch, mesh)


@pytest.mark.parametrize("protocol", finetune.PROTOCOLS)
def test_step_on_8_devices_equals_one_device(protocol):
  out = {}
  for devices in (1, 8):
    mesh = jax.make_mesh((devices,), ("data",), devices=jax.devices()[:devices])
    _, _, state, step = _setup(protocol, mesh)
    for i in range(2):
      state, metrics = step(state, _batch(mesh, seed=i), jax.random.key(5))
    out[devices] = jax.device_get((state.params, state.batch_stats, metrics["loss"]))
  np.testing.assert_allclose(out[8][2], out[1][2], rtol=1e-4)
  assert_trees_close(out[8][:2], out[1][:2])


def test_ft_head_leaves_the_encoder_unchanged_and_ft_all_trains_it():
  mesh = parallel.make_mesh()
  changed = {}
  for protocol in finetune.PROTOCOLS:
    encoder, _, state, step = _setup(protocol, mesh)
    before = jax.device_get((state.params["backbone"], state.batch_stats["backbone"], state.params["head"]))
    state, _ = step(state, _batch(mesh), jax.random.key(0))
    after = jax.device_get((state.params["backbone"], state.batch_stats["backbone"], state.params["head"]))
    changed[protocol] = [not all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))
                         for a, b in zip(before, after)]
    np.testing.assert_array_equal(jax.tree.leaves(before[0])[0], jax.tree.leaves(encoder.params)[0])
  assert changed["ft_head"] == [False, False, True]  # backbone weights, BN statistics, head
  assert changed["ft_all"] == [True, True, True]


def test_loss_is_the_cross_entropy_of_the_model_on_the_augmented_batch():
  """The step's loss equals optax's cross-entropy of an independent forward on the same augmented images."""
  mesh = parallel.make_mesh()
  _, graphdef, state, step = _setup("ft_head", mesh)
  batch, key = _batch(mesh), jax.random.key(7)
  params, stats = jax.device_get((state.params, state.batch_stats))
  _, metrics = step(state, batch, key)
  aug_key, drop_key = jax.random.split(jax.random.fold_in(key, 0))
  images = augment.crop_flip(aug_key, jnp.asarray(_images(16, 8, 0)), 1, 0.5)
  x = (np.asarray(images, np.float32) / 255 - 0.5) / 0.25
  model = nnx.merge(graphdef, params, stats)
  logits = model(jnp.asarray(x), dropout_key=drop_key)
  expected = optax.softmax_cross_entropy_with_integer_labels(logits, np.arange(16) % 3).mean()
  np.testing.assert_allclose(float(metrics["loss"]), float(expected), rtol=1e-5)


def test_no_objective_is_the_cross_entropy_step_and_an_objective_is_the_loss_of_the_cross_entropy():
  """objective=None and no objective give identical steps; with an objective, loss = objective(ce), ce is the
  plain step's loss, and the plain step reports no ce."""
  mesh = parallel.make_mesh()
  flooded = lambda ce: jnp.abs(ce - 5.0) + 5.0
  out = {}
  for name, options in (("absent", {}), ("none", {"objective": None}), ("flooded", {"objective": flooded})):
    _, _, state, step = _setup("ft_head", mesh, **options)
    state, metrics = step(state, _batch(mesh), jax.random.key(3))
    out[name] = jax.device_get((state.params, metrics))
  assert_trees_close(out["none"], out["absent"], rtol=0, atol=0)
  plain, metrics = out["absent"][1], out["flooded"][1]
  assert "ce" not in plain
  np.testing.assert_allclose(metrics["ce"], plain["loss"], rtol=1e-6)
  np.testing.assert_allclose(metrics["loss"], flooded(metrics["ce"]), rtol=1e-6)


def test_ft_head_fits_a_small_labelled_set_and_predict_reads_its_labels():
  mesh = parallel.make_mesh()
  _, graphdef, state, step = _setup("ft_head", mesh, num_classes=2)
  images = np.zeros((16, 8, 8, 3), np.uint8)
  images[8:] = 255  # class 1: white, class 0: black
  labels = np.repeat(np.arange(2), 8).astype(np.int32)
  batch = parallel.put_batch({"image": images, "label": labels}, mesh)
  for i in range(30):
    state, _ = step(state, batch, jax.random.key(i))
  predicted = finetune.predict(finetune.predict_fn(graphdef, state, MODEL.mean, MODEL.std), images, 8, mesh)
  np.testing.assert_array_equal(predicted, labels)
  flipped = finetune.predict(finetune.predict_fn(graphdef, state, MODEL.mean, MODEL.std, lambda x: 255 - x),
                             images, 8, mesh)
  np.testing.assert_array_equal(flipped, 1 - labels)
