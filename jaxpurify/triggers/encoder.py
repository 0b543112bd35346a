"""The encoder attacks' triggers as pure, jittable maps of uint8 images [B, H, W, 3] -> uint8 [B, H, W, 3].

Images are HWC in 0..255, before any scaling or normalisation (attacks.md section 9). Nothing reshapes across the
batch axis, so every function runs inside a jitted step on a batch sharded along a mesh axis.

- `PatchTrigger`, `patch_trigger`, `load_patch_npz`, `stamp`: replace-mode patches (BadEncoder, DRUPE, BadNets-style),
  built from parameters or read from BadEncoder's trigger `.npz` files.
- `ctrl_stamp`, `RGB_TO_YUV`, `YUV_TO_RGB`: CTRL's frequency trigger (attacks.md section 2.3), float32 on device.
- `make_trigger`: the function a `config.attack.trigger` block describes (the blocks: `configs/common.py`).
"""

import functools
import os
import zipfile
from collections.abc import Callable, Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from jaxpurify.errors import UserError

PREFIX = "config.attack.trigger"
KINDS = ("patch", "patch_file", "ctrl")
PATTERNS = ("white", "black", "checker", "random")

# kornia 0.6.5 `rgb_to_yuv` and `yuv_to_rgb` (CTRL pins that version), rows giving Y, U, V and R, G, B. The two are
# not exact inverses of each other, so both are kept as kornia writes them.
RGB_TO_YUV = np.array([[0.299, 0.587, 0.114], [-0.147, -0.289, 0.436], [0.615, -0.515, -0.100]], np.float32)
YUV_TO_RGB = np.array([[1.0, 0.0, 1.14], [1.0, -0.396, -0.581], [1.0, 2.029, 0.0]], np.float32)


class PatchTrigger(NamedTuple):
  """Replace-mode trigger: `pattern` uint8 [H, W, 3] (0 outside the mask), `mask` uint8 [H, W, 1] (1 = replaced)."""
  pattern: np.ndarray
  mask: np.ndarray


def _int(value, name: str) -> int:
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
    raise UserError(f"{PREFIX}.{name} must be an integer, got {value!r}; fix {PREFIX}.{name}")
  return int(value)


def _pair(value, name: str) -> tuple[int, int]:
  """(row, col) of ints, or UserError naming `config.attack.trigger.<name>`."""
  if not isinstance(value, Sequence) or isinstance(value, str) or len(value) != 2:
    raise UserError(f"{PREFIX}.{name} needs (row, col) pairs of integers, got {value!r}; fix {PREFIX}.{name}")
  return _int(value[0], name), _int(value[1], name)


def _check_uint8(images, caller: str) -> None:
  if images.dtype != jnp.uint8 or images.ndim != 4 or images.shape[-1] != 3:
    raise TypeError(f"{caller} expects uint8 images [B, H, W, 3], got {images.dtype} {images.shape}")


def patch_trigger(image_size: int = 32, size: int = 10, position: tuple[int, int] = (21, 21),
                  pattern: str = "white", seed: int = 0) -> PatchTrigger:
  """A size×size square whose top-left corner is (row, col) = `position`, on image_size×image_size images.

  The defaults are BadEncoder's `trigger_pt_white_21_10_ap_replace.npz`: white, rows and cols 21..30 of 32×32.
  `pattern`: "white" (255), "black" (0), "checker" (255 and 0 alternating per pixel, 255 at the patch's top-left,
  as BadNets' 3×3 grid; the same in all channels) or "random" (uniform uint8 noise per pixel and channel from
  `np.random.default_rng(seed)`).
  """
  size, (row, col) = _int(size, "size"), _pair(position, "position")
  if pattern not in PATTERNS:
    raise UserError(f"unknown {PREFIX}.pattern {pattern!r}; use one of {', '.join(map(repr, PATTERNS))}")
  if size < 1:
    raise UserError(f"{PREFIX}.size must be at least 1, got {size}; raise {PREFIX}.size")
  if min(row, col) < 0 or max(row, col) + size > image_size:
    raise UserError(f"trigger of size {size} at ({row}, {col}) does not fit a {image_size}×{image_size} image; "
                    f"lower {PREFIX}.size or move {PREFIX}.position")
  if pattern == "white":
    patch = np.full((size, size, 3), 255, np.uint8)
  elif pattern == "black":
    patch = np.zeros((size, size, 3), np.uint8)
  elif pattern == "checker":
    even = np.add.outer(np.arange(size), np.arange(size)) % 2 == 0
    patch = np.repeat(np.where(even, 255, 0).astype(np.uint8)[..., None], 3, axis=-1)
  else:
    patch = np.random.default_rng(_int(seed, "seed")).integers(0, 256, (size, size, 3), dtype=np.uint8)
  full = np.zeros((image_size, image_size, 3), np.uint8)
  mask = np.zeros((image_size, image_size, 1), np.uint8)
  full[row:row + size, col:col + size] = patch
  mask[row:row + size, col:col + size] = 1
  return PatchTrigger(full, mask)


def _drop_lead(array: np.ndarray) -> np.ndarray:
  return array[0] if array.ndim == 4 and array.shape[0] == 1 else array


def load_patch_npz(path: str | os.PathLike, image_size: int) -> PatchTrigger:
  """BadEncoder's trigger file -> PatchTrigger for image_size×image_size images.

  The file holds `t`, the patch (float 0/255, 0 outside the trigger, [1, H, W, 3]), and `tm`, the mask of pixels
  KEPT (int 0/1, [1, H, W, 3]); BadEncoder stamps uint8 HWC images as `x * tm + t`
  (`datasets/backdoor_dataset.py`), so here mask = 1 − tm and pattern = t. Also accepted: arrays without the
  leading axis and a 1-channel `tm`. Anything that is not a replace-mode trigger of that size raises UserError.
  """
  path = os.fspath(path)
  fix = f"point {PREFIX}.path at a BadEncoder trigger file such as trigger/trigger_pt_white_21_10_ap_replace.npz"
  if not path:
    raise UserError(f"{PREFIX}.path is empty; {fix}")
  if not os.path.isfile(path):
    raise UserError(f"trigger file {path} does not exist; {fix}")
  try:
    data = np.load(path, allow_pickle=False)
    if not isinstance(data, np.lib.npyio.NpzFile):
      raise UserError(f"trigger file {path} is a single .npy array, not a .npz archive with 't' and 'tm'; {fix}")
    with data:
      missing = [key for key in ("t", "tm") if key not in data.files]
      if missing:
        raise UserError(f"trigger file {path} has no {' or '.join(map(repr, missing))} array (it holds "
                        f"{data.files}); {fix}")
      t, tm = _drop_lead(data["t"]), _drop_lead(data["tm"])
  except (OSError, ValueError, EOFError, zipfile.BadZipFile) as err:
    reason = (str(err).splitlines() or [type(err).__name__])[0]
    raise UserError(f"trigger file {path} is not a readable .npz ({reason}); {fix}") from None
  if (t.dtype.kind not in "biuf" or tm.dtype.kind not in "biuf" or t.ndim != 3 or t.shape[-1] != 3
      or tm.ndim != 3 or tm.shape[-1] not in (1, 3) or tm.shape[:2] != t.shape[:2]):
    raise UserError(f"trigger file {path} has t {t.dtype} {t.shape} and tm {tm.dtype} {tm.shape}; expected numbers "
                    f"shaped [1, H, W, 3] for both, as BadEncoder writes them; {fix}")
  if t.shape[:2] != (image_size, image_size):
    raise UserError(f"trigger file {path} is {t.shape[0]}×{t.shape[1]} but the images are {image_size}×{image_size}; "
                    f"point {PREFIX}.path at a trigger made for {image_size}×{image_size} images")
  keep = tm[..., :1]
  if not np.isin(tm, (0, 1)).all() or (tm != keep).any():
    raise UserError(f"trigger file {path}: tm must be 0 or 1 and the same in every channel; {fix}")
  if not (np.isfinite(t) & (t >= 0) & (t <= 255) & (t == np.round(t))).all():
    raise UserError(f"trigger file {path}: t must hold whole numbers in 0..255; {fix}")
  if (t * keep != 0).any():
    raise UserError(f"trigger file {path}: t is nonzero where tm keeps the image, which is not a replace-mode "
                    f"trigger; {fix}")
  return PatchTrigger(t.astype(np.uint8), (1 - keep).astype(np.uint8))


def stamp(images: jax.Array, trigger: PatchTrigger) -> jax.Array:
  """images uint8 [B, H, W, 3] -> images · (1 − mask) + pattern · mask, uint8 [B, H, W, 3]."""
  _check_uint8(images, "stamp")
  if tuple(images.shape[1:3]) != tuple(trigger.mask.shape[:2]):
    raise UserError(f"the trigger is {trigger.mask.shape[0]}×{trigger.mask.shape[1]} but the images are "
                    f"{images.shape[1]}×{images.shape[2]}; build the trigger for the data set's image size")
  mask = jnp.asarray(trigger.mask, jnp.bool_)
  return jnp.where(mask, jnp.asarray(trigger.pattern, jnp.uint8), images)


def _check_ctrl(height: int, width: int, channels, positions, window) -> tuple[tuple[int, ...], tuple, int]:
  """Validated (channels, positions, window) of a CTRL trigger for height×width images."""
  window = _int(window, "window")
  if window < 1 or height % window or width % window:
    raise UserError(f"CTRL window {window} does not divide a {height}×{width} image into blocks; set "
                    f"{PREFIX}.window to a divisor of {np.gcd(height, width)}")
  channels = tuple(_int(ch, "channels") for ch in channels)
  if not channels or not set(channels) <= {0, 1, 2}:
    raise UserError(f"CTRL channels {channels} must be a non-empty subset of 0 (Y), 1 (U), 2 (V); fix "
                    f"{PREFIX}.channels")
  positions = tuple(_pair(pos, "positions") for pos in positions)
  if not positions:
    raise UserError(f"CTRL needs at least one frequency position; set {PREFIX}.positions, e.g. ((15, 15), (31, 31))")
  for row, col in positions:
    if not (0 <= row < window and 0 <= col < window):
      raise UserError(f"CTRL position ({row}, {col}) lies outside the {window}×{window} DCT window; use rows and "
                      f"cols in 0..{window - 1} in {PREFIX}.positions or enlarge {PREFIX}.window")
  return channels, positions, window


def _block_dct_matrix(length: int, window: int) -> np.ndarray:
  """float32 [length, length]: the orthonormal DCT-II of every window-long block, block-diagonal.

  `D @ x` equals scipy's `dct(x_block, type=2, norm='ortho')` block by block and `D.T` inverts it. A matrix
  rather than `jax.scipy.fft.dctn`, whose scatter raises ShardingTypeError on a batch sharded over an Explicit mesh
  (jax 0.10.2).
  """
  k, n = np.arange(window)[:, None], np.arange(window)[None, :]
  dct = np.sqrt(2.0 / window) * np.cos(np.pi * (2 * n + 1) * k / (2 * window))
  dct[0] /= np.sqrt(2.0)
  return np.kron(np.eye(length // window), dct).astype(np.float32)


def ctrl_stamp(images: jax.Array, *, magnitude: float = 100.0, channels: Sequence[int] = (1, 2),
               positions: Sequence[tuple[int, int]] = ((15, 15), (31, 31)), window: int = 32) -> jax.Array:
  """CTRL's frequency trigger: images uint8 [B, H, W, 3] -> uint8 [B, H, W, 3].

  As `meet-cjli/CTRL` `utils/frequency.py` `Poison_Frequency_Diff`, on the 0–255 scale: RGB -> YUV (kornia 0.6.5),
  orthonormal 2-D DCT-II of each non-overlapping window×window block (as matrix products, `_block_dct_matrix`),
  `+magnitude` at every (row, col) of `positions` inside every block of each channel in `channels` (0 = Y, 1 = U,
  2 = V; repeats add up, as in CTRL's loop), inverse DCT, YUV -> RGB, clip to [0, 255]. CTRL then divides by 255
  and keeps the float image clamped to [0, 1]; rounding it to uint8 here (half to even, at most 0.5 grey level) is
  jaxpurify's choice, so that every trigger returns the same format. H and W must be multiples of `window`; all
  arguments but `images` are static.
  """
  _check_uint8(images, "ctrl_stamp")
  _, height, width, _ = images.shape
  channels, positions, window = _check_ctrl(height, width, channels, positions, window)
  delta = np.zeros((window, window, 3), np.float32)
  for ch in channels:
    for row, col in positions:
      delta[row, col, ch] += magnitude
  delta = np.tile(delta, (height // window, width // window, 1))
  rows, cols = _block_dct_matrix(height, window), _block_dct_matrix(width, window)
  yuv = jnp.einsum("bhwc,dc->bhwd", images.astype(jnp.float32), RGB_TO_YUV, precision="highest")
  coeffs = jnp.einsum("kh,bhwc,lw->bklc", rows, yuv, cols, precision="highest") + delta
  yuv = jnp.einsum("kh,bklc,lw->bhwc", rows, coeffs, cols, precision="highest")
  rgb = jnp.einsum("bhwc,dc->bhwd", yuv, YUV_TO_RGB, precision="highest")
  return jnp.round(jnp.clip(rgb, 0.0, 255.0)).astype(jnp.uint8)


def make_trigger(trigger_config: ml_collections.ConfigDict, image_size: int) -> Callable[[jax.Array], jax.Array]:
  """`config.attack.trigger` -> a jittable function uint8 [B, H, W, 3] -> uint8 [B, H, W, 3], H = W = image_size.

  Every check runs here, before any tracing; bad settings raise UserError.
  """
  def field(name):
    if name not in trigger_config:
      raise UserError(f"{PREFIX} has no field {name!r}; start from configs/common.py's trigger("
                      f"{trigger_config.get('kind')!r})")
    return trigger_config[name]

  kind = field("kind")
  if kind != "patch_file" and trigger_config.get("path"):
    raise UserError(f"{PREFIX}.path is set, but {PREFIX}.kind is {kind!r}; set {PREFIX}.kind=patch_file to use the "
                    "file, or leave the path empty")
  if kind == "patch":
    trigger = patch_trigger(image_size, field("size"), field("position"), field("pattern"), field("seed"))
  elif kind == "patch_file":
    trigger = load_patch_npz(field("path"), image_size)
  elif kind == "ctrl":
    channels, positions, window = _check_ctrl(image_size, image_size, field("channels"), field("positions"),
                                              field("window"))
    magnitude = field("magnitude")
    if isinstance(magnitude, bool) or not isinstance(magnitude, (int, float)) or not np.isfinite(magnitude):
      raise UserError(f"{PREFIX}.magnitude must be a finite number, got {magnitude!r}; fix {PREFIX}.magnitude")
    return functools.partial(ctrl_stamp, magnitude=float(magnitude), channels=channels, positions=positions,
                             window=window)
  else:
    raise UserError(f"unknown {PREFIX}.kind {kind!r}; use one of {', '.join(map(repr, KINDS))}")
  return functools.partial(stamp, trigger=trigger)
