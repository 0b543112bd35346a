"""Label-Consistent attack against independent references: BackdoorBench's all-corners list transcribed by hand,
hand-computed pixels, a NumPy sign-gradient PGD, and the adversarial-training step on 8 devices against 1."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from helpers import assert_trees_close
from jaxpurify import parallel
from jaxpurify.errors import UserError
from jaxpurify.poisoning import defaults
from jaxpurify.poisoning import label_consistent as lc

# BackdoorBench `utils/bd_img_transform/lc.py`, trigger "all-corners": ((row, col), value), copied entry by entry.
BACKDOORBENCH_ALL_CORNERS = [
    ((0, 0), 1), ((0, 1), -1), ((0, 2), -1), ((1, 0), -1), ((1, 1), 1), ((1, 2), -1),
    ((2, 0), 1), ((2, 1), -1), ((2, 2), 1),
    ((-1, 0), 1), ((-1, 1), -1), ((-1, 2), 1), ((-2, 0), -1), ((-2, 1), 1), ((-2, 2), -1),
    ((-3, 0), 1), ((-3, 1), -1), ((-3, 2), -1),
    ((0, -1), 1), ((0, -2), -1), ((0, -3), -1), ((1, -1), -1), ((1, -2), 1), ((1, -3), -1),
    ((2, -1), 1), ((2, -2), -1), ((2, -3), 1),
    ((-1, -1), 1), ((-1, -2), -1), ((-1, -3), 1), ((-2, -1), -1), ((-2, -2), 1), ((-2, -3), -1),
    ((-3, -1), 1), ((-3, -2), -1), ((-3, -3), -1),
]


def _backdoorbench_trigger(image: np.ndarray, amplitude: float) -> np.ndarray:
  """`labelConsistentAttack.poison_from_indices` (additive mask) + `npClipAndToUint8`, on one uint8 [H, W, 3]."""
  out = image.astype(np.float32)
  for (row, col), value in BACKDOORBENCH_ALL_CORNERS:
    out[row][col] += 255 * (value * amplitude)
  return np.clip(out, 0, 255).astype(np.uint8)


# ----------------------------------------------------------------------------------------------------------------
# Trigger


def test_corner_pattern_is_backdoorbenchs_list():
  expected = np.zeros((32, 32), np.int8)
  for (row, col), value in BACKDOORBENCH_ALL_CORNERS:
    expected[row, col] = value
  np.testing.assert_array_equal(lc.corner_pattern(32, 32), expected)
  assert (expected != 0).sum() == 36


def test_full_amplitude_trigger_exact_pixels():
  image = np.full((1, 8, 8, 3), 100, np.uint8)
  image[0, :, :, 1] = 7
  out = np.asarray(jax.jit(lc.all_corners_trigger)(image))
  w, b = 255, 0  # +1 saturates to 255, -1 to 0, in every channel
  expected_corners = {  # rows 0-2 / 5-7, cols 0-2 / 5-7, written out by hand
      "top_left": [[w, b, b], [b, w, b], [w, b, w]],
      "bottom_left": [[w, b, b], [b, w, b], [w, b, w]],
      "top_right": [[b, b, w], [b, w, b], [w, b, w]],
      "bottom_right": [[b, b, w], [b, w, b], [w, b, w]],
  }
  slices = {"top_left": (slice(0, 3), slice(0, 3)), "bottom_left": (slice(5, 8), slice(0, 3)),
            "top_right": (slice(0, 3), slice(5, 8)), "bottom_right": (slice(5, 8), slice(5, 8))}
  expected = image[0].copy()
  for name, (rows, cols) in slices.items():
    expected[rows, cols] = np.asarray(expected_corners[name], np.uint8)[..., None]
  np.testing.assert_array_equal(out[0], expected)
  np.testing.assert_array_equal(out[0, 3:5], image[0, 3:5])  # the middle rows untouched


def test_reduced_amplitude_adds_and_truncates_like_backdoorbench():
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (2, 8, 8, 3), dtype=np.uint8)
  images[0, 0, 0] = (100, 200, 0)  # a +1 pixel
  images[0, 0, 1] = (100, 200, 0)  # a -1 pixel
  for amplitude in (0.5, 0.3, 0.0):
    out = np.asarray(lc.all_corners_trigger(jnp.asarray(images), amplitude))
    for i in range(2):
      np.testing.assert_array_equal(out[i], _backdoorbench_trigger(images[i], amplitude))
  out = np.asarray(lc.all_corners_trigger(jnp.asarray(images), 0.5))
  assert out[0, 0, 0].tolist() == [227, 255, 127]  # 100 + 127.5, 200 + 127.5 clipped, 0 + 127.5, truncated
  assert out[0, 0, 1].tolist() == [0, 72, 0]  # 100 - 127.5 clipped, 200 - 127.5, 0 - 127.5 clipped


def test_trigger_sharded_and_test_trigger():
  images = np.random.default_rng(1).integers(0, 256, (16, 12, 12, 3), dtype=np.uint8)
  mesh = parallel.make_mesh()
  sharded = parallel.put_batch(images, mesh)
  block = defaults.label_consistent_config(True)
  block.trigger.test_amplitude = 0.5
  out = np.asarray(jax.jit(lc.test_trigger(block, None))(sharded))
  np.testing.assert_array_equal(out, np.stack([_backdoorbench_trigger(x, 0.5) for x in images]))


def test_trigger_errors():
  with pytest.raises(UserError, match="trigger.amplitude"):
    lc.all_corners_trigger(jnp.zeros((1, 8, 8, 3), jnp.uint8), 1.5)
  with pytest.raises(UserError, match="at least 6×6"):
    lc.all_corners_trigger(jnp.zeros((1, 5, 8, 3), jnp.uint8))


# ----------------------------------------------------------------------------------------------------------------
# PGD


def _numpy_pgd(w, b, images, labels, eps, step, steps, start):
  """torchattacks' PGD on logits = flatten(x) @ w + b with the mean cross-entropy, its gradient by hand."""
  x = start.astype(np.float32)
  onehot = np.eye(w.shape[1], dtype=np.float32)[labels]
  for _ in range(steps):
    logits = x.reshape(len(x), -1) @ w + b
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    grad = ((p - onehot) / len(x)) @ w.T
    x = x + np.float32(step) * np.sign(grad).reshape(x.shape)
    x = np.clip(images + np.clip(x - images, -eps, eps), 0, 1).astype(np.float32)
  return x


@pytest.mark.parametrize("random_start", [False, True])
def test_pgd_matches_numpy_sign_gradient(random_start):
  rng = np.random.default_rng(0)
  images = rng.uniform(0, 1, (4, 3, 3, 3)).astype(np.float32)
  images[0, 0, 0] = (0.0, 1.0, 0.02)  # at the box edges
  w = rng.normal(size=(27, 5)).astype(np.float32)
  b = rng.normal(size=5).astype(np.float32)
  labels = np.array([0, 1, 2, 4])
  eps, step, steps = 0.1, 0.04, 4
  apply_fn = lambda x: x.reshape(x.shape[0], -1) @ w + b
  key = jax.random.key(3) if random_start else None
  run = jax.jit(functools.partial(lc.pgd, apply_fn, eps=eps, step_size=step, steps=steps))
  out = np.asarray(run(jnp.asarray(images), jnp.asarray(labels), key=key))
  start = images
  if random_start:
    start = np.clip(images + np.asarray(jax.random.uniform(key, images.shape, jnp.float32, -eps, eps)), 0, 1)
  np.testing.assert_allclose(out, _numpy_pgd(w, b, images, labels, eps, step, steps, start), atol=1e-6)
  assert np.abs(out - images).max() <= eps + 1e-6 and out.min() >= 0 and out.max() <= 1
  assert np.isclose(np.abs(out - images).max(), eps, atol=1e-6)  # 4 steps of 0.04 reach the ball's surface
  loss = lambda x: float(optax.softmax_cross_entropy_with_integer_labels(apply_fn(x), labels).mean())
  assert loss(out) > loss(images)


# ----------------------------------------------------------------------------------------------------------------
# Adversarial training and poisoning


def _block():
  block = defaults.label_consistent_config(True)
  block.model.width = 4
  block.num_classes = 2
  block.adv_train.update(steps=2, step_size=4 / 255)
  block.augment.update(padding=1, flip_prob=0.5)
  block.optim.update(name="adam", lr=1e-2, weight_decay=0.0, schedule="constant")
  block.train.update(batch_size=8, epochs=6)
  block.attack.update(steps=3, batch_size=16)
  return block


def _separable(n=16, size=8):
  """Class 0 dark (0..40), class 1 bright (215..255): separable far beyond ε = 8/255."""
  rng = np.random.default_rng(0)
  labels = np.arange(n) % 2
  images = rng.integers(0, 41, (n, size, size, 3)).astype(np.uint8) + (labels * 215).astype(np.uint8)[:, None,
                                                                                                       None, None]
  return images, labels


def _adversarial_loss(block, states, images, labels):
  """Mean CE after 4-step PGD (ε 8/255, no random start) on the whole set, BatchNorm in training mode, for each
  state (one compile)."""
  @jax.jit
  def loss(state):
    logits = lc.classifier(block, state, train=True)
    adv = lc.pgd(logits, jnp.asarray(images, jnp.float32) / 255, jnp.asarray(labels), 8 / 255, 2 / 255, 4)
    return optax.softmax_cross_entropy_with_integer_labels(logits(adv), jnp.asarray(labels)).mean()

  return [float(loss(state)) for state in states]


@pytest.fixture(scope="module")
def runs():
  """The adversarial training on 8 devices, to the end."""
  block, (images, labels) = _block(), _separable()
  mesh = jax.make_mesh((8,), ("data",))
  state, step, batch_fn, num_steps = lc.training(block, images, labels, 0, mesh, seed=0)
  assert int(state.step) == 0 and num_steps == 12
  initial = jax.device_get(state)
  losses = []
  for i in range(num_steps):
    state, metrics = step(state, batch_fn(i), jax.random.key(5))
    losses.append(float(metrics["loss"]))
  return dict(block=block, initial=initial, final=state, losses=losses, mesh=mesh, data=(images, labels))


@pytest.mark.extended  # 34 s
def test_adversarial_training_step_8_devices_equals_1():
  """Two steps on 1 and on 8 devices agree to float32 rounding. The comparison fixes what the mathematics fixes: SGD
  (Adam divides tiny gradients by their own RMS, turning last-bit differences into lr-sized steps) and PGD without
  steps (its sign(gradient) flips on near-zero pixel gradients), with the random start kept: the batch statistics,
  the crop, the start noise and the update are what sharding could get wrong. PGD is checked against torchattacks'
  formula below. (The first loss differs by ~4e-6 relative: XLA's convolutions sum in another order on 1-image
  shards, and ten BatchNorms of 8 images amplify it.)"""
  block, (images, labels) = _block(), _separable()
  block.adv_train.steps = 0
  block.optim.update(name="sgd", lr=0.1, momentum=0.9)
  out = {}
  for devices in (1, 8):
    mesh = jax.make_mesh((devices,), ("data",), devices=jax.devices()[:devices])
    state, step, batch_fn, _ = lc.training(block, images, labels, 0, mesh, seed=0)
    losses = []
    for i in range(2):
      state, metrics = step(state, batch_fn(i), jax.random.key(5))
      losses.append(metrics["loss"])
    out[devices] = jax.device_get((state.params, state.batch_stats, losses))
  np.testing.assert_allclose(out[8][2], out[1][2], rtol=1e-4)
  assert_trees_close(out[8][:2], out[1][:2])


def test_adversarial_training_lowers_the_adversarial_loss(runs):
  block, (images, labels) = runs["block"], runs["data"]
  before, after = _adversarial_loss(block, [runs["initial"], jax.device_get(runs["final"])], images, labels)
  assert after < 0.5 * before, (before, after)
  assert all(np.isfinite(runs["losses"]))


def test_poison_images_is_pgd_then_rounding_then_trigger(runs):
  block, state, mesh = runs["block"], runs["final"], runs["mesh"]
  images, labels = runs["data"][0][:5], runs["data"][1][:5]  # 5 rows: padded to 8 on the mesh
  out = lc.poison_images(block, state, images, labels, jax.random.key(0), mesh)
  assert out.shape == images.shape and out.dtype == np.uint8
  # The same chain, unbatched, off the mesh: eval-mode PGD against the true label, round, trigger.
  @jax.jit
  def reference(state, x, y):
    adv = lc.pgd(lc.classifier(block, state), x.astype(jnp.float32) / 255, y, 8 / 255, 1.5 / 255, 3)
    return lc.all_corners_trigger(jnp.round(adv * 255).astype(jnp.uint8))

  expected = reference(jax.device_get(state), images, labels)
  np.testing.assert_array_equal(out, np.asarray(expected))
  inner = np.abs(out[:, 3:-3].astype(int) - images[:, 3:-3])
  assert inner.max() <= 5 and inner.max() >= 4  # 3 steps of 1.5/255, rounded
  np.testing.assert_array_equal(lc.poison_images(block, state, images, labels, jax.random.key(1), mesh), out)


# ----------------------------------------------------------------------------------------------------------------
# Config


def test_default_configs_pass_the_checks_and_bad_sizes_or_labels_fail():
  for quick in (False, True):
    lc.check_config(defaults.label_consistent_config(quick), 32)
  with pytest.raises(UserError, match="6×6"):
    lc.check_config(defaults.label_consistent_config(True), 5)
  images, labels = _separable()
  with pytest.raises(UserError, match=r"num_classes is 2"):
    lc.training(_block(), images, labels + 1, 0, parallel.make_mesh(), seed=0)


@pytest.mark.parametrize("field, value, message", [
    ("model.name", "vgg", "model.name"), ("num_classes", 1, "num_classes"), ("adv_train.eps", 2.0, "adv_train.eps"),
    ("attack.steps", -1, "attack.steps"), ("attack.quantize", "floor", "attack.quantize"),
    ("attack.batch_size", 12, "attack.batch_size"), ("trigger.test_amplitude", -0.1, "trigger.test_amplitude"),
    ("optim.schedule", "step", "optim.schedule"),
])
def test_check_config_names_the_field(field, value, message):
  block = defaults.label_consistent_config(True)
  group, _, name = field.rpartition(".")
  (block[group] if group else block)[name] = value
  with pytest.raises(UserError, match=message.replace(".", r"\.")):
    lc.check_config(block, 32)


def test_a_smoke_runs_step_cap_caps_both_pgds_and_only_under_smoke():
  """`threat.py:...,smoke` keeps the full config's PGD sizes but at most limits.max_steps iterations (3): the
  full config's 100 poisoning iterations took hours on a 2-core CPU. Without the cap the config's counts stand."""
  from helpers import config
  from jaxpurify import threats
  full = threats.poison_block(config("threat:threat=2,attack=label_consistent"))
  assert (full.label_consistent.adv_train.steps, full.label_consistent.attack.steps) == (7, 100)
  smoke = config("threat:threat=2,attack=label_consistent,smoke")
  block = threats.poison_block(smoke)
  assert (block.label_consistent.adv_train.steps, block.label_consistent.attack.steps) == (3, 3)
  assert (block.label_consistent.attack.eps, block.label_consistent.train.batch_size) == (8 / 255, 128)
  assert smoke.poison.label_consistent.attack.steps == 100  # the config itself is left as written
  quick = threats.poison_block(config("threat:threat=2,attack=label_consistent,quick", "limits.max_steps=2"))
  assert (quick.label_consistent.adv_train.steps, quick.label_consistent.attack.steps) == (2, 2)
