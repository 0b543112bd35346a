"""Triggers against independent references: hand-built patches, BadEncoder's formula, a NumPy/SciPy CTRL."""

import numpy as np
import pytest
import scipy.fft

import jax

from configs import common
from jaxpurify import triggers
from jaxpurify.errors import UserError


def _images(batch, size=32, seed=0):
  return np.random.default_rng(seed).integers(0, 256, (batch, size, size, 3), dtype=np.uint8)


def _config(kind, **overrides):
  config = common.trigger(kind)
  config.update(overrides)
  return config


def test_default_patch_is_badencoders_white_square():
  trigger = triggers.patch_trigger()
  expected_mask = np.zeros((32, 32, 1), np.uint8)
  expected_mask[21:31, 21:31] = 1
  np.testing.assert_array_equal(trigger.mask, expected_mask)
  np.testing.assert_array_equal(trigger.pattern, 255 * expected_mask.repeat(3, axis=-1))
  assert trigger.mask[31].sum() == 0 and trigger.mask[:, 31].sum() == 0  # 1-pixel margin at the bottom and right

  images = _images(2)
  out = np.asarray(triggers.stamp(images, trigger))
  rows, cols = np.nonzero((out != images).any(axis=(0, 3)))
  assert (rows.min(), rows.max(), cols.min(), cols.max()) == (21, 30, 21, 30)
  assert (out[:, 21:31, 21:31] == 255).all()
  keep = np.ones((32, 32), bool)
  keep[21:31, 21:31] = False
  np.testing.assert_array_equal(out[:, keep], images[:, keep])


def test_checker_pattern_3x3():
  trigger = triggers.patch_trigger(image_size=5, size=3, position=(1, 2), pattern="checker")
  grid = np.array([[255, 0, 255], [0, 255, 0], [255, 0, 255]], np.uint8)
  expected = np.zeros((5, 5, 3), np.uint8)
  expected[1:4, 2:5] = grid[..., None]
  np.testing.assert_array_equal(trigger.pattern, expected)
  assert trigger.mask[..., 0].tolist() == [[0] * 5] + [[0, 0, 1, 1, 1]] * 3 + [[0] * 5]


def test_black_and_random_patterns():
  black = triggers.patch_trigger(image_size=8, size=2, position=(0, 6), pattern="black")
  out = np.asarray(triggers.stamp(np.full((1, 8, 8, 3), 77, np.uint8), black))
  assert (out[0, :2, 6:] == 0).all() and (out == 0).sum() == 12

  first = triggers.patch_trigger(image_size=16, size=8, position=(4, 4), pattern="random", seed=3)
  again = triggers.patch_trigger(image_size=16, size=8, position=(4, 4), pattern="random", seed=3)
  other = triggers.patch_trigger(image_size=16, size=8, position=(4, 4), pattern="random", seed=4)
  np.testing.assert_array_equal(first.pattern, again.pattern)
  patch = first.pattern[4:12, 4:12]
  assert (patch != other.pattern[4:12, 4:12]).mean() > 0.9
  assert patch.std() > 50 and len(np.unique(patch)) > 100
  assert first.pattern[first.mask[..., 0] == 0].sum() == 0


def test_stamp_jitted_on_sharded_batch_matches_formula():
  mesh = jax.make_mesh((8,), ("data",))
  sharding = jax.NamedSharding(mesh, jax.P("data"))
  images = _images(8, seed=1)
  trigger = triggers.patch_trigger(size=5, position=(3, 20), pattern="checker")
  out = jax.jit(triggers.stamp)(jax.device_put(images, sharding), trigger)
  assert out.dtype == np.uint8 and out.sharding.is_equivalent_to(sharding, out.ndim)
  mask, pattern = trigger.mask.astype(np.int64), trigger.pattern.astype(np.int64)
  np.testing.assert_array_equal(np.asarray(out), images * (1 - mask) + pattern * mask)

  ctrl = jax.jit(triggers.make_trigger(common.trigger("ctrl"), 32))
  np.testing.assert_array_equal(np.asarray(ctrl(jax.device_put(images, sharding))),
                                np.asarray(triggers.ctrl_stamp(images)))


def _ctrl_reference(images, magnitude=100.0, channels=(1, 2), positions=((15, 15), (31, 31)), window=32):
  """CTRL written out from its formula with float64 loops: uint8 [B, H, W, 3] -> float RGB in [0, 255]."""
  r, g, b = np.moveaxis(images.astype(np.float64), -1, 0)
  yuv = np.stack([0.299 * r + 0.587 * g + 0.114 * b,
                  -0.147 * r - 0.289 * g + 0.436 * b,
                  0.615 * r - 0.515 * g - 0.100 * b], axis=1)  # [B, 3, H, W]
  for image in yuv:
    for ch in channels:
      for top in range(0, image.shape[1], window):
        for left in range(0, image.shape[2], window):
          block = image[ch, top:top + window, left:left + window]
          coeffs = scipy.fft.dctn(block, type=2, norm="ortho")
          for row, col in positions:
            coeffs[row, col] += magnitude
          block[...] = scipy.fft.idctn(coeffs, type=2, norm="ortho")
  y, u, v = np.moveaxis(yuv, 1, 0)
  rgb = np.stack([y + 1.14 * v, y - 0.396 * u - 0.581 * v, y + 2.029 * u], axis=-1)
  return np.clip(rgb, 0, 255)


@pytest.mark.parametrize("size, kwargs", [
    (32, {}),
    (64, {}),
    (32, dict(magnitude=60.0, channels=(0, 2), positions=((3, 5),), window=16)),
])
def test_ctrl_matches_numpy_reference(size, kwargs):
  images = _images(2, size, seed=2)
  out = np.asarray(triggers.ctrl_stamp(images, **kwargs))
  reference = _ctrl_reference(images, **kwargs)
  assert out.dtype == np.uint8
  assert np.abs(out - reference).max() <= 1.0
  assert (out != images).mean() > 0.3  # the trigger really changed the images


def _block_dct_uv(images, window=32):
  """uint8 [B, H, W, 3] -> DCT of U and V per block, [B, 2, H/window, W/window, window, window]."""
  x = images.astype(np.float64)
  u = x @ np.array([-0.147, -0.289, 0.436])
  v = x @ np.array([0.615, -0.515, -0.100])
  batch, height, width = u.shape
  blocks = np.stack([u, v], 1).reshape(batch, 2, height // window, window, width // window, window)
  return scipy.fft.dctn(blocks.transpose(0, 1, 2, 4, 3, 5), type=2, axes=(-2, -1), norm="ortho")


@pytest.mark.parametrize("size, magnitude", [(32, 100.0), (32, 60.0), (64, 100.0)])
def test_ctrl_raises_uv_coefficients_in_every_block(size, magnitude):
  grey = np.full((1, size, size, 3), 128, np.uint8)  # U = V = 0, and nothing clips
  out = triggers.ctrl_stamp(grey, magnitude=magnitude)
  rise = _block_dct_uv(np.asarray(out)) - _block_dct_uv(grey)
  assert rise.shape[2:4] == (size // 32, size // 32)
  hit = np.zeros((32, 32), bool)
  hit[15, 15] = hit[31, 31] = True
  # uint8 rounding of a smooth pattern leaves structured errors of up to ~2.4 per coefficient here.
  np.testing.assert_allclose(rise[..., hit], magnitude, atol=3)  # U and V of every block, both positions
  assert np.abs(rise[..., ~hit]).max() < 3  # and nowhere else, so a moved or transposed trigger fails


def _write_badencoder_npz(path, t, tm):
  np.savez(path, t=t, tm=tm, info=np.array(["custom", "replace"]))


def test_load_patch_npz_round_trip(tmp_path):
  t = np.zeros((1, 8, 8, 3))  # BadEncoder's layout: float patch 0/255 and int keep-mask, both [1, H, W, 3]
  t[0, 4:7, 4:7] = 255.0
  tm = np.ones((1, 8, 8, 3), np.int64)
  tm[0, 4:7, 4:7] = 0
  _write_badencoder_npz(tmp_path / "white.npz", t, tm)
  loaded = triggers.load_patch_npz(tmp_path / "white.npz", 8)
  expected = triggers.patch_trigger(image_size=8, size=3, position=(4, 4))
  for got, want in zip(loaded, expected):
    assert got.dtype == np.uint8
    np.testing.assert_array_equal(got, want)

  images = _images(2, 8, seed=5)
  official = (images * tm + t).astype(np.uint8)
  np.testing.assert_array_equal(np.asarray(triggers.stamp(images, loaded)), official)
  fn = triggers.make_trigger(_config("patch_file", path=str(tmp_path / "white.npz")), 8)
  np.testing.assert_array_equal(np.asarray(jax.jit(fn)(images)), official)


def test_make_trigger_defaults():
  images = _images(2, seed=6)
  patch = triggers.make_trigger(common.trigger("patch"), 32)
  np.testing.assert_array_equal(np.asarray(patch(images)),
                                np.asarray(triggers.stamp(images, triggers.patch_trigger())))
  ctrl = triggers.make_trigger(common.trigger("ctrl"), 32)
  np.testing.assert_array_equal(np.asarray(ctrl(images)), np.asarray(triggers.ctrl_stamp(images)))


@pytest.fixture
def npz_files(tmp_path):
  small = tmp_path / "small.npz"
  t = np.zeros((1, 8, 8, 3))
  tm = np.ones((1, 8, 8, 3), np.int64)
  _write_badencoder_npz(small, t, tm)
  garbage = tmp_path / "garbage.npz"
  garbage.write_bytes(b"not a zip archive")
  no_mask = tmp_path / "no_mask.npz"
  np.savez(no_mask, t=t)
  additive = tmp_path / "additive.npz"
  _write_badencoder_npz(additive, np.full((1, 32, 32, 3), 5.0), np.ones((1, 32, 32, 3), np.int64))
  return dict(small=str(small), garbage=str(garbage), no_mask=str(no_mask), additive=str(additive),
              missing=str(tmp_path / "missing.npz"))


@pytest.mark.parametrize("kind, overrides, message", [
    ("patch", dict(position=(25, 21)), "trigger of size 10 at (25, 21) does not fit a 32×32 image; lower "
     "config.attack.trigger.size or move config.attack.trigger.position"),
    ("patch", dict(size=33, position=(0, 0)), "trigger of size 33 at (0, 0) does not fit a 32×32 image"),
    ("patch", dict(position=(-1, 0)), "trigger of size 10 at (-1, 0) does not fit"),
    ("patch", dict(pattern="stripes"), "unknown config.attack.trigger.pattern 'stripes'; use one of 'white'"),
    ("patch", dict(kind="blend"), "unknown config.attack.trigger.kind 'blend'; use one of 'patch', 'patch_file', "
     "'ctrl'"),
    ("ctrl", dict(window=24), "CTRL window 24 does not divide a 32×32 image into blocks; set "
     "config.attack.trigger.window to a divisor of 32"),
    ("ctrl", dict(positions=((15, 15), (32, 31))), "CTRL position (32, 31) lies outside the 32×32 DCT window"),
    ("ctrl", dict(window=16), "CTRL position (31, 31) lies outside the 16×16 DCT window"),
    ("ctrl", dict(channels=(1, 3)), "CTRL channels (1, 3) must be a non-empty subset of 0 (Y), 1 (U), 2 (V)"),
    ("patch_file", dict(path="{missing}"), "missing.npz does not exist; point config.attack.trigger.path at"),
    ("patch_file", dict(path=""), "config.attack.trigger.path is empty"),
    ("patch_file", dict(path="{garbage}"), "garbage.npz is not a readable .npz"),
    ("patch_file", dict(path="{no_mask}"), "no_mask.npz has no 'tm' array"),
    ("patch_file", dict(path="{small}"), "small.npz is 8×8 but the images are 32×32; point "
     "config.attack.trigger.path at a trigger made for 32×32 images"),
    ("patch_file", dict(path="{additive}"), "t is nonzero where tm keeps the image"),
])
def test_bad_config_raises_user_error(npz_files, kind, overrides, message):
  config = common.trigger(kind)
  for key, value in overrides.items():
    config[key] = value.format(**npz_files) if isinstance(value, str) else value
  with pytest.raises(UserError) as err:
    triggers.make_trigger(config, 32)
  assert message in str(err.value)
  assert "\n" not in str(err.value)


def test_missing_field_and_unknown_default_kind():
  config = common.trigger("ctrl")
  del config["window"]
  with pytest.raises(UserError, match=r"config.attack.trigger has no field 'window'; start from configs/common.py's "
                     r"trigger\('ctrl'\)"):
    triggers.make_trigger(config, 32)
  with pytest.raises(ValueError, match="unknown trigger kind 'wanet'"):
    common.trigger("wanet")
