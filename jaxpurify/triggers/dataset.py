"""Dataset-poisoning triggers as pure, jittable maps of uint8 images [B, H, W, 3] -> uint8 [B, H, W, 3].

Images are HWC in 0..255 at dataset resolution, before any scaling or normalisation (attacks.md sections 4.1 and 9).
Every parameter that shapes the computation (sizes, alpha, delta, ...) is a Python value checked before tracing, with
a one-line `UserError` naming `config.poison.<field>`; arrays (images, patterns, grids, keys) may be traced. Nothing
mixes samples across the batch axis, so each function runs inside a jitted step on a batch sharded along a mesh axis.

| Function | Attack (paper) | Defaults (attacks.md 4.1, 4.2) | Labels |
|---|---|---|---|
| `badnets` | BadNets (Gu et al., 2017) | 3×3 white square, bottom-right, no margin | dirty |
| `blended`, `blend_pattern` | Blended (Chen et al., 2017) | α 0.2 (train and test); own noise pattern | dirty |
| `trojan`, `trojan_patch` | TrojanNN patch (Liu et al., 2018) | own 8×8 patch, rows/cols 21–28 of 32×32 | dirty |
| `wanet`, `wanet_grid` | WaNet (Nguyen & Tran, 2021) | k 4, s 0.5, grid_rescale 1, cross mode | dirty; cross: kept |
| `adaptive_blend` | Adaptive-Blend (Qi et al., 2023) | 16 pieces, 50% masked, α 0.15 / test 0.2 | dirty; cover: kept |
| `sig` | SIG (Barni et al., ICIP 2019) | δ 40, f 6 | clean (target class) |

Rounding to uint8 (attacks.md is silent; the choices follow the reference code where it quantises):
- `blended`, `adaptive_blend`, `sig`: BackdoorBench's arithmetic and its `np.clip(x, 0, 255).astype(np.uint8)`
  (truncation = floor, the values being clipped first), reproduced bit for bit through a lookup table built on the
  host in float64, so the result is the same on every backend without `jax_enable_x64`.
- `wanet`: round half to even after clipping. BackdoorBench keeps WaNet images as floats; rounding to nearest is
  jaxpurify's choice, and it makes `s = 0` the identity exactly.
- `badnets`, `trojan`: pixel replacement, no arithmetic.

Which images get a trigger, and how many (BackdoorBench: all-to-one, target 0, rate 0.1), is `selection`'s job.
"""

import functools
import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxpurify.errors import UserError

PREFIX = "config.poison"


def _check_images(images, caller: str) -> tuple[int, int]:
  """(H, W) of uint8 images [B, H, W, 3], else TypeError (a programming error, not a config one)."""
  if images.dtype != jnp.uint8 or images.ndim != 4 or images.shape[-1] != 3:
    raise TypeError(f"{caller} expects uint8 images [B, H, W, 3], got {images.dtype} {images.shape}")
  return int(images.shape[1]), int(images.shape[2])


def _int(value, name: str, low: int | None = None, high: int | None = None) -> int:
  """A Python int in [low, high], else UserError naming `config.poison.<name>`."""
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
    raise UserError(f"{PREFIX}.{name} must be an integer, got {value!r}; fix {PREFIX}.{name}")
  value = int(value)
  if (low is not None and value < low) or (high is not None and value > high):
    span = f"at least {low}" if high is None else f"in {low}..{high}"
    raise UserError(f"{PREFIX}.{name} must be {span}, got {value}; fix {PREFIX}.{name}")
  return value


def _float(value, name: str, low: float | None = None, high: float | None = None) -> float:
  """A finite Python number in [low, high] (static: not a traced array), else UserError."""
  if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
    raise UserError(f"{PREFIX}.{name} must be a Python number (a static setting, not an array), got "
                    f"{type(value).__name__}; fix {PREFIX}.{name}")
  value = float(value)
  if not math.isfinite(value) or (low is not None and value < low) or (high is not None and value > high):
    span = {(True, True): f"in [{low}, {high}]", (True, False): f"at least {low}",
            (False, True): f"at most {high}", (False, False): "finite"}[(low is not None, high is not None)]
    raise UserError(f"{PREFIX}.{name} must be {span}, got {value}; fix {PREFIX}.{name}")
  return value


def _size(image_size) -> tuple[int, int]:
  """image_size as int or (H, W) -> (H, W)."""
  if isinstance(image_size, Sequence) and not isinstance(image_size, str):
    if len(image_size) != 2:
      raise UserError(f"{PREFIX}.image_size must be an integer or (height, width), got {image_size!r}")
    return _int(image_size[0], "image_size", 1), _int(image_size[1], "image_size", 1)
  size = _int(image_size, "image_size", 1)
  return size, size


def _check_pattern(pattern, height: int, width: int, name: str, caller: str):
  """pattern as a uint8 [H, W, 3] array matching the images, else UserError."""
  if not hasattr(pattern, "dtype"):
    pattern = np.asarray(pattern)
  if pattern.dtype != np.uint8 or tuple(pattern.shape) != (height, width, 3):
    raise UserError(f"{caller}: the {name} must be uint8 [{height}, {width}, 3] to match the images, got "
                    f"{pattern.dtype} {tuple(pattern.shape)}; build it for the data set's image size")
  return pattern


def _batch_sharded(array: jax.Array, images: jax.Array) -> jax.Array:
  """array [B, ...] resharded along its first axis like the batch axis of `images` (a no-op without a mesh)."""
  sharding = jax.typeof(images).sharding
  if sharding.mesh.empty or not sharding.spec or sharding.spec[0] is None:
    return array
  return jax.sharding.reshard(array, jax.P(sharding.spec[0]))


def _gather(table: np.ndarray, index: jax.Array) -> jax.Array:
  """table[index] for an int32 index array of any shape, sharded like `index` (a jittable lookup)."""
  flat = jnp.asarray(table.reshape(-1))
  sharding = jax.typeof(index).sharding
  if sharding.mesh.empty:
    return flat[index]
  return flat.at[index].get(out_sharding=sharding)


# ----------------------------------------------------------------------------------------------------------------
# BadNets


def badnets(images: jax.Array, size: int = 3, value: int = 255) -> jax.Array:
  """BadNets: a size×size square of grey level `value` at the bottom-right corner, no margin.

  images uint8 [B, H, W, 3] -> uint8 [B, H, W, 3]: rows H − size .. H − 1 and cols W − size .. W − 1 set to `value`
  in all channels, every other pixel unchanged. The defaults are BackdoorBench's `resource/badnet/trigger_image.png`
  (`generate_white_square.py`: square 3, distance to right and bottom 0), i.e. rows/cols 29–31 of 32×32, applied as
  `x ⊙ [t = 0] + t ⊙ [t > 0]` (attacks.md 4.2). BackdoorBench resizes that 32×32 image for other resolutions (PIL
  bilinear, so a 64×64 data set gets a blurred ~6×6 square); here `size` is explicit instead: pass
  3 · H // 32 for the scaled square.
  """
  height, width = _check_images(images, "badnets")
  size = _int(size, "size", 1)
  value = _int(value, "value", 0, 255)
  if size > min(height, width):
    raise UserError(f"the BadNets square of size {size} does not fit {height}×{width} images; lower "
                    f"{PREFIX}.size")
  mask = np.zeros((height, width, 1), bool)
  mask[height - size:, width - size:] = True
  return jnp.where(mask, jnp.uint8(value), images)


# ----------------------------------------------------------------------------------------------------------------
# Blended and Adaptive-Blend


def blend_pattern(image_size=32, seed: int = 0) -> np.ndarray:
  """jaxpurify's own Blended pattern: uint8 [H, W, 3] uniform noise, `np.random.default_rng(seed)`.

  `integers(0, 256, (H, W, 3), dtype=uint8)`: every pixel and channel independent and uniform in 0..255, the
  "random pattern" variant of Chen et al. 2017, in place of BackdoorBench's Hello-Kitty image (a third-party image
  jaxpurify does not ship). `image_size`: an int (square) or (H, W). A host array: save it with the run.
  """
  height, width = _size(image_size)
  return np.random.default_rng(_int(seed, "seed", 0)).integers(0, 256, (height, width, 3), dtype=np.uint8)


@functools.lru_cache(maxsize=64)
def _blend_table(alpha: float) -> np.ndarray:
  """uint8 [256, 256]: table[x, t] = BackdoorBench's Blended of pixel x with pattern value t at rate alpha.

  `blendedImageAttack.add_trigger` computes `(1 - α) * img + α * t`, with img the uint8 image (so a float64
  product) and t the pattern as a float32 array (`ToTensor()` then `* 255`, exact for uint8 values, so α · t is a
  float32 product); the float64 sum then goes through `npClipAndToUint8` (clip to [0, 255], truncate).
  """
  x = np.arange(256, dtype=np.uint8)[:, None]
  t = np.arange(256, dtype=np.float32)[None, :]
  blend = (1 - alpha) * x + (np.float32(alpha) * t).astype(np.float64)
  return np.clip(blend, 0, 255).astype(np.uint8)


def _blend(images: jax.Array, pattern, alpha: float) -> jax.Array:
  index = images.astype(jnp.int32) * 256 + jnp.asarray(pattern).astype(jnp.int32)
  return _gather(_blend_table(alpha), index)


def blended(images: jax.Array, pattern, alpha: float = 0.2) -> jax.Array:
  """Blended: x' = (1 − α) · x + α · pattern, truncated to uint8 as BackdoorBench does.

  images uint8 [B, H, W, 3], pattern uint8 [H, W, 3] (e.g. `blend_pattern`) -> uint8 [B, H, W, 3]. Exactly
  BackdoorBench's `blendedImageAttack` + `npClipAndToUint8`: uint8(clip(float64((1 − α) · x) + float32(α · t),
  0, 255)), where the cast truncates. It is one grey level below the exact floor((1 − α) · x + α · t) where
  floating-point rounding lands just below a whole number (3.9% of the (x, t) pairs at α = 0.2, e.g. x = 1,
  t = 41: 8, not 9). α is static; α_train = α_test = 0.2 in BackdoorBench (attacks.md 4.2).
  """
  height, width = _check_images(images, "blended")
  alpha = _float(alpha, "alpha", 0.0, 1.0)
  pattern = _check_pattern(pattern, height, width, "pattern", "blended")
  return _blend(images, pattern, alpha)


def adaptive_blend(images: jax.Array, pattern, key: jax.Array, pieces: int = 16, masked_fraction: float = 0.5,
                   alpha: float = 0.15) -> jax.Array:
  """Adaptive-Blend: `blended` at rate α on a random half of the pattern's tiles, drawn per sample.

  images uint8 [B, H, W, 3], pattern uint8 [H, W, 3], key a PRNG key -> uint8 [B, H, W, 3]. The pattern is cut
  into a √pieces × √pieces grid of (H/√pieces) × (W/√pieces) tiles (tile p = row p // √pieces, col p % √pieces);
  sample b drops the m = round(masked_fraction · pieces) tiles with the m smallest values of
  `jax.random.uniform(key, (B, pieces))[b]` (a uniform m-subset, independent per sample), and its other pixels
  become `blended(x, pattern, alpha)`; pixels of dropped tiles are unchanged. backdoor-toolbox's
  `poison_tool_box/adaptive_blend.py` (x + α · m ⊙ (t − x), 16 pieces, 50% masked, α 0.15; attacks.md 4.2) keeps
  float images; the uint8 arithmetic here is Blended's, so masked_fraction = 0 gives `blended` exactly. Poison and
  cover samples get the same transform (cover samples keep their labels). At test time the attack uses the full
  pattern at α_test = 0.2: `blended(images, pattern, 0.2)`. pieces, masked_fraction and alpha are static.
  """
  height, width = _check_images(images, "adaptive_blend")
  alpha = _float(alpha, "alpha", 0.0, 1.0)
  pieces = _int(pieces, "pieces", 1)
  side = math.isqrt(pieces)
  if side * side != pieces:
    raise UserError(f"{PREFIX}.pieces must be a perfect square (the pattern is cut into a square grid), got "
                    f"{pieces}; use 16 (4×4) or another square")
  if height % side or width % side:
    raise UserError(f"{pieces} pieces ({side}×{side}) do not tile {height}×{width} images evenly; set "
                    f"{PREFIX}.pieces to a square whose root divides {math.gcd(height, width)}")
  masked_fraction = _float(masked_fraction, "masked_fraction", 0.0, 1.0)
  pattern = _check_pattern(pattern, height, width, "pattern", "adaptive_blend")
  masked = round(masked_fraction * pieces)
  draws = _batch_sharded(jax.random.uniform(key, (images.shape[0], pieces)), images)
  rank = jnp.argsort(jnp.argsort(draws, axis=1), axis=1)  # rank[b, p]: position of tile p in sample b's order
  keep = rank >= masked  # [B, pieces]
  tile = (np.arange(height)[:, None] // (height // side)) * side + np.arange(width)[None, :] // (width // side)
  keep_pixels = jnp.take(keep, jnp.asarray(tile.reshape(-1)), axis=1).reshape(-1, height, width, 1)
  return jnp.where(keep_pixels, _blend(images, pattern, alpha), images)


# ----------------------------------------------------------------------------------------------------------------
# Trojan (fixed patch)


def trojan_patch(seed: int = 0, size: int = 8) -> np.ndarray:
  """jaxpurify's own Trojan patch: uint8 [size, size, 3] uniform colour noise, `np.random.default_rng(seed)`.

  `integers(0, 256, (size, size, 3), dtype=uint8)`, in place of backdoor-toolbox's `trojan_square_32.png` (an 8×8
  colour patch from TrojanNN, not shipped here). A host array: save it with the run.
  """
  size = _int(size, "patch_size", 1)
  return np.random.default_rng(_int(seed, "seed", 0)).integers(0, 256, (size, size, 3), dtype=np.uint8)


def trojan(images: jax.Array, patch, position: tuple[int, int] | None = None) -> jax.Array:
  """Trojan (fixed patch): paste `patch` (uint8 [h, w, 3]) with its top-left corner at (row, col) = `position`.

  images uint8 [B, H, W, 3] -> uint8 [B, H, W, 3]: x' = x + m ⊙ (t − x) with a binary mask m = the patch area, i.e.
  pixels replaced, as backdoor-toolbox's `poison_tool_box/trojan.py`. Default position (H − h − 3, W − w − 3): an
  8×8 patch at rows/cols 21–28 of 32×32 (`mask_trojan_square_32.png`, attacks.md 4.2), a 3-pixel margin at the
  bottom and right at other sizes (jaxpurify's extension; backdoor-toolbox has only the 32×32 files).
  """
  height, width = _check_images(images, "trojan")
  if not hasattr(patch, "dtype"):
    patch = np.asarray(patch)
  if patch.dtype != np.uint8 or patch.ndim != 3 or patch.shape[-1] != 3:
    raise UserError(f"trojan: the patch must be uint8 [h, w, 3], got {patch.dtype} {tuple(patch.shape)}; build it "
                    f"with trojan_patch")
  ph, pw = int(patch.shape[0]), int(patch.shape[1])
  if position is None:
    row, col = height - ph - 3, width - pw - 3
  else:
    if not isinstance(position, Sequence) or isinstance(position, str) or len(position) != 2:
      raise UserError(f"{PREFIX}.position needs (row, col) integers, got {position!r}; fix {PREFIX}.position")
    row, col = _int(position[0], "position"), _int(position[1], "position")
  if row < 0 or col < 0 or row + ph > height or col + pw > width:
    raise UserError(f"the {ph}×{pw} Trojan patch at ({row}, {col}) does not fit {height}×{width} images; move "
                    f"{PREFIX}.position or use a smaller patch")
  mask = np.zeros((height, width, 1), bool)
  mask[row:row + ph, col:col + pw] = True
  full = jnp.pad(jnp.asarray(patch), ((row, height - row - ph), (col, width - col - pw), (0, 0)))
  return jnp.where(mask, full, images)


# ----------------------------------------------------------------------------------------------------------------
# WaNet


def _cubic_coefficients(t: float, a: float = -0.75) -> tuple[float, float, float, float]:
  """torch's cubic-convolution weights (A = −0.75) of the 4 taps at offsets −1, 0, 1, 2 for fraction t."""
  def near(x):  # |x| <= 1
    return ((a + 2) * x - (a + 3)) * x * x + 1

  def far(x):  # 1 < |x| < 2
    return ((a * x - 5 * a) * x + 8 * a) * x - 4 * a
  return far(t + 1), near(t), near(1 - t), far(2 - t)


@functools.lru_cache(maxsize=64)
def _bicubic_matrix(size_in: int, size_out: int) -> np.ndarray:
  """float64 [size_out, size_in]: 1-D bicubic resize with align_corners=True as torch's `upsample_bicubic2d`.

  Output o samples input position o · (size_in − 1) / (size_out − 1); the 4 taps around it are clamped to the
  border (torch's `upsample_get_value_bounded`), so clamped taps add up on the edge pixel.
  """
  matrix = np.zeros((size_out, size_in))
  scale = (size_in - 1) / (size_out - 1) if size_out > 1 else 0.0
  for out in range(size_out):
    src = scale * out
    base = math.floor(src)
    for tap, weight in enumerate(_cubic_coefficients(src - base)):
      matrix[out, min(max(base - 1 + tap, 0), size_in - 1)] += weight
  return matrix


def bicubic_resize_align_corners(x: jax.Array, size: tuple[int, int]) -> jax.Array:
  """float [..., h, w] -> float32 [..., H, W]: `F.interpolate(x, size, mode="bicubic", align_corners=True)`.

  The same kernel as torch (cubic convolution, A = −0.75, taps clamped at the border), applied separably (rows,
  then columns) as two matrix products; it differs from torch's float32 evaluation by rounding only.
  `jax.image.resize` cannot stand in: it uses half-pixel centres, not align_corners (attacks.md 4.2).
  """
  height, width = _int(size[0], "image_size", 1), _int(size[1], "image_size", 1)
  rows = jnp.asarray(_bicubic_matrix(int(x.shape[-2]), height), jnp.float32)
  cols = jnp.asarray(_bicubic_matrix(int(x.shape[-1]), width), jnp.float32)
  return jnp.einsum("Hh,...hw,Ww->...HW", rows, jnp.asarray(x, jnp.float32), cols, precision="highest")


def wanet_grid(key: jax.Array, k: int = 4, image_size: int = 32) -> jax.Array:
  """WaNet's fixed random warping field: float32 [H, H, 2], channel 0 the x (column) and 1 the y (row) offset.

  As BackdoorBench's `attack/wanet.py` and the official WaNet (attacks.md 4.2): `ins = jax.random.uniform(key,
  (2, k, k), minval=-1, maxval=1)` (torch: `rand * 2 - 1`), `ins /= mean(|ins|)`, then bicubic upsampling to H×H
  with align_corners=True (`bicubic_resize_align_corners`), moved to [H, H, 2] (torch's `permute(0, 2, 3, 1)`
  without the leading 1). Save the returned array with the run; BackdoorBench's saved `noise_grid`
  ([1, H, H, 2]) can be passed to `wanet` in its place.
  """
  k = _int(k, "k", 2)
  size = _int(image_size, "image_size", 2)
  ins = jax.random.uniform(key, (2, k, k), jnp.float32, minval=-1.0, maxval=1.0)
  ins = ins / jnp.mean(jnp.abs(ins))
  return jnp.moveaxis(bicubic_resize_align_corners(ins, (size, size)), 0, -1)


def _grid_sample(image: jax.Array, grid: jax.Array) -> jax.Array:
  """float [H, W, C] sampled at grid [h, w, 2] (x, y in [−1, 1]): torch `grid_sample`, bilinear, align_corners=True,
  zero padding -> float32 [h, w, C]."""
  height, width = image.shape[0], image.shape[1]
  ix = (grid[..., 0] + 1) / 2 * (width - 1)
  iy = (grid[..., 1] + 1) / 2 * (height - 1)
  x0, y0 = jnp.floor(ix), jnp.floor(iy)
  x1, y1 = x0 + 1, y0 + 1
  out = 0.0
  for xi, yi, weight in ((x0, y0, (x1 - ix) * (y1 - iy)), (x1, y0, (ix - x0) * (y1 - iy)),
                         (x0, y1, (x1 - ix) * (iy - y0)), (x1, y1, (ix - x0) * (iy - y0))):
    inside = (xi >= 0) & (xi <= width - 1) & (yi >= 0) & (yi <= height - 1)
    col = jnp.clip(xi, 0, width - 1).astype(jnp.int32)
    row = jnp.clip(yi, 0, height - 1).astype(jnp.int32)
    out = out + image[row, col] * jnp.where(inside, weight, 0.0)[..., None]
  return out


def wanet(images: jax.Array, grid: jax.Array, s: float = 0.5, grid_rescale: float = 1.0,
          cross_key: jax.Array | None = None) -> jax.Array:
  """WaNet warp: images uint8 [B, H, H, 3], grid from `wanet_grid` ([H, H, 2] or [1, H, H, 2]) -> uint8.

  As BackdoorBench's `attack/wanet.py` (attacks.md 4.2): identity = (x, y) meshgrid of `linspace(−1, 1, H)`
  (x along columns), `g = clip((identity + s · grid / H) · grid_rescale, −1, 1)`, and each image is resampled at
  `g` with `grid_sample` (bilinear, align_corners=True, zero padding), in float32; the result is clipped to
  [0, 255] and rounded half to even. Warped (backdoor) samples take the target label.

  `cross_key` given: the noise ("cross") mode for samples that keep their labels: sample b is resampled at
  `clip(g + u_b / H, −1, 1)` with `u = jax.random.uniform(cross_key, (B, H, H, 2), minval=-1, maxval=1)`, a fresh
  perturbation per sample. Square images only (BackdoorBench's grid is H×H and divides by H). s, grid_rescale static.
  """
  height, width = _check_images(images, "wanet")
  if height != width:
    raise UserError(f"WaNet needs square images (its warping grid is H×H, as in BackdoorBench), got "
                    f"{height}×{width}; resize the data set to a square size")
  s = _float(s, "s")
  grid_rescale = _float(grid_rescale, "grid_rescale", 0.0)
  grid = jnp.asarray(grid)
  if grid.ndim == 4 and grid.shape[0] == 1:
    grid = grid[0]
  if tuple(grid.shape) != (height, width, 2):
    raise UserError(f"the WaNet grid is {tuple(grid.shape)} but the images need [{height}, {width}, 2]; make it "
                    f"with wanet_grid(key, k, image_size={height})")
  identity = jnp.linspace(-1.0, 1.0, height, dtype=jnp.float32)
  identity = jnp.stack(jnp.broadcast_arrays(identity[None, :], identity[:, None]), axis=-1)  # [H, W, (x, y)]
  warp = jnp.clip((identity + s * grid.astype(jnp.float32) / height) * grid_rescale, -1.0, 1.0)
  pixels = images.astype(jnp.float32)
  if cross_key is None:
    out = jax.vmap(_grid_sample, in_axes=(0, None))(pixels, warp)
  else:
    noise = jax.random.uniform(cross_key, (images.shape[0], height, width, 2), jnp.float32, minval=-1.0, maxval=1.0)
    noise = _batch_sharded(noise, images)
    out = jax.vmap(_grid_sample)(pixels, jnp.clip(warp + noise / height, -1.0, 1.0))
  return jnp.round(jnp.clip(out, 0.0, 255.0)).astype(jnp.uint8)


# ----------------------------------------------------------------------------------------------------------------
# SIG


@functools.lru_cache(maxsize=64)
def _sig_table(width: int, delta: float, frequency: float) -> np.ndarray:
  """uint8 [W, 256]: table[j, x] = BackdoorBench's SIG of pixel value x in column j.

  `sigTriggerAttack.sigTrigger`: the pattern `delta * np.sin(2 * np.pi * j * f / m)` is stored in a float32 array,
  added to `np.uint32(img)` (a float64 sum), then `np.uint8(np.clip(·, 0, 255))` truncates.
  """
  j = np.arange(width, dtype=np.float64)[:, None]
  pattern = (delta * np.sin(2 * np.pi * j * frequency / width)).astype(np.float32)
  x = np.arange(256, dtype=np.uint32)[None, :]
  return np.clip(x + pattern.astype(np.float64), 0, 255).astype(np.uint8)


def sig(images: jax.Array, delta: float = 40, frequency: float = 6) -> jax.Array:
  """SIG: x'[i, j] = uint8(clip(x[i, j] + δ · sin(2π · j · f / W), 0, 255)), the cast truncating.

  images uint8 [B, H, W, 3] -> uint8 [B, H, W, 3]; the sinusoid runs along the columns j (vertical stripes), the
  same for every row and channel. Exactly BackdoorBench's `utils/bd_img_transform/sig.py` + `npClipAndToUint8`
  (attacks.md 4.2: δ = 40 on the 0–255 scale, f = 6): the pattern is computed in float64 and stored as float32,
  the sum is float64. Where sin is zero in exact arithmetic but a tiny negative number in floating point (W = 32,
  f = 6: column 16, sin(6π) → −2.9e−14) the truncation leaves pixels x ≥ 1 one grey level low (x − 1), as in
  BackdoorBench. Clean-label: apply it to target-class training images only (`selection.poison_indices(...,
  clean_label=True)`). delta and frequency are static.
  """
  height, width = _check_images(images, "sig")
  delta = _float(delta, "delta")
  frequency = _float(frequency, "frequency")
  columns = np.arange(width, dtype=np.int32)[None, None, :, None] * 256
  return _gather(_sig_table(width, delta, frequency), columns + images.astype(jnp.int32))
