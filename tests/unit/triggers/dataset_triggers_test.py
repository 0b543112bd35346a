"""Dataset-poisoning triggers against NumPy references written from their formulas, hand-computed pixels, jit and
sharded-jit parity, and the poison/cross index selection."""

import math

import jax
import numpy as np
from absl.testing import absltest, parameterized

from jaxpurify import poisoning, triggers
from jaxpurify.errors import UserError
from jaxpurify.poisoning import selection
from jaxpurify.triggers import dataset as dataset_triggers


def _images(batch=2, height=32, width=None, seed=0, low=0, high=256):
  width = height if width is None else width
  return np.random.default_rng(seed).integers(low, high, (batch, height, width, 3), dtype=np.uint8)


class OneLineErrors(absltest.TestCase):
  """assertRaises for UserError whose whole message is one line containing every `parts`."""

  def assert_user_error(self, fn, *parts):
    with self.assertRaises(UserError) as ctx:
      fn()
    message = str(ctx.exception)
    self.assertNotIn("\n", message)
    for part in parts:
      self.assertIn(part, message)


# -------------------------------------------------------------------------------------------------------------
# BadNets


class BadNetsTest(OneLineErrors):

  def test_default_is_a_white_3x3_in_the_last_rows_and_cols(self):
    images = _images()
    out = np.asarray(triggers.badnets(images))
    self.assertEqual(out.dtype, np.uint8)
    expected = images.copy()
    expected[:, 29:32, 29:32, :] = 255
    np.testing.assert_array_equal(out, expected)
    self.assertTrue((out[:, 29:, 29:] == 255).all())
    self.assertEqual(out[0, 31, 31, 0], 255)  # the corner pixel itself: no margin
    changed = (out != images).any(axis=(0, 3))
    rows, cols = np.nonzero(changed)
    self.assertEqual((rows.min(), cols.min()), (29, 29))

  def test_size_and_value_on_8x8(self):
    images = np.full((2, 8, 8, 3), 100, np.uint8)
    images[1] = 3
    out = np.asarray(triggers.badnets(images, size=2, value=7))
    for b, background in enumerate((100, 3)):
      self.assertTrue((out[b, 6:, 6:] == 7).all())
      self.assertEqual(int((out[b] == background).sum()), (64 - 4) * 3)

  def test_errors(self):
    images = _images(1, 8)
    self.assert_user_error(lambda: triggers.badnets(images, size=0), "config.poison.size")
    self.assert_user_error(lambda: triggers.badnets(images, size=9), "config.poison.size", "8×8")
    self.assert_user_error(lambda: triggers.badnets(images, value=256), "config.poison.value")
    self.assert_user_error(lambda: triggers.badnets(images, size=True), "config.poison.size")
    with self.assertRaises(TypeError):
      triggers.badnets(images.astype(np.float32))


# -------------------------------------------------------------------------------------------------------------
# Blended and Adaptive-Blend


def _blend_reference(images, pattern, alpha):
  """BackdoorBench's Blended written out: (1 − α) · x on the uint8 image (float64) plus α · t on the float32
  pattern (float32), summed in float64, clipped, cast to uint8 (truncation)."""
  first = (1 - alpha) * images
  second = (alpha * pattern.astype(np.float32)).astype(np.float64)
  assert first.dtype == np.float64 and (alpha * pattern.astype(np.float32)).dtype == np.float32
  return np.clip(first + second, 0, 255).astype(np.uint8)


class BlendedTest(OneLineErrors, parameterized.TestCase):

  @parameterized.parameters(0.2, 0.1, 0.15, 0.3, 0.0, 1.0)
  def test_matches_reference(self, alpha):
    images, pattern = _images(2, 32, seed=1), triggers.blend_pattern(32, seed=0)
    out = np.asarray(triggers.blended(images, pattern, alpha))
    self.assertEqual(out.dtype, np.uint8)
    np.testing.assert_array_equal(out, _blend_reference(images, pattern, alpha))
    if alpha == 0.0:
      np.testing.assert_array_equal(out, images)
    if alpha == 1.0:
      np.testing.assert_array_equal(out, np.broadcast_to(pattern, images.shape))

  def test_hand_computed_pixels(self):
    # (x, t) -> at α 0.2: 0.8·100 + 0.2·200 = 120; 0.8·255 = 204; 0.2·255 = 51; 0.8·3 = 2.4 -> 2 (truncation);
    # 0.8·1 + 0.2·41 = 9 exactly, but BackdoorBench's float32 α·t = 8.1999998 gives 8.999999 -> 8.
    pairs = [(100, 200, 120), (255, 0, 204), (0, 255, 51), (3, 0, 2), (1, 41, 8)]
    images = np.zeros((1, 1, len(pairs), 3), np.uint8)
    pattern = np.zeros((1, len(pairs), 3), np.uint8)
    for j, (x, t, _) in enumerate(pairs):
      images[0, 0, j], pattern[0, j] = x, t
    out = np.asarray(triggers.blended(images, pattern, 0.2))
    self.assertEqual(out[0, 0, :, 0].tolist(), [want for _, _, want in pairs])

  def test_blend_pattern_is_fixed_uniform_noise(self):
    first, again = triggers.blend_pattern(32, seed=0), triggers.blend_pattern(32, seed=0)
    other = triggers.blend_pattern(32, seed=1)
    self.assertEqual((first.shape, first.dtype), ((32, 32, 3), np.uint8))
    np.testing.assert_array_equal(first, again)
    np.testing.assert_array_equal(first, np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8))
    self.assertGreater((first != other).mean(), 0.9)
    self.assertGreater(first.std(), 60)
    self.assertEqual(len(np.unique(first)), 256)
    self.assertEqual(triggers.blend_pattern((8, 12)).shape, (8, 12, 3))

  def test_errors(self):
    images, pattern = _images(1, 8), triggers.blend_pattern(8)
    self.assert_user_error(lambda: triggers.blended(images, pattern, 1.5), "config.poison.alpha")
    self.assert_user_error(lambda: triggers.blended(images, pattern, float("nan")), "config.poison.alpha")
    self.assert_user_error(lambda: triggers.blended(images, pattern, np.ones(2)), "config.poison.alpha", "static")
    self.assert_user_error(lambda: triggers.blended(images, triggers.blend_pattern(16), 0.2), "[8, 8, 3]")
    self.assert_user_error(lambda: triggers.blended(images, pattern.astype(np.float32), 0.2), "uint8")


class AdaptiveBlendTest(OneLineErrors):

  def _tiles(self, out, images, pattern, alpha, side):
    """[B, side·side] per tile: 1 if the tile is blended, 0 if unchanged (asserting it is exactly one of them)."""
    blended = _blend_reference(images, pattern, alpha)
    assert (blended != images).all()  # so every tile is unambiguous
    batch, height, width, _ = images.shape
    th, tw = height // side, width // side
    kept = np.zeros((batch, side * side), int)
    for b in range(batch):
      for p in range(side * side):
        rows, cols = slice(p // side * th, (p // side + 1) * th), slice(p % side * tw, (p % side + 1) * tw)
        if np.array_equal(out[b, rows, cols], blended[b, rows, cols]):
          kept[b, p] = 1
        else:
          np.testing.assert_array_equal(out[b, rows, cols], images[b, rows, cols])
    return kept

  def test_half_the_16_tiles_blended_per_sample(self):
    images = _images(6, 32, seed=2, high=100)
    pattern = np.random.default_rng(3).integers(180, 256, (32, 32, 3), dtype=np.uint8)
    out = np.asarray(triggers.adaptive_blend(images, pattern, jax.random.key(0)))
    kept = self._tiles(out, images, pattern, 0.15, 4)
    np.testing.assert_array_equal(kept.sum(axis=1), 8)
    self.assertEqual(len({tuple(row) for row in kept}), 6)  # independent per sample
    again = np.asarray(triggers.adaptive_blend(images, pattern, jax.random.key(0)))
    np.testing.assert_array_equal(again, out)
    other = np.asarray(triggers.adaptive_blend(images, pattern, jax.random.key(1)))
    self.assertFalse(np.array_equal(self._tiles(other, images, pattern, 0.15, 4), kept))

  def test_hand_pixels_and_other_settings(self):
    images = np.full((3, 8, 8, 3), 100, np.uint8)
    pattern = np.full((8, 8, 3), 200, np.uint8)
    out = np.asarray(triggers.adaptive_blend(images, pattern, jax.random.key(5), pieces=4, masked_fraction=0.25,
                                              alpha=0.15))
    # 0.85·100 + 0.15·200 = 115 on 3 of the 4 4×4 tiles, 100 on the other.
    self.assertEqual(sorted(np.unique(out).tolist()), [100, 115])
    np.testing.assert_array_equal((out == 115).sum(axis=(1, 2, 3)), 3 * 16 * 3)
    full = np.asarray(triggers.adaptive_blend(images, pattern, jax.random.key(5), masked_fraction=0.0, alpha=0.2))
    np.testing.assert_array_equal(full, np.asarray(triggers.blended(images, pattern, 0.2)))
    none = np.asarray(triggers.adaptive_blend(images, pattern, jax.random.key(5), masked_fraction=1.0))
    np.testing.assert_array_equal(none, images)

  def test_errors(self):
    images, pattern, key = _images(1, 30), triggers.blend_pattern(30), jax.random.key(0)
    self.assert_user_error(lambda: triggers.adaptive_blend(images, pattern, key), "config.poison.pieces", "30×30")
    self.assert_user_error(lambda: triggers.adaptive_blend(images, pattern, key, pieces=15),
                           "config.poison.pieces", "square")
    self.assert_user_error(lambda: triggers.adaptive_blend(images, pattern, key, pieces=9, masked_fraction=2),
                           "config.poison.masked_fraction")


# -------------------------------------------------------------------------------------------------------------
# Trojan


class TrojanTest(OneLineErrors):

  def test_patch_at_rows_and_cols_21_to_28(self):
    images, patch = _images(2, 32, seed=4), triggers.trojan_patch(seed=0)
    self.assertEqual((patch.shape, patch.dtype), ((8, 8, 3), np.uint8))
    out = np.asarray(triggers.trojan(images, patch))
    expected = images.copy()
    expected[:, 21:29, 21:29] = patch
    np.testing.assert_array_equal(out, expected)
    np.testing.assert_array_equal(out[1, 21, 21], patch[0, 0])
    np.testing.assert_array_equal(out[1, 28, 28], patch[7, 7])
    np.testing.assert_array_equal(out[:, 29:], images[:, 29:])  # a 3-pixel margin below and to the right

  def test_patch_is_fixed_and_positions(self):
    np.testing.assert_array_equal(triggers.trojan_patch(3), triggers.trojan_patch(3))
    self.assertGreater((triggers.trojan_patch(3) != triggers.trojan_patch(4)).mean(), 0.9)
    images = np.zeros((1, 16, 16, 3), np.uint8)
    patch = np.arange(4 * 4 * 3, dtype=np.uint8).reshape(4, 4, 3) + 1
    out = np.asarray(triggers.trojan(images, patch))  # default: (16 − 4 − 3, 16 − 4 − 3) = (9, 9)
    np.testing.assert_array_equal(out[0, 9:13, 9:13], patch)
    self.assertEqual(int(out.astype(bool).sum()), patch.size)
    out = np.asarray(triggers.trojan(images, patch, position=(0, 12)))
    np.testing.assert_array_equal(out[0, 0:4, 12:16], patch)

  def test_errors(self):
    images, patch = _images(1, 8), triggers.trojan_patch()
    self.assert_user_error(lambda: triggers.trojan(images, patch), "does not fit", "config.poison.position")
    self.assert_user_error(lambda: triggers.trojan(_images(1, 32), patch, position=(30, 0)), "does not fit")
    self.assert_user_error(lambda: triggers.trojan(_images(1, 32), patch.astype(np.int32)), "uint8")


# -------------------------------------------------------------------------------------------------------------
# WaNet


def _cubic(x, a=-0.75):
  x = abs(x)
  if x <= 1:
    return (a + 2) * x ** 3 - (a + 3) * x ** 2 + 1
  if x < 2:
    return a * x ** 3 - 5 * a * x ** 2 + 8 * a * x - 4 * a
  return 0.0


def _bicubic_reference(x, height, width):
  """torch `upsample_bicubic2d`, align_corners=True, written per output pixel: [C, h, w] -> float64 [C, H, W]."""
  channels, h, w = x.shape
  out = np.zeros((channels, height, width))
  for oy in range(height):
    sy = oy * (h - 1) / (height - 1)
    y0 = math.floor(sy)
    for ox in range(width):
      sx = ox * (w - 1) / (width - 1)
      x0 = math.floor(sx)
      rows = []
      for ky in range(-1, 3):  # interpolate along x in each of the 4 rows, then along y
        yy = min(max(y0 + ky, 0), h - 1)
        rows.append(sum(x[:, yy, min(max(x0 + kx, 0), w - 1)] * _cubic(sx - (x0 + kx)) for kx in range(-1, 3)))
      out[:, oy, ox] = sum(row * _cubic(sy - (y0 + ky)) for ky, row in zip(range(-1, 3), rows))
  return out


def _grid_sample_reference(images, grid):
  """torch `grid_sample` (bilinear, align_corners=True, zeros): images [B, H, W, C], grid [B, h, w, 2] (x, y)
  -> float64 [B, h, w, C]."""
  batch, height, width, _ = images.shape
  out = np.zeros(grid.shape[:3] + (images.shape[-1],))
  for b in range(batch):
    for i in range(grid.shape[1]):
      for j in range(grid.shape[2]):
        ix = (grid[b, i, j, 0] + 1) / 2 * (width - 1)
        iy = (grid[b, i, j, 1] + 1) / 2 * (height - 1)
        x0, y0 = math.floor(ix), math.floor(iy)
        for xx, yy in ((x0, y0), (x0 + 1, y0), (x0, y0 + 1), (x0 + 1, y0 + 1)):
          if 0 <= xx < width and 0 <= yy < height:
            out[b, i, j] += images[b, yy, xx] * (1 - abs(ix - xx)) * (1 - abs(iy - yy))
  return out


def _wanet_reference(images, noise_grid, s=0.5, grid_rescale=1.0, cross_noise=None):
  """BackdoorBench's WaNet in float64 -> the float image before rounding, [B, H, W, 3]."""
  batch, size = images.shape[0], images.shape[1]
  line = np.linspace(-1, 1, size)
  identity = np.stack(np.meshgrid(line, line, indexing="xy"), axis=-1)  # [..., 0] = x along columns
  grid = np.clip((identity + s * noise_grid.astype(np.float64) / size) * grid_rescale, -1, 1)
  grid = np.broadcast_to(grid, (batch,) + grid.shape)
  if cross_noise is not None:
    grid = np.clip(grid + cross_noise.astype(np.float64) / size, -1, 1)
  return np.clip(_grid_sample_reference(images.astype(np.float64), grid), 0, 255)


class WaNetTest(OneLineErrors, parameterized.TestCase):

  def assert_rounds_to(self, out, reference):
    """out == round-half-even(reference) exactly, except within 1e-3 of a .5 tie (float32 vs float64), where
    the two neighbours are both accepted; such ties must be rare."""
    tie = np.abs(reference - np.floor(reference) - 0.5) < 1e-3
    self.assertLess(tie.mean(), 0.01)
    np.testing.assert_array_equal(out[~tie], np.round(reference[~tie]).astype(np.uint8))
    self.assertTrue((np.abs(out[tie] - reference[tie]) <= 0.501).all())

  def test_bicubic_hand_values(self):
    # 1-D [0, 0, 1, 0] to 7 samples at positions 0, .5, 1, ..., 3: taps (−1, 0, 1, 2) at t = .5 weigh
    # (−0.09375, 0.59375, 0.59375, −0.09375); at whole positions the sample itself.
    column = np.array([0.0, 0.0, 1.0, 0.0])
    x = np.broadcast_to(column[:, None], (4, 4))[None]
    out = np.asarray(triggers.bicubic_resize_align_corners(x, (7, 7)))
    want = np.array([0, -0.09375, 0, 0.59375, 1, 0.59375, 0])
    np.testing.assert_allclose(out[0], np.broadcast_to(want[:, None], (7, 7)), atol=1e-7)

  @parameterized.parameters(((4, 4), (32, 32)), ((3, 5), (8, 11)), ((4, 4), (4, 4)))
  def test_bicubic_matches_torch_reference(self, size_in, size_out):
    x = np.random.default_rng(5).uniform(-2, 2, (2,) + size_in)
    out = np.asarray(triggers.bicubic_resize_align_corners(x, size_out))
    self.assertEqual(out.shape, (2,) + size_out)
    np.testing.assert_allclose(out, _bicubic_reference(x, *size_out), atol=1e-5)

  def test_wanet_grid(self):
    key = jax.random.key(7)
    grid = triggers.wanet_grid(key, k=4, image_size=32)
    self.assertEqual((grid.shape, grid.dtype), ((32, 32, 2), np.float32))
    ins = np.asarray(jax.random.uniform(key, (2, 4, 4), minval=-1, maxval=1), np.float64)
    ins /= np.abs(ins).mean()
    np.testing.assert_allclose(np.asarray(grid), np.moveaxis(_bicubic_reference(ins, 32, 32), 0, -1), atol=1e-5)
    np.testing.assert_allclose(np.asarray(grid)[0, 0], ins[:, 0, 0], rtol=1e-6)  # corners are control points
    np.testing.assert_allclose(np.asarray(grid)[-1, -1], ins[:, -1, -1], rtol=1e-6)
    np.testing.assert_array_equal(np.asarray(triggers.wanet_grid(key)), np.asarray(grid))
    self.assertGreater(np.abs(np.asarray(triggers.wanet_grid(jax.random.key(8))) - np.asarray(grid)).mean(), 0.1)

  @parameterized.parameters((0.5, 1.0), (2.0, 1.0), (0.5, 0.98))
  def test_warp_matches_reference(self, s, grid_rescale):
    images = _images(2, 16, seed=6)
    noise_grid = np.asarray(triggers.wanet_grid(jax.random.key(1), image_size=16))
    out = np.asarray(triggers.wanet(images, noise_grid, s=s, grid_rescale=grid_rescale))
    self.assertEqual(out.dtype, np.uint8)
    self.assert_rounds_to(out, _wanet_reference(images, noise_grid, s, grid_rescale))
    self.assertGreater((out != images).mean(), 0.5)

  def test_identity_when_s_is_zero(self):
    images = _images(2, 32, seed=7)
    grid = triggers.wanet_grid(jax.random.key(0))
    np.testing.assert_array_equal(np.asarray(triggers.wanet(images, grid, s=0.0)), images)
    np.testing.assert_array_equal(np.asarray(triggers.wanet(images, np.zeros((32, 32, 2), np.float32))), images)

  def test_half_pixel_shift_by_hand(self):
    # x offset s · c / H = 0.5 · (16/7) / 8 = 1/7 = half a pixel step of linspace(−1, 1, 8): each output pixel is
    # the mean of itself and its right neighbour; the last column is clipped to x = 1 and stays.
    images = 2 * _images(1, 8, seed=8, high=128)  # even values, so the means are whole numbers
    noise_grid = np.zeros((8, 8, 2), np.float32)
    noise_grid[..., 0] = 16 / 7
    out = np.asarray(triggers.wanet(images, noise_grid, s=0.5))
    wide = images.astype(int)
    np.testing.assert_array_equal(out[:, :, :7], (wide[:, :, :7] + wide[:, :, 1:]) // 2)
    np.testing.assert_array_equal(out[:, :, 7], images[:, :, 7])
    images[0, 0, 0, 0], images[0, 0, 1, 0] = 10, 20
    self.assertEqual(int(np.asarray(triggers.wanet(images, noise_grid))[0, 0, 0, 0]), 15)

  def test_cross_mode_matches_reference(self):
    images = _images(3, 16, seed=9)
    noise_grid = np.asarray(triggers.wanet_grid(jax.random.key(2), image_size=16))
    cross_key = jax.random.key(3)
    out = np.asarray(triggers.wanet(images, noise_grid, cross_key=cross_key))
    cross_noise = np.asarray(jax.random.uniform(cross_key, (3, 16, 16, 2), minval=-1, maxval=1))
    self.assert_rounds_to(out, _wanet_reference(images, noise_grid, cross_noise=cross_noise))
    plain = np.asarray(triggers.wanet(images, noise_grid))
    self.assertGreater((out != plain).mean(), 0.3)
    np.testing.assert_array_equal(np.asarray(triggers.wanet(images, noise_grid, cross_key=cross_key)), out)
    # BackdoorBench's saved layout [1, H, H, 2] is accepted as well.
    np.testing.assert_array_equal(np.asarray(triggers.wanet(images, noise_grid[None])), plain)

  def test_errors(self):
    grid = np.zeros((16, 16, 2), np.float32)
    self.assert_user_error(lambda: triggers.wanet(_images(1, 16, 12), grid), "square", "16×12")
    self.assert_user_error(lambda: triggers.wanet(_images(1, 8), grid), "[8, 8, 2]", "wanet_grid")
    self.assert_user_error(lambda: triggers.wanet(_images(1, 16), grid, s=np.float32(0.5) * np.ones(1)),
                           "config.poison.s")
    self.assert_user_error(lambda: triggers.wanet(_images(1, 16), grid, grid_rescale=-1.0),
                           "config.poison.grid_rescale")
    self.assert_user_error(lambda: triggers.wanet_grid(jax.random.key(0), k=1), "config.poison.k")


# -------------------------------------------------------------------------------------------------------------
# SIG


def _sig_reference(images, delta=40, f=6):
  """BackdoorBench's `sigTrigger` loop per image: a float32 pattern, `np.uint32(img) + pattern`, clip, uint8."""
  out = np.empty_like(images)
  for b, img in enumerate(images):
    pattern = np.zeros_like(np.float32(img))
    m = pattern.shape[1]
    for i in range(img.shape[0]):
      for j in range(img.shape[1]):
        pattern[i, j] = delta * np.sin(2 * np.pi * j * f / m)
    out[b] = np.uint8(np.clip(np.uint32(img) + pattern, 0, 255))
  return out


class SigTest(OneLineErrors, parameterized.TestCase):

  @parameterized.parameters((32, 40, 6), (8, 40, 6), (32, 20, 3), (24, 40, 6))
  def test_matches_reference(self, size, delta, f):
    images = _images(2, size, seed=10)
    out = np.asarray(triggers.sig(images, delta=delta, frequency=f))
    self.assertEqual(out.dtype, np.uint8)
    np.testing.assert_array_equal(out, _sig_reference(images, delta, f))

  def test_hand_computed_pixels(self):
    images = np.full((1, 2, 32, 3), 100, np.uint8)
    images[0, 1] = 250
    out = np.asarray(triggers.sig(images))
    # Column j adds 40 · sin(2π · j · 6 / 32) = 40 · sin(3πj / 8): j 0 -> +0, 1 -> +36.955 (100 -> 136),
    # 4 -> −40 (60), 12 -> +40 (140; 250 -> 255, clipped); j 16 -> sin(6π) = −2.9e−14 in floating point, so
    # BackdoorBench's truncation gives 99.
    self.assertEqual([int(out[0, 0, j, 0]) for j in (0, 1, 4, 12, 16)], [100, 136, 60, 140, 99])
    self.assertEqual([int(out[0, 1, j, 0]) for j in (4, 12)], [210, 255])
    np.testing.assert_array_equal(out[0, 0], out[0, 0, :, :1].repeat(3, axis=1))  # same in every channel
    zeros = np.asarray(triggers.sig(np.zeros((1, 1, 32, 3), np.uint8)))
    self.assertEqual([int(zeros[0, 0, j, 0]) for j in (1, 4)], [36, 0])  # negative values clip to 0

  def test_errors(self):
    self.assert_user_error(lambda: triggers.sig(_images(1, 8), delta=float("inf")), "config.poison.delta")
    self.assert_user_error(lambda: triggers.sig(_images(1, 8), frequency="6"), "config.poison.frequency")


# -------------------------------------------------------------------------------------------------------------
# Jit and sharded jit


def _transforms():
  pattern, patch = triggers.blend_pattern(32, seed=0), triggers.trojan_patch(seed=0)
  grid = triggers.wanet_grid(jax.random.key(0))
  return {
      "badnets": lambda x: triggers.badnets(x),
      "blended": lambda x: triggers.blended(x, pattern, 0.2),
      "adaptive_blend": lambda x: triggers.adaptive_blend(x, pattern, jax.random.key(1)),
      "trojan": lambda x: triggers.trojan(x, patch),
      "wanet": lambda x: triggers.wanet(x, grid),
      "wanet_cross": lambda x: triggers.wanet(x, grid, cross_key=jax.random.key(2)),
      "sig": lambda x: triggers.sig(x),
  }


class JitTest(parameterized.TestCase):

  @parameterized.parameters("badnets", "blended", "adaptive_blend", "trojan", "wanet", "wanet_cross", "sig")
  def test_jit_and_sharded_jit_equal_eager(self, name):
    transform = _transforms()[name]
    images = _images(8, 32, seed=11)
    eager = np.asarray(transform(images))
    self.assertEqual(eager.dtype, np.uint8)
    self.assertFalse(np.array_equal(eager, images))
    np.testing.assert_array_equal(np.asarray(jax.jit(transform)(images)), eager)
    mesh = jax.make_mesh((8,), ("data",))
    sharding = jax.NamedSharding(mesh, jax.P("data"))
    with jax.set_mesh(mesh):
      out = jax.jit(transform)(jax.device_put(images, sharding))
    self.assertTrue(out.sharding.is_equivalent_to(sharding, out.ndim))
    np.testing.assert_array_equal(np.asarray(out), eager)

  def test_traced_arrays(self):
    """Patterns, grids and keys may be traced; only the settings are static."""
    images, pattern = _images(2, 32, seed=12), triggers.blend_pattern(32)
    grid, patch = triggers.wanet_grid(jax.random.key(0)), triggers.trojan_patch()
    np.testing.assert_array_equal(np.asarray(jax.jit(triggers.blended)(images, pattern)),
                                  np.asarray(triggers.blended(images, pattern)))
    np.testing.assert_array_equal(np.asarray(jax.jit(triggers.trojan)(images, patch)),
                                  np.asarray(triggers.trojan(images, patch)))
    cross = jax.jit(lambda x, g, k: triggers.wanet(x, g, cross_key=k))
    np.testing.assert_array_equal(np.asarray(cross(images, grid, jax.random.key(4))),
                                  np.asarray(triggers.wanet(images, grid, cross_key=jax.random.key(4))))
    adaptive = jax.jit(lambda x, t, k: triggers.adaptive_blend(x, t, k, alpha=0.2))
    np.testing.assert_array_equal(np.asarray(adaptive(images, pattern, jax.random.key(4))),
                                  np.asarray(triggers.adaptive_blend(images, pattern, jax.random.key(4), alpha=0.2)))
    self.assertEqual(dataset_triggers.PREFIX, "config.poison")


# -------------------------------------------------------------------------------------------------------------
# Selection


def _labels(classes=10, per_class=100, seed=0):
  return np.random.default_rng(seed).permutation(np.repeat(np.arange(classes), per_class))


class PoisonIndicesTest(OneLineErrors, parameterized.TestCase):

  def assert_index_set(self, index, count, total):
    self.assertEqual(index.dtype, np.int64)
    self.assertEqual(len(index), count)
    self.assertTrue((np.diff(index) > 0).all())  # sorted, no repeats
    if count:
      self.assertTrue(0 <= index.min() and index.max() < total)

  def test_dirty_label_draws_from_the_whole_set(self):
    labels = _labels()
    index = poisoning.poison_indices(labels, 0.1, 0, seed=0)
    self.assert_index_set(index, 100, 1000)
    self.assertGreater((labels[index] == 0).sum(), 0)  # BackdoorBench does not avoid the target class
    np.testing.assert_array_equal(poisoning.poison_indices(labels, 0.1, 0, seed=0), index)
    self.assertFalse(np.array_equal(poisoning.poison_indices(labels, 0.1, 0, seed=1), index))
    np.testing.assert_array_equal(index, np.sort(np.random.default_rng(0).choice(1000, 100, replace=False)))

  def test_dirty_label_excluding_the_target(self):
    labels = _labels()
    index = poisoning.poison_indices(labels, 0.3, 4, seed=2, exclude_target=True)
    self.assert_index_set(index, 300, 1000)
    self.assertFalse((labels[index] == 4).any())

  @parameterized.parameters((0.0, 0), (0.0125, 12), (0.0135, 14), (0.003, 3), (1.0, 1000))
  def test_count_is_round_of_rate_times_n(self, rate, count):
    self.assertEqual(round(rate * 1000), count)  # Python's round: 12.5 -> 12, 13.5 -> 14
    self.assert_index_set(poisoning.poison_indices(_labels(), rate, 0, seed=0), count, 1000)

  def test_clean_label_dataset_convention(self):
    labels = _labels()
    index = poisoning.poison_indices(labels, 0.05, 3, seed=0, clean_label=True)
    self.assert_index_set(index, 50, 1000)
    self.assertTrue((labels[index] == 3).all())
    # rate 0.1 of the whole set is every target-class image (CIFAR-10: all 5,000).
    everything = poisoning.poison_indices(labels, 0.1, 3, seed=0, clean_label=True)
    np.testing.assert_array_equal(everything, np.flatnonzero(labels == 3))
    self.assertFalse(np.array_equal(poisoning.poison_indices(labels, 0.05, 3, seed=1, clean_label=True), index))

  def test_clean_label_class_convention(self):
    labels = _labels()
    index = poisoning.poison_indices(labels, 0.5, 3, seed=0, clean_label=True, convention="class")
    self.assert_index_set(index, 50, 1000)
    self.assertTrue((labels[index] == 3).all())
    index = poisoning.poison_indices(labels, 1.0, 3, seed=0, clean_label=True, convention="class")
    np.testing.assert_array_equal(index, np.flatnonzero(labels == 3))

  def test_errors(self):
    labels = _labels()
    for rate in (-0.1, 1.5, float("nan"), "0.1", True, None):
      self.assert_user_error(lambda rate=rate: poisoning.poison_indices(labels, rate, 0, seed=0),
                             "config.poison.rate")
    self.assert_user_error(lambda: poisoning.poison_indices(labels, 0.1, 10, seed=0), "config.poison.target",
                           "10", "0, 1, 2")
    self.assert_user_error(lambda: poisoning.poison_indices(labels, 0.15, 0, seed=0, clean_label=True),
                           "150", "100", "config.poison.rate", "0.1")
    self.assert_user_error(lambda: poisoning.poison_indices(labels, 0.95, 0, seed=0, exclude_target=True),
                           "950", "900", "config.poison.rate")
    self.assert_user_error(lambda: poisoning.poison_indices(labels, 0.1, 0, seed=0, convention="class"),
                           "config.poison.convention", "clean-label")
    self.assert_user_error(lambda: poisoning.poison_indices(labels, 0.1, 0, seed=0, convention="all"),
                           "config.poison.convention")
    self.assert_user_error(lambda: poisoning.poison_indices(labels, 0.1, 0, seed=0, clean_label=True,
                                                            exclude_target=True), "config.poison.exclude_target")
    self.assert_user_error(lambda: poisoning.poison_indices(labels, 0.1, 0, seed=-1), "config.poison.seed")
    self.assert_user_error(lambda: poisoning.poison_indices(labels.reshape(10, 100), 0.1, 0, seed=0), "1-D")
    self.assert_user_error(lambda: poisoning.poison_indices(labels, 0.1, "0", seed=0), "config.poison.target")


class CrossIndicesTest(OneLineErrors):

  def test_twice_the_poisoned_count_disjoint(self):
    poisoned = poisoning.poison_indices(_labels(), 0.1, 0, seed=0)
    cross = poisoning.cross_indices(1000, poisoned, 2.0, seed=0)
    self.assertEqual((len(cross), cross.dtype), (200, np.int64))
    self.assertTrue((np.diff(cross) > 0).all())
    self.assertEqual(len(np.intersect1d(cross, poisoned)), 0)
    np.testing.assert_array_equal(poisoning.cross_indices(1000, poisoned, 2.0, seed=0), cross)
    self.assertFalse(np.array_equal(poisoning.cross_indices(1000, poisoned, 2.0, seed=1), cross))
    self.assertEqual(len(poisoning.cross_indices(1000, poisoned[:5], 1.5, seed=0)), 7)  # int(7.5)
    self.assertEqual(len(poisoning.cross_indices(1000, poisoned, 0.0, seed=0)), 0)
    self.assertEqual(len(selection.cross_indices(10, np.arange(5), 1.0, seed=0)), 5)  # all that is left

  def test_errors(self):
    poisoned = np.arange(100)
    self.assert_user_error(lambda: poisoning.cross_indices(1000, poisoned, 10.0, seed=0),
                           "config.poison.cross_ratio", "1000", "900")
    self.assert_user_error(lambda: poisoning.cross_indices(1000, poisoned, -1.0, seed=0), "config.poison.cross_ratio")
    self.assert_user_error(lambda: poisoning.cross_indices(50, poisoned, 1.0, seed=0), "0..49")
    self.assert_user_error(lambda: poisoning.cross_indices(1000, np.array([1, 1]), 1.0, seed=0), "repeat")


if __name__ == "__main__":
  absltest.main()
