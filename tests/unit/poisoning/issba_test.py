"""ISSBA against independent references: the reference nets' parameter counts, BackdoorBench's λ schedule by hand,
NumPy rounding of a constant residual, a single-device step, and decodable bits after a short training."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from helpers import assert_trees_close
from jaxpurify import parallel
from jaxpurify.errors import UserError
from jaxpurify.poisoning import defaults
from jaxpurify.poisoning import issba


def _tiny(**overrides):
  """8×8-image settings: 2-level U-Net and 2-conv decoder of width 8, batch 16 (2 rows per fake device)."""
  block = defaults.issba_config(True)
  block.secret_length = 8
  block.encoder.widths = (8, 8)
  block.decoder.update(widths=(8, 8), strides=(2, 2), hidden=32)
  block.train.update(batch_size=16, epochs=1)
  block.attack.batch_size = 16
  for path, value in overrides.items():
    *parents, name = path.split("__")
    node = block
    for parent in parents:
      node = node[parent]
    node[name] = value
  return block


def _images(n, size=8, seed=0):
  return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


def _count(module) -> int:
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(module, nnx.Param)))


def test_full_nets_have_the_reference_parameter_counts():
  # BackdoorBox's StegaStampEncoder(secret_size=20, 32, 32, 3), layer by layer (weights + biases).
  encoder = [20 * 3072 + 3072, 6 * 32 * 9 + 32, 32 * 32 * 9 + 32, 32 * 64 * 9 + 64, 64 * 128 * 9 + 128,
             128 * 256 * 9 + 256, 256 * 128 * 4 + 128, 256 * 128 * 9 + 128, 128 * 64 * 4 + 64, 128 * 64 * 9 + 64,
             64 * 32 * 4 + 32, 64 * 32 * 9 + 32, 32 * 32 * 4 + 32, 70 * 32 * 9 + 32, 32 * 3 + 3]
  # BackdoorBench's StegaStampDecoder(32, 3, fingerprint_size=20).
  decoder = [3 * 32 * 9 + 32, 32 * 32 * 9 + 32, 32 * 64 * 9 + 64, 64 * 64 * 9 + 64, 64 * 64 * 9 + 64,
             64 * 128 * 9 + 128, 128 * 128 * 9 + 128, 128 * 512 + 512, 512 * 20 + 20]
  block = defaults.issba_config(False)
  block.secret_length = 20
  model = nnx.eval_shape(lambda: issba.build_model(block, 32, 32, 0))
  assert _count(model.encoder) == sum(encoder)
  assert _count(model.decoder) == sum(decoder)


def test_output_shapes_on_odd_decoder_sizes():
  block = _tiny(secret_length=5, encoder__widths=(4, 6, 8), decoder__widths=(4, 4, 8), decoder__strides=(2, 1, 2))

  def outputs(x, s):
    model = issba.build_model(block, 12, 20, 0)
    return model.encoder(x, s), model.embed(x, s), model.decoder(x), model.decoder.hidden.kernel.value

  x, s = jax.ShapeDtypeStruct((3, 12, 20, 3), jnp.float32), jax.ShapeDtypeStruct((3, 5), jnp.float32)
  residual, embedded, logits, hidden = jax.eval_shape(outputs, x, s)
  assert residual.shape == embedded.shape == (3, 12, 20, 3)
  assert logits.shape == (3, 5)
  assert hidden.shape == (3 * 5 * 8, 32)  # 12×20 -> 6×10 -> 6×10 -> 3×5, 8 channels


def test_l2_weight_follows_backdoorbenchs_schedule():
  block = defaults.issba_config(False)  # λ 10, await 1000, ramp 3000
  steps = jnp.array([-1, 0, 1000, 2500, 4000, 100_000])
  np.testing.assert_allclose(issba.l2_weight(block, steps), [0, 0, 0, 5, 10, 10])


def test_fixed_secret_is_a_pure_function_of_the_config():
  block = _tiny(secret_length=40, secret_seed=3)
  secret = issba.fixed_secret(block)
  np.testing.assert_array_equal(secret, np.random.default_rng(3).integers(0, 2, 40))
  assert secret.dtype == np.float32 and set(np.unique(secret)) == {0.0, 1.0}
  np.testing.assert_array_equal(issba.fixed_secret(_tiny(secret_length=40, secret_seed=3)), secret)
  assert (issba.fixed_secret(_tiny(secret_length=40, secret_seed=4)) != secret).any()


def _with_residual(block, state, value: float):
  """`state` with the encoder's last 1×1 conv set to the constant residual `value` (kernel 0, bias value)."""
  model = nnx.merge(issba._graphdef(block, 8, 8), state.params, state.batch_stats, copy=True)
  model.encoder.residual.kernel.value = jnp.zeros_like(model.encoder.residual.kernel.value)
  model.encoder.residual.bias.value = jnp.full_like(model.encoder.residual.bias.value, value)
  return state.replace(params=parallel.put_replicated(nnx.state(model, nnx.Param), parallel.make_mesh()))


def test_trigger_clips_and_rounds_a_constant_residual_like_numpy():
  block, mesh, images = _tiny(), parallel.make_mesh(), _images(20)
  images[0, 0, 0] = (0, 250, 255)  # 255 · (x / 255 + 0.05) = 12.75, 262.75, 267.75
  state = issba.training(block, images, np.zeros(20), 0, mesh, 0)[0]

  zero = _with_residual(block, state, 0.0)
  np.testing.assert_array_equal(issba.poison_images(block, zero, images, None, None, mesh), images)

  c = np.float32(0.05)  # 12.75 grey levels: no rounding ties
  state = _with_residual(block, state, float(c))
  expected = np.round(np.clip(images.astype(np.float32) / np.float32(255) + c, 0, 1) * np.float32(255))
  poisoned = issba.poison_images(block, state, images, np.zeros(20), jax.random.key(1), mesh)
  assert poisoned.dtype == np.uint8 and poisoned.shape == images.shape
  np.testing.assert_array_equal(poisoned, expected.astype(np.uint8))
  assert np.abs(poisoned.astype(int) - images).max() <= np.ceil(255 * c)  # the change is bounded by the residual
  assert tuple(poisoned[0, 0, 0]) == (13, 255, 255)  # rounded, clipped

  trigger = issba.test_trigger(block, state)  # same map on host arrays and on a sharded batch
  np.testing.assert_array_equal(np.asarray(jax.jit(trigger)(images[:5])), poisoned[:5])
  sharded = parallel.put_batch(images[:16], mesh)
  np.testing.assert_array_equal(np.asarray(jax.jit(trigger)(sharded)), poisoned[:16])
  with pytest.raises(UserError, match="trained on images of 64 pixels"):
    trigger(jnp.zeros((1, 16, 16, 3), jnp.uint8))


def _run(block, images, mesh, steps):
  state, step, batch_fn, _ = issba.training(block, images, np.zeros(len(images)), 0, mesh, 0)
  key, history = jax.random.key(0), []
  for i in range(steps):
    state, metrics = step(state, batch_fn(i), key)
    history.append({**jax.device_get(metrics), "l2_steps": int(state.extra["l2_steps"])})
  return state, history


def test_sharded_step_equals_single_device_step_and_starts_the_image_loss():
  # Fidelity term from the first step whose bit accuracy beats 0 (await 0, ramp 1): λ = 0, 0, 10.
  # SGD: Adam's first step is lr * sign(gradient), which float noise flips where a gradient is near zero.
  block = _tiny(loss__l2_await=0, loss__l2_ramp=1, loss__l2_start_accuracy=0.0, optim__name="sgd",
                optim__momentum=0.9)
  images = _images(32)
  single = jax.make_mesh((1,), ("data",), devices=jax.devices()[:1])
  state8, history8 = _run(block, images, parallel.make_mesh(), 3)
  state1, history1 = _run(block, images, single, 3)
  assert [h["l2_weight"] for h in history8] == [0.0, 0.0, 10.0]
  assert [h["l2_steps"] for h in history8] == [0, 1, 2]
  for h8, h1 in zip(history8, history1):
    for name in h8:
      np.testing.assert_allclose(h8[name], h1[name], rtol=1e-4, atol=1e-6, err_msg=name)
  assert history8[2]["loss"] == pytest.approx(history8[2]["bce"] + 10.0 * history8[2]["mse"], rel=1e-5)
  assert_trees_close(jax.device_get(state8.params), jax.device_get(state1.params))


def test_secret_bits_are_decodable_after_a_short_training():
  block = _tiny(optim__lr=1e-2, train__batch_size=32, train__epochs=100, loss__l2_ramp=20)
  images, mesh = _images(32), parallel.make_mesh()
  state, step, batch_fn, num_steps = issba.training(block, images, np.zeros(32), 0, mesh, 0)
  assert num_steps == 100
  key = jax.random.key(0)
  state, metrics = step(state, batch_fn(0), key)
  assert float(metrics["bit_accuracy"]) <= 0.9 and int(state.extra["l2_steps"]) == -1  # image loss off until 0.9
  for i in range(1, num_steps):
    state, metrics = step(state, batch_fn(i), key)
  assert int(state.extra["l2_steps"]) > 20 and float(metrics["l2_weight"]) == 10.0  # fidelity term at full weight
  assert issba.bit_accuracy(block, state, images) >= 0.9  # chance: 0.5
  other = _tiny(optim__lr=1e-2, secret_seed=1)
  assert (issba.fixed_secret(other) != issba.fixed_secret(block)).sum() >= 3
  assert issba.bit_accuracy(other, state, images) >= 0.9  # another secret decodes too: the bits are carried


@pytest.mark.parametrize("path, value, field", [
    ("secret_length", 0, "secret_length"),
    ("secret_seed", -1, "secret_seed"),
    ("encoder__widths", (8,), "encoder.widths"),
    ("encoder__widths", (8, 0), "encoder.widths"),
    ("decoder__strides", (2,), "decoder.strides"),
    ("decoder__strides", (2, 3), "decoder.strides"),
    ("decoder__hidden", 0, "decoder.hidden"),
    ("loss__l2_weight", -1.0, "loss.l2_weight"),
    ("loss__l2_ramp", 0, "loss.l2_ramp"),
    ("loss__l2_start_accuracy", 1.5, "loss.l2_start_accuracy"),
    ("optim__name", "rmsprop", "optim.name"),
    ("train__batch_size", 12, "train.batch_size"),
    ("attack__batch_size", 4, "attack.batch_size"),
])
def test_check_config_names_the_field(path, value, field):
  with pytest.raises(UserError, match=f"config.poison.issba.{field}"):
    issba.check_config(_tiny(**{path: value}), 8)


def test_check_config_accepts_the_defaults_and_checks_the_image_size():
  issba.check_config(defaults.issba_config(True), 32)
  issba.check_config(defaults.issba_config(False), 32)
  with pytest.raises(UserError, match="multiples of 16.*encoder.widths"):
    issba.check_config(defaults.issba_config(True), 24)
