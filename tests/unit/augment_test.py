"""jaxpurify.augment against independent references: numpy formulas, `colorsys`, PIL and torchvision's sampler."""

import colorsys
import functools
import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import absltest, parameterized
from PIL import Image

from jaxpurify import augment

LUMA = np.array([0.299, 0.587, 0.114])
STATIC = ("crop", "crop_scale", "crop_ratio", "flip_prob", "jitter", "jitter_prob", "gray_prob")
simclr = jax.jit(augment.simclr_augment, static_argnames=STATIC)


def _floats(seed, shape=(2, 8, 8, 3)):
  return np.random.default_rng(seed).uniform(size=shape).astype(np.float32)


def _uint8(seed, shape):
  return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


# Independent numpy references (float64).
def np_brightness(x, f):
  return np.clip(f * x, 0, 1)


def np_contrast(x, f):
  mean = (x @ LUMA).mean(axis=(-2, -1))[..., None, None, None]
  return np.clip(f * x + (1 - f) * mean, 0, 1)


def np_saturation(x, f):
  return np.clip(f * x + (1 - f) * (x @ LUMA)[..., None], 0, 1)


def np_hue(x, f):
  def shift(rgb):
    h, s, v = colorsys.rgb_to_hsv(*rgb)
    return colorsys.hsv_to_rgb((h + f) % 1.0, s, v)
  return np.apply_along_axis(shift, -1, x.astype(np.float64))


NP_OPS = (np_brightness, np_contrast, np_saturation, np_hue)


def torchvision_crop_area(rng, height, width, scale, ratio):
  """RandomResizedCrop.get_params, line by line (torchvision 0.2x), returning h * w."""
  for _ in range(10):
    target_area = height * width * rng.uniform(*scale)
    aspect = math.exp(rng.uniform(math.log(ratio[0]), math.log(ratio[1])))
    w = int(round(math.sqrt(target_area * aspect)))
    h = int(round(math.sqrt(target_area / aspect)))
    if 0 < w <= width and 0 < h <= height:
      return h * w
  return height * width  # fallback for a square image and ratio range containing 1


class ColorOpsTest(parameterized.TestCase):

  def test_to_float_and_normalize(self):
    x = augment.to_float(jnp.array([[[0, 255, 51]]], jnp.uint8))
    self.assertEqual(x.dtype, jnp.float32)
    np.testing.assert_allclose(x, [[[0.0, 1.0, 0.2]]], atol=1e-7)
    y = augment.normalize(x, augment.CIFAR10_MEAN, augment.CIFAR10_STD)
    want = (np.array([0.0, 1.0, 0.2]) - augment.CIFAR10_MEAN) / augment.CIFAR10_STD
    np.testing.assert_allclose(y[0, 0], want, rtol=1e-6)
    with self.assertRaises(TypeError):
      augment.to_float(x)

  def test_grayscale_hand_picked_pixels(self):
    pixels = np.array([[1, 0, 0], [0, 1, 0], [0, 0, 1], [1, 1, 1], [0.2, 0.4, 0.6]], np.float32)
    want = [0.299, 0.587, 0.114, 1.0, 0.299 * 0.2 + 0.587 * 0.4 + 0.114 * 0.6]
    got = augment.grayscale(pixels[None])[0]
    np.testing.assert_allclose(got, np.repeat(np.array(want)[:, None], 3, axis=1), atol=1e-6)

  @parameterized.product(op=[0, 1, 2], factor=[0.0, 0.6, 1.0, 1.37])
  def test_blend_ops_vs_numpy(self, op, factor):
    x = _floats(op)
    fn = (augment.adjust_brightness, augment.adjust_contrast, augment.adjust_saturation)[op]
    np.testing.assert_allclose(fn(x, factor), NP_OPS[op](x.astype(np.float64), factor), atol=1e-6)

  @parameterized.parameters(-0.5, -0.1, 0.0, 0.07, 0.5)
  def test_hue_vs_colorsys(self, factor):
    x = _floats(1)
    x[0, 0, :3] = [[0.3, 0.3, 0.3], [1, 0, 0], [0.5, 0.5, 0.2]]  # grey, primary, a tie of the max
    np.testing.assert_allclose(augment.adjust_hue(x, factor), np_hue(x, factor), atol=2e-6)

  def test_apply_jitter_matches_sequential_ops_in_every_order(self):
    x = _floats(2, (8, 8, 3))
    factors = np.array([1.3, 0.7, 1.35, 0.08], np.float32)
    jitter = jax.jit(augment.apply_jitter)
    for order in itertools.permutations(range(4)):
      want = x.astype(np.float64)
      for op in order:
        want = NP_OPS[op](want, factors[op])
      np.testing.assert_allclose(jitter(x, factors, jnp.array(order)), want, atol=1e-5, err_msg=str(order))

  def test_color_jitter_zero_strength_is_identity(self):
    x = _floats(3, (8, 8, 3))
    np.testing.assert_allclose(augment.color_jitter(jax.random.key(0), x, 0.0, 0.0, 0.0, 0.0), x, atol=1e-6)
    with self.assertRaises(ValueError):
      augment.color_jitter(jax.random.key(0), x, hue=0.6)


class GeometryTest(parameterized.TestCase):

  def test_full_square_crop_is_identity(self):
    x = _floats(4, (16, 16, 3))
    for seed in range(3):
      key = jax.random.key(seed)
      self.assertEqual(tuple(map(int, augment.sample_crop(key, 16, 16, (1.0, 1.0), (1.0, 1.0)))), (0, 0, 16, 16))
      np.testing.assert_array_equal(augment.random_resized_crop(key, x, (1.0, 1.0), (1.0, 1.0)), x)

  @parameterized.parameters((0, 0, 12, 16), (3, 5, 4, 7), (7, 0, 5, 16), (11, 15, 1, 1), (2, 9, 9, 6))
  def test_resized_crop_vs_pil_bilinear(self, top, left, h, w):
    x = _floats(5, (12, 16, 3))
    got = augment.resized_crop(x, jnp.int32(top), jnp.int32(left), jnp.int32(h), jnp.int32(w))
    want = np.stack([np.asarray(Image.fromarray(x[..., c], mode="F").crop((left, top, left + w, top + h))
                                .resize((16, 12), Image.Resampling.BILINEAR)) for c in range(3)], axis=-1)
    np.testing.assert_allclose(got, want, atol=1e-5)

  @parameterized.parameters(((2.0, 3.0), (8, 0, 16, 32)), ((0.25, 0.5), (0, 8, 32, 16)))
  def test_crop_fallback_is_central_with_clamped_ratio(self, ratio, want):
    got = augment.sample_crop(jax.random.key(0), 32, 32, (1.0, 1.0), ratio)
    self.assertEqual(tuple(map(int, got)), want)

  def test_hflip(self):
    x = _floats(6, (2, 4, 5, 3))
    np.testing.assert_array_equal(augment.hflip(x), x[:, :, ::-1])
    images = _uint8(6, (4, 6, 6, 3))
    plain = dict(crop=False, jitter_prob=0.0, gray_prob=0.0)
    flipped = simclr(jax.random.key(0), images, flip_prob=1.0, **plain)
    np.testing.assert_allclose(flipped, augment.hflip(augment.to_float(images)), atol=1e-7)
    kept = simclr(jax.random.key(0), images, flip_prob=0.0, **plain)
    np.testing.assert_allclose(kept, augment.to_float(images), atol=1e-7)


class PipelineTest(parameterized.TestCase):

  def test_determinism_range_and_dtype(self):
    images = _uint8(7, (8, 16, 16, 3))
    a = simclr(jax.random.key(1), images)
    b = simclr(jax.random.key(1), images)
    c = simclr(jax.random.key(2), images)
    np.testing.assert_array_equal(a, b)
    self.assertFalse(np.allclose(a, c))
    self.assertEqual((a.shape, a.dtype), (images.shape, jnp.float32))
    self.assertBetween(float(a.min()), 0.0, 1.0)
    self.assertBetween(float(a.max()), 0.0, 1.0)
    self.assertGreater(len({a[i].tobytes() for i in range(8)}), 7)  # samples get different augmentations

  def test_jitted_augment_traces_once(self):
    traces = 0

    def step(key, images):
      nonlocal traces
      traces += 1
      return augment.simclr_augment(key, images, crop=False)

    step = jax.jit(step)
    for seed in range(3):
      step(jax.random.key(seed), _uint8(seed, (4, 8, 8, 3))).block_until_ready()
    self.assertEqual(traces, 1)

  def test_sharded_batch_matches_unsharded(self):
    mesh = jax.make_mesh((8,), ("data",))
    images = _uint8(8, (16, 16, 16, 3))
    sharded = jax.device_put(images, jax.NamedSharding(mesh, jax.P("data")))
    key = jax.random.key(3)
    got = simclr(key, sharded)
    self.assertEqual(got.sharding.spec[0], "data")
    np.testing.assert_allclose(got, simclr(key, images), atol=1e-6)

  def test_flip_gray_and_jitter_frequencies(self):
    n = 4000
    images = _uint8(9, (n, 4, 4, 3))
    x = augment.to_float(images)
    out = simclr(jax.random.key(4), images, crop=False, jitter_prob=0.0)

    def same(a, b):
      return np.all(np.abs(a - b) < 1e-6, axis=(1, 2, 3))

    gray, gray_flipped = augment.grayscale(x), augment.grayscale(augment.hflip(x))
    flipped = same(out, augment.hflip(x)) | same(out, gray_flipped)
    grayed = same(out, gray) | same(out, gray_flipped)
    self.assertAlmostEqual(flipped.mean(), 0.5, delta=4 * math.sqrt(0.25 / n))
    self.assertAlmostEqual(grayed.mean(), 0.2, delta=4 * math.sqrt(0.16 / n))
    out = simclr(jax.random.key(5), images, crop=False, flip_prob=0.0, gray_prob=0.0)
    jittered = np.any(np.abs(out - x) > 1e-5, axis=(1, 2, 3))
    self.assertAlmostEqual(jittered.mean(), 0.8, delta=4 * math.sqrt(0.16 / n))

  @parameterized.parameters(((0.08, 1.0),), ((0.2, 0.5),))
  def test_crop_boxes_within_bounds_and_match_torchvision_sampler(self, scale):
    n, size, ratio = 8000, 32, (3 / 4, 4 / 3)
    sample = functools.partial(augment.sample_crop, height=size, width=size, scale=scale, ratio=ratio)
    top, left, h, w = map(np.asarray, jax.jit(jax.vmap(sample))(jax.random.split(jax.random.key(6), n)))
    self.assertTrue(np.all((top >= 0) & (left >= 0) & (top + h <= size) & (left + w <= size)))
    # w, h are rounded from sqrt(area * r), sqrt(area / r): bounds hold up to that rounding.
    area = size * size
    self.assertTrue(np.all(h * w + (h + w) / 2 + 0.25 >= scale[0] * area))
    self.assertTrue(np.all(h * w - (h + w) / 2 <= scale[1] * area))
    self.assertTrue(np.all(((w - 0.5) / (h + 0.5) <= ratio[1]) & ((w + 0.5) / (h - 0.5) >= ratio[0])))
    free = h < size
    self.assertAlmostEqual(np.mean(top[free] / (size - h[free])), 0.5, delta=0.03)
    rng = np.random.default_rng(0)
    want = np.mean([torchvision_crop_area(rng, size, size, scale, ratio) for _ in range(n)]) / area
    self.assertAlmostEqual(np.mean(h * w) / area, want, delta=0.015)


if __name__ == "__main__":
  absltest.main()


def _uint8_images(n=8, size=8, seed=0):
  return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


def test_crop_flip_is_identity_without_padding_or_flip_and_a_mirror_with_flip_one():
  images = jnp.asarray(_uint8_images())
  key = jax.random.key(0)
  np.testing.assert_array_equal(augment.crop_flip(key, images, 0, 0.0), images)
  np.testing.assert_array_equal(augment.crop_flip(key, images, 0, 1.0), np.asarray(images)[:, :, ::-1])


def test_crop_flip_output_is_a_window_of_the_zero_padded_image():
  images, pad = _uint8_images(16, 6, seed=1), 2
  out = np.asarray(augment.crop_flip(jax.random.key(3), jnp.asarray(images), pad, 0.5))
  padded = np.pad(images, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
  offsets = set()
  for b in range(len(images)):
    windows = [(t, l, f) for t in range(2 * pad + 1) for l in range(2 * pad + 1) for f in (False, True)
               if np.array_equal(out[b], (lambda w: w[:, ::-1] if f else w)(padded[b, t:t + 6, l:l + 6]))]
    assert windows, f"sample {b} is no window of its padded image"
    offsets.add(windows[0])
  assert len(offsets) > 3  # offsets and flips vary across the batch
