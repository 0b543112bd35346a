"""Input-aware dynamic backdoor against independent references: NumPy formulas for the threshold, the trigger
combination, the rounding, the diversity loss, torch's bilinear upsampling and the stage-1 loss, the reference's
layer list transcribed by hand, and the training step on 8 devices (both stages computed, one selected) against
1 device (`jax.lax.cond`) in both stages."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from helpers import assert_trees_close
from jaxpurify import augment, parallel
from jaxpurify.data.device import epoch_order
from jaxpurify.errors import UserError
from jaxpurify.poisoning import defaults
from jaxpurify.poisoning import input_aware as ia

EPSILON = 1e-7  # the reference's `_EPSILON`


def _np_squash(z):
  return np.tanh(z) / (2 + EPSILON) + 0.5


def _np_threshold(m):
  return np.tanh(m * 20 - 10) / (2 + EPSILON) + 0.5


# ----------------------------------------------------------------------------------------------------------------
# Trigger arithmetic


def test_threshold_and_squash_match_numpy():
  m = np.linspace(-0.5, 1.5, 81).astype(np.float32).reshape(1, 9, 9, 1)
  np.testing.assert_allclose(np.asarray(jax.jit(ia.threshold)(m)), _np_threshold(m.astype(np.float64)), atol=1e-6)
  np.testing.assert_allclose(np.asarray(jax.jit(ia.squash)(4 * m)), _np_squash(4 * m.astype(np.float64)), atol=1e-6)
  assert float(ia.threshold(jnp.float32(0.5))) == pytest.approx(0.5, abs=1e-7)  # the step sits at m = 0.5
  assert float(ia.threshold(jnp.float32(0.0))) < 1e-6 and float(ia.threshold(jnp.float32(1.0))) > 1 - 1e-6


def test_combine_matches_numpy():
  rng = np.random.default_rng(0)
  x, pattern = rng.uniform(0, 1, (2, 2, 4, 4, 3)).astype(np.float32)
  mask = rng.uniform(0, 1, (2, 4, 4, 1)).astype(np.float32)
  out = np.asarray(jax.jit(ia.combine)(x, pattern, mask))
  np.testing.assert_allclose(out, x + (pattern - x) * mask, rtol=1e-6, atol=1e-7)
  np.testing.assert_array_equal(np.asarray(ia.combine(x, pattern, np.zeros_like(mask))), x)  # mask 0: the image
  np.testing.assert_allclose(np.asarray(ia.combine(x, pattern, np.ones_like(mask))), pattern, atol=1e-7)


def test_quantize_clips_then_rounds_half_to_even():
  halves = np.float32([0.5, 1.5, 2.5, 3.5]) / np.float32(255)  # 255 x is exactly k + 0.5 in float32
  x = np.concatenate([np.float32([-0.1, 0.0, 0.25, 1.0, 1.2]), halves])
  out = np.asarray(ia.quantize(jnp.asarray(x)))
  assert out.dtype == np.uint8
  assert out.tolist() == [0, 0, 64, 255, 255, 0, 2, 2, 4]  # 63.75 -> 64; halves to the even neighbour


def test_diversity_loss_matches_numpy():
  rng = np.random.default_rng(1)
  x1, x2 = rng.normal(size=(2, 3, 4, 4, 3)).astype(np.float32)
  p1, p2 = rng.uniform(0, 1, (2, 3, 4, 4, 1)).astype(np.float32)
  eps = 1e-7

  def rms(a, b):
    return np.sqrt(np.mean((a.astype(np.float64) - b) ** 2, axis=(1, 2, 3)))

  expected = np.mean(rms(x1, x2) / (rms(p1, p2) + eps))
  out = float(jax.jit(ia.diversity_loss, static_argnums=4)(x1, x2, p1, p2, eps))
  assert out == pytest.approx(expected, rel=1e-5)
  same = float(ia.diversity_loss(x1, x2, p1, p1, 0.5))  # equal patterns: ‖x1 − x2‖ / ε
  assert same == pytest.approx(np.mean(rms(x1, x2)) / 0.5, rel=1e-5)


# ----------------------------------------------------------------------------------------------------------------
# Networks


@pytest.mark.parametrize("out_channels", [3, 1])
def test_generator_layers_are_the_references(out_channels):
  """BackdoorBench `InputAwareGenerator` (CIFAR-10: channel_init 32, steps 3), its Conv2dBlocks in order."""
  reference = [(3, 32), (32, 32), (32, 64), (64, 64), (64, 128), (128, 128), (128, 128),
               (128, 128), (128, 64), (64, 64), (64, 32), (32, 32), (32, out_channels)]
  net = nnx.eval_shape(lambda: ia.Generator((32, 64, 128), out_channels, rngs=nnx.Rngs(0)))
  blocks = [node for _, node in nnx.iter_graph(net) if isinstance(node, ia.ConvBlock)]
  assert [(b.conv.in_features, b.conv.out_features) for b in blocks] == reference
  assert [b.relu for b in blocks] == [True] * 12 + [False]
  assert all(b.conv.kernel_size == (3, 3) and b.bn.momentum == 0.95 for b in blocks)


def _torch_bilinear_x2_weights(n: int) -> np.ndarray:
  """[2n, n]: torch `Upsample(scale_factor=2, mode='bilinear')` (align_corners=False) along one axis, by its formula:
  source = max((out + 0.5) / 2 − 0.5, 0), linear between floor(source) and the next pixel (clamped at the edge)."""
  out = np.arange(2 * n)
  source = np.maximum((out + 0.5) / 2 - 0.5, 0)
  low = np.floor(source).astype(int)
  frac = source - low
  weights = np.zeros((2 * n, n))
  np.add.at(weights, (out, low), 1 - frac)
  np.add.at(weights, (out, np.minimum(low + 1, n - 1)), frac)
  return weights


def test_up_and_down_sampling_match_torch_formulas():
  x = np.random.default_rng(2).normal(size=(2, 4, 6, 3)).astype(np.float32)
  expected = np.einsum("Hh,bhwc,Ww->bHWc", _torch_bilinear_x2_weights(4), x, _torch_bilinear_x2_weights(6))
  np.testing.assert_allclose(np.asarray(jax.jit(ia._up)(x)), expected, atol=1e-5)
  pooled = x.reshape(2, 2, 2, 3, 2, 3).max(axis=(2, 4))  # MaxPool2d(2, 2)
  np.testing.assert_array_equal(np.asarray(jax.jit(ia._down)(x)), pooled)


# ----------------------------------------------------------------------------------------------------------------
# The training step


def _block():
  block = defaults.input_aware_config(True)
  block.model.update(name="resnet10", width=4)  # the surrogate classifier
  block.num_classes = 3
  block.widths = (4,)
  block.pratio = 0.25  # 4 backdoor rows, 4 cross rows, their 4 sources, 4 clean rows in a batch of 16
  block.augment.update(padding=1, flip_prob=0.5)
  block.train.update(batch_size=16, mask_epochs=1, epochs=1)
  # G's and M's conv biases feed BatchNorm, so their true gradient is 0 and Adam would turn its float noise into
  # updates of ±lr that differ between meshes: SGD (momentum, as C) keeps the comparison within float tolerance.
  for name in ("generator", "mask"):
    block.optim[name].update(name="sgd", momentum=0.9)
  block.poison_batch_size = 16
  return block


def _data():
  rng = np.random.default_rng(0)
  return rng.integers(0, 256, (32, 8, 8, 3), dtype=np.uint8), np.arange(32) % 3


def _two_steps(devices: int, use_cond: bool) -> dict:
  """Step 0 (stage 1) then step 2 (stage 2, the first after the 2 mask steps) on `devices` devices: with
  `jax.lax.cond` (the default on accelerators) or with the CPU default (both stages computed, one selected)."""
  block, (images, labels) = _block(), _data()
  mesh = jax.make_mesh((devices,), ("data",), devices=jax.devices()[:devices])
  state, step, batch_fn, num_steps = ia.training(block, images, labels, 1, mesh, seed=0)
  assert num_steps == 4 and int(state.step) == 0
  if use_cond:
    txs = {name: ia.make_optimizer(block.optim[name], 2) for name in ia.NETS}
    step = jax.jit(ia.make_step(ia._graphdefs(block), txs, block, 1, 16, 2, use_cond=True), donate_argnums=0)
  key = jax.random.key(3)
  initial = jax.device_get(state)
  state, first = step(state, batch_fn(0), key)
  after_first = jax.device_get((state, first))
  state = state.replace(step=jax.device_put(np.int32(2), parallel.replicated(mesh)))
  state, second = step(state, batch_fn(2), key)
  return dict(initial=initial, first=after_first, second=jax.device_get((state, second)), state=state)


@pytest.fixture(scope="module")
def run_1():
  """1 device, `jax.lax.cond`; its final state replicated over 8 devices for the poisoning test."""
  mesh = jax.make_mesh((8,), ("data",))
  run = _two_steps(1, use_cond=True)
  return dict(run, state=jax.device_put(run["state"], parallel.replicated(mesh)), mesh=mesh, block=_block(),
              data=_data())


@pytest.fixture(scope="module")
def run_8():
  return _two_steps(8, use_cond=False)


def _leaves(tree):
  return [np.asarray(leaf) for leaf in jax.tree.leaves(tree)]


@pytest.mark.extended  # 30 s more of compilation
@pytest.mark.parametrize("stage", ["first", "second"])
def test_step_8_devices_equals_1_device(run_1, run_8, stage):
  (state8, metrics8), (state1, metrics1) = run_8[stage], run_1[stage]
  for part in ("params", "batch_stats", "opt_state"):
    for name in ia.NETS:
      one = getattr(state1, part)[name]
      # A conv bias that feeds BatchNorm has a true gradient of 0: its momentum trace holds float noise alone, whose
      # size follows the net's other gradients (M's traces reach ~50 with λ_norm = 100).
      scale = max([0.0] + [float(np.linalg.norm(leaf)) for leaf in _leaves(one)])
      assert_trees_close(getattr(state8, part)[name], one, atol=1e-6 + 1e-5 * scale)
  assert int(state8.step) == int(state1.step)
  assert metrics8.keys() == metrics1.keys()
  for name in metrics8:
    np.testing.assert_allclose(metrics8[name], metrics1[name], rtol=1e-4, atol=1e-5, err_msg=name)


@pytest.mark.parametrize("devices", [pytest.param(8, marks=pytest.mark.extended), 1])
def test_stage_1_trains_only_m_and_stage_2_only_c_and_g(request, devices):
  run = request.getfixturevalue(f"run_{devices}")
  initial, (first, m1), (second, m2) = run["initial"], run["first"], run["second"]
  block = _block()

  def same(a, b, name):
    for part in ("params", "batch_stats", "opt_state"):
      for x, y in zip(_leaves(getattr(a, part)[name]), _leaves(getattr(b, part)[name]), strict=True):
        np.testing.assert_array_equal(x, y, err_msg=f"{name} {part}")

  def changed(a, b, name):
    assert any(not np.array_equal(x, y) for x, y in zip(_leaves(a.params[name]), _leaves(b.params[name]))), name

  assert float(m1["stage"]) == 1 and float(m2["stage"]) == 2
  for name in ("classifier", "generator"):
    same(initial, first, name)
    changed(first, second, name)
  changed(initial, first, "mask")
  same(first, second, "mask")
  assert float(m1["loss"]) == pytest.approx(
      block.lambda_norm * float(m1["loss_norm"]) + block.lambda_div * float(m1["loss_div"]), rel=1e-5)
  assert float(m2["loss"]) == pytest.approx(float(m2["loss_ce"]) + block.lambda_div * float(m2["loss_div"]),
                                            rel=1e-5)
  assert float(m1["loss_ce"]) == 0 and float(m2["loss_norm"]) == 0
  assert int(first.step) == 1 and int(second.step) == 3


def test_stage_1_loss_matches_numpy(run_1):
  """The first step's loss rebuilt outside the step: batch 0 of the (seed 0, epoch 0) order, the step's crop and
  flip, M in training mode on the batch and on its partner (the batch rolled by B/2), the rest in NumPy."""
  block, (images, _) = run_1["block"], run_1["data"]
  initial, (_, metrics) = run_1["initial"], run_1["first"]
  rows = epoch_order(0, 0, len(images))[:16]
  x = np.asarray(augment.to_float(augment.crop_flip(jax.random.fold_in(jax.random.key(3), 0), jnp.asarray(images[rows]),
                                            block.augment.padding, block.augment.flip_prob)), np.float64)
  x2 = x[(np.arange(16) + 8) % 16]
  graphdef = nnx.split(nnx.eval_shape(lambda: ia.Generator(block.widths, 1, rngs=nnx.Rngs(0))), nnx.Param,
                       nnx.BatchStat)[0]
  net = nnx.merge(graphdef, *jax.tree.map(jnp.asarray, (initial.params["mask"], initial.batch_stats["mask"])))
  normalize = lambda v: (v - np.asarray(block.model.mean)) / np.asarray(block.model.std)
  m1, m2 = (_np_threshold(np.asarray(net(jnp.asarray(normalize(v), jnp.float32), train=True), np.float64))
            for v in (x, x2))
  norm = np.mean(np.maximum(m1 - block.mask_density, 0))
  rms = lambda a, b: np.sqrt(np.mean((a - b) ** 2, axis=(1, 2, 3)))
  div = np.mean(rms(normalize(x), normalize(x2)) / (rms(m1, m2) + block.epsilon))
  assert float(metrics["loss_norm"]) == pytest.approx(norm, rel=1e-4, abs=1e-7)
  assert float(metrics["loss_div"]) == pytest.approx(div, rel=1e-4)
  assert float(metrics["loss"]) == pytest.approx(block.lambda_norm * norm + block.lambda_div * div, rel=1e-4)


# ----------------------------------------------------------------------------------------------------------------
# Poisoning


def _numpy_pattern(block, state, images, sources):
  """x + (G(s) − x) · threshold(M(s)) in float64 NumPy from the networks' outputs, then clip and round half-even."""
  host = jax.device_get(state)
  nets = {}
  for name, channels in (("generator", 3), ("mask", 1)):
    abstract = nnx.eval_shape(lambda: ia.Generator(block.widths, channels, rngs=nnx.Rngs(0)))
    graphdef = nnx.split(abstract, nnx.Param, nnx.BatchStat)[0]
    nets[name] = nnx.merge(graphdef, host.params[name], host.batch_stats[name])
  s = (sources / 255.0 - np.asarray(block.model.mean)) / np.asarray(block.model.std)
  pattern = np.asarray(nets["generator"](jnp.asarray(s, jnp.float32)), np.float64)
  mask = _np_threshold(np.asarray(nets["mask"](jnp.asarray(s, jnp.float32)), np.float64))
  assert pattern.shape == images.shape and 0 < pattern.min() and pattern.max() < 1
  x = images / 255.0
  return np.round(np.clip((x + (pattern - x) * mask) * 255, 0, 255)).astype(np.uint8)


def test_poison_images_test_trigger_and_cross_patterns(run_1):
  block, state, mesh = run_1["block"], run_1["state"], run_1["mesh"]
  images = run_1["data"][0][:16]
  poisoned = ia.poison_images(block, state, images, run_1["data"][1][:16], jax.random.key(0), mesh)
  assert poisoned.shape == images.shape and poisoned.dtype == np.uint8
  expected = _numpy_pattern(block, state, images, images)
  assert np.abs(poisoned.astype(int) - expected).max() <= 1 and np.mean(poisoned == expected) > 0.99
  assert np.any(poisoned != images)  # the trigger changes the images
  triggered = jax.jit(ia.test_trigger(block, state))(parallel.put_batch(images, mesh))
  np.testing.assert_array_equal(np.asarray(triggered), poisoned)
  sources = images[::-1]
  # the harness's call: host arrays, the state (replicated on the 8-device mesh) closed over
  cross = np.asarray(jax.jit(lambda x, y: ia.apply_pattern(block, state, x, y))(images, sources))
  expected = _numpy_pattern(block, state, images, sources)
  assert np.abs(cross.astype(int) - expected).max() <= 1 and np.mean(cross == expected) > 0.99
  assert not np.array_equal(cross, poisoned)  # another image's pattern and mask
  short = ia.poison_images(block, state, images[:5], run_1["data"][1][:5], jax.random.key(1), mesh)  # padded to 8
  np.testing.assert_array_equal(short, poisoned[:5])


# ----------------------------------------------------------------------------------------------------------------
# Config


def test_default_configs_pass_the_checks():
  for quick in (False, True):
    ia.check_config(defaults.input_aware_config(quick), 32)


@pytest.mark.parametrize("field, value, message", [
    ("model.name", "vgg", "model.name"), ("num_classes", 1, "num_classes"), ("widths", (), "widths"),
    ("widths", (8, 0), "widths"), ("pratio", 0.6, "pratio"), ("pratio", 0.001, "pratio"),
    ("mask_density", 1.5, "mask_density"), ("epsilon", 0.0, "epsilon"), ("lambda_norm", -1.0, "lambda_norm"),
    ("optim.mask.name", "rmsprop", "optim.mask.name"), ("optim.generator.betas", (0.5,), "optim.generator.betas"),
    ("optim.classifier.milestones", (0, 10), "optim.classifier.milestones"),
    ("train.batch_size", 12, "train.batch_size"), ("train.epochs", 0, "train.epochs"),
    ("poison_batch_size", 20, "poison_batch_size"), ("augment.flip_prob", 2.0, "augment.flip_prob"),
])
def test_check_config_names_the_field(field, value, message):
  block = defaults.input_aware_config(True)
  *groups, name = field.split(".")
  functools.reduce(getattr, groups, block)[name] = value
  with pytest.raises(UserError, match=message.replace(".", r"\.")):
    ia.check_config(block, 32)


def test_image_size_and_labels_errors():
  with pytest.raises(UserError, match="multiple of 8"):
    ia.check_config(defaults.input_aware_config(True), 28)
  block, (images, labels) = _block(), _data()
  mesh = parallel.make_mesh()
  with pytest.raises(UserError, match="num_classes"):
    ia.training(block, images, labels + 5, 0, mesh, 0)
  with pytest.raises(UserError, match="config.poison.target"):
    ia.training(block, images, labels, 3, mesh, 0)
