"""Image-patch triggers pasted at per-image positions (SSL-Backdoor, CorruptEncoder; attacks.md 2.4-2.5).

- `trigger_patch(block)`: the trigger image uint8 [S, S, 3] of a `config.attack.trigger` block: the file at
  `path` (e.g. HTBA's `trigger_10.png`) resized to `size`, or, with no path, a seeded random-colour patch (our
  stand-in: the HTBA PNGs are not available offline).
- `window`, `draw_positions`: SSL-Backdoor's random location, the patch inside [low, high] of the image.
- `paste`: jittable, uint8 images [B, H, W, 3] with the patch at per-image (row, col) positions [B, 2].
- `random_paste`: the test-time trigger, a jittable uint8 -> uint8 map with positions drawn from a fixed key.
"""

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np

from jaxpurify.errors import UserError

PREFIX = "config.attack.trigger"


def trigger_patch(block) -> np.ndarray:
  """uint8 [size, size, 3]: the PNG/JPEG at block.path resized (bicubic, as PIL's default in both official codes),
  or uniform random colours per pixel and channel from np.random.default_rng(block.seed)."""
  size = block.size
  if not block.path:
    if block.seed < 0:
      raise UserError(f"{PREFIX}.seed={block.seed} is negative; set a seed >= 0 for the random-colour patch")
    return np.random.default_rng(block.seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
  if not os.path.isfile(block.path):
    raise UserError(f"trigger image {block.path} does not exist; fix {PREFIX}.path or leave it empty for the "
                    "seeded random-colour stand-in")
  from PIL import Image, UnidentifiedImageError  # pylint: disable=g-import-not-at-top
  try:
    with Image.open(block.path) as image:
      return np.asarray(image.convert("RGB").resize((size, size), Image.Resampling.BICUBIC), np.uint8)
  except (UnidentifiedImageError, OSError) as err:
    raise UserError(f"trigger image {block.path} is not a readable image ({type(err).__name__}); fix "
                    f"{PREFIX}.path") from None


def window(image_size: int, size: int, low: float, high: float, field: str) -> tuple[int, int]:
  """(first, last) top-left row (= col) of a size×size patch inside [low, high] of the image, SSL-Backdoor's
  rule: first = int(low·H), last = max(int(high·H − size), first). UserError when the patch leaves the image."""
  if not 0 <= low < high <= 1:
    raise UserError(f"config.attack.{field} = ({low}, {high}) is not a range 0 <= low < high <= 1; fix "
                    f"config.attack.{field}")
  first = int(image_size * low)
  last = max(int(image_size * high - size), first)
  if first + size > image_size:
    raise UserError(f"a {size}-pixel trigger at {first} (config.attack.{field} low {low}) leaves the "
                    f"{image_size}-pixel image; lower {PREFIX}.size or config.attack.{field}")
  return first, last


def draw_positions(rng: np.random.Generator, count: int, bounds: tuple[int, int]) -> np.ndarray:
  """int64 [count, 2]: (row, col) top-left corners, each uniform over the inclusive `bounds`."""
  return rng.integers(bounds[0], bounds[1] + 1, (count, 2))


def paste(images: jax.Array, patch: jax.Array, positions: jax.Array) -> jax.Array:
  """uint8 images [B, H, W, 3] with `patch` uint8 [S, S, 3] replacing the S×S block at positions int [B, 2]."""
  size, height, width = patch.shape[0], images.shape[1], images.shape[2]
  rows = jnp.arange(height)[None, :] - positions[:, :1]  # [B, H]: the patch row each image row shows
  cols = jnp.arange(width)[None, :] - positions[:, 1:]
  inside = ((rows >= 0) & (rows < size))[:, :, None] & ((cols >= 0) & (cols < size))[:, None, :]
  shown = jnp.asarray(patch)[jnp.clip(rows, 0, size - 1)[:, :, None], jnp.clip(cols, 0, size - 1)[:, None, :]]
  return jnp.where(inside[..., None], shown, images)


def random_paste(patch: np.ndarray, bounds: tuple[int, int], seed: int):
  """uint8 [B, H, W, 3] -> the patch pasted at (row, col) drawn uniformly in `bounds` from jax.random.key(seed):
  image i of every batch gets the same position, so a run's triggered set is fixed by the seed."""
  return functools.partial(_random_paste, patch=patch, bounds=bounds, seed=seed)


def _random_paste(images, *, patch, bounds, seed):
  positions = jax.random.randint(jax.random.key(seed), (images.shape[0], 2), bounds[0], bounds[1] + 1)
  return paste(images, patch, positions)
