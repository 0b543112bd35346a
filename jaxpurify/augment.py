"""SimCLR augmentations as batched, key-driven JAX functions with torchvision semantics.

Per-image functions take one image `[H, W, 3]` float in [0, 1] (the `adjust_*` ops and `grayscale` also take
leading batch axes); `simclr_augment` vmaps them over a batch with one key per sample. Every shape is static and
every random choice is a select, so the functions run inside a jitted step on a batch sharded along a mesh axis.
Images stay float throughout (torchvision's PIL path rounds to uint8 after each op; here nothing is rounded).
"""

import functools
import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp

from jaxpurify.data.catalog import CIFAR10_MEAN, CIFAR10_STD

LUMA = (0.299, 0.587, 0.114)  # ITU-R 601-2, as PIL's convert("L")
BRIGHTNESS, CONTRAST, SATURATION, HUE = range(4)  # torchvision's ColorJitter op indices
CROP_ATTEMPTS = 10  # torchvision RandomResizedCrop.get_params
_CROP_UNIFORMS = 2 * CROP_ATTEMPTS + 2  # area and log-ratio per attempt, top, left
_JITTER_UNIFORMS = 8  # four factors, four sort keys for the op order


def to_float(images: jax.Array) -> jax.Array:
  """uint8 [..., H, W, 3] in [0, 255] -> float32 in [0, 1]."""
  if images.dtype != jnp.uint8:
    raise TypeError(f"to_float expects uint8 images, got {images.dtype}")
  return images.astype(jnp.float32) / 255.0


def normalize(x: jax.Array, mean: Sequence[float] = CIFAR10_MEAN,
              std: Sequence[float] = CIFAR10_STD) -> jax.Array:
  """Per-channel (x - mean) / std over the last axis."""
  return (x - jnp.asarray(mean, x.dtype)) / jnp.asarray(std, x.dtype)


def _luma(img: jax.Array) -> jax.Array:
  """[..., H, W, 3] -> [..., H, W, 1]."""
  return jnp.sum(img * jnp.asarray(LUMA, img.dtype), axis=-1, keepdims=True)


def grayscale(img: jax.Array) -> jax.Array:
  """[..., H, W, 3] -> luma replicated to 3 channels."""
  return jnp.broadcast_to(_luma(img), img.shape)


def _blend(img: jax.Array, target, factor) -> jax.Array:
  """torchvision `_blend`: clip(factor * img + (1 - factor) * target, 0, 1)."""
  return jnp.clip(factor * img + (1.0 - factor) * target, 0.0, 1.0)


def _image_mean(gray: jax.Array) -> jax.Array:
  return jnp.mean(gray, axis=(-3, -2, -1), keepdims=True)


def adjust_brightness(img: jax.Array, factor) -> jax.Array:
  """[..., H, W, 3] -> clip(factor * img)."""
  return _blend(img, 0.0, factor)


def adjust_contrast(img: jax.Array, factor) -> jax.Array:
  """[..., H, W, 3] blended with the mean of its grayscale image."""
  return _blend(img, _image_mean(_luma(img)), factor)


def adjust_saturation(img: jax.Array, factor) -> jax.Array:
  """[..., H, W, 3] blended with its grayscale image."""
  return _blend(img, _luma(img), factor)


def adjust_hue(img: jax.Array, factor) -> jax.Array:
  """[..., H, W, 3]: shift H in HSV by `factor` in [-0.5, 0.5] (torchvision `adjust_hue` on tensors)."""
  r, g, b = img[..., 0], img[..., 1], img[..., 2]
  maxc, minc = jnp.max(img, axis=-1), jnp.min(img, axis=-1)
  chroma = maxc - minc
  achromatic = chroma == 0
  s = chroma / jnp.where(achromatic, 1.0, maxc)
  d = jnp.where(achromatic, 1.0, chroma)
  rc, gc, bc = (maxc - r) / d, (maxc - g) / d, (maxc - b) / d
  h = jnp.where(maxc == r, bc - gc, jnp.where(maxc == g, 2.0 + rc - bc, 4.0 + gc - rc))
  h = jnp.mod(h / 6.0 + 1.0 + factor, 1.0)
  # HSV -> RGB in closed form: channel n in (5, 3, 1) is v - v s clip(min(k, 4 - k), 0, 1), k = (n + 6h) mod 6.
  k = jnp.mod(jnp.asarray([5.0, 3.0, 1.0], img.dtype) + 6.0 * h[..., None], 6.0)
  v, s = maxc[..., None], s[..., None]
  return v - v * s * jnp.clip(jnp.minimum(k, 4.0 - k), 0.0, 1.0)


def _blend_step(img: jax.Array, op: jax.Array, factor: jax.Array) -> jax.Array:
  """One of brightness / contrast / saturation picked by a traced `op` index; factor 1 is the identity."""
  gray = _luma(img)
  target = jnp.where(op == SATURATION, gray, jnp.where(op == CONTRAST, _image_mean(gray), 0.0))
  return _blend(img, target, factor)


def apply_jitter(img: jax.Array, factors: jax.Array, order: jax.Array) -> jax.Array:
  """Apply the four ColorJitter ops to [H, W, 3] in `order` (a permutation of 0..3).

  factors: [4] (brightness, contrast, saturation, hue). The three blend ops share one form, so the sequence is
  split at the hue op: three blend steps before it, hue once, three after; each blend step runs with its factor
  on its side of hue and with factor 1 (exactly the identity on [0, 1]) on the other.
  """
  is_hue = order == HUE
  hue_pos = jnp.argmax(is_hue)
  blends = order[jnp.argsort(is_hue, stable=True)[:3]]
  for j, op in enumerate(blends):
    img = _blend_step(img, op, jnp.where(j < hue_pos, factors[op], 1.0))
  img = adjust_hue(img, factors[HUE])
  for j, op in enumerate(blends):
    img = _blend_step(img, op, jnp.where(j >= hue_pos, factors[op], 1.0))
  return img


def _jitter(u: jax.Array, img: jax.Array, strengths: Sequence[float]) -> jax.Array:
  """ColorJitter driven by 8 uniforms: 4 factors, then 4 sort keys whose argsort is the op order."""
  b, c, s, h = strengths
  if not 0.0 <= h <= 0.5:
    raise ValueError(f"hue strength must be in [0, 0.5], got {h}")
  lo = jnp.asarray([max(0.0, 1.0 - b), max(0.0, 1.0 - c), max(0.0, 1.0 - s), -h])
  hi = jnp.asarray([1.0 + b, 1.0 + c, 1.0 + s, h])
  return apply_jitter(img, lo + (hi - lo) * u[:4], jnp.argsort(u[4:]))


def color_jitter(key: jax.Array, img: jax.Array, brightness: float = 0.4, contrast: float = 0.4,
                 saturation: float = 0.4, hue: float = 0.1) -> jax.Array:
  """torchvision ColorJitter on one [H, W, 3] image: factors U[max(0, 1 - x), 1 + x] (hue U[-hue, hue]),
  ops in a uniformly random order."""
  return _jitter(jax.random.uniform(key, (_JITTER_UNIFORMS,)), img, (brightness, contrast, saturation, hue))


def _below(u: jax.Array, n: jax.Array) -> jax.Array:
  """A uniform in [0, 1) -> an integer uniform in 0..n-1."""
  return jnp.minimum(jnp.floor(u * n).astype(jnp.int32), n - 1)


def _crop_box(u: jax.Array, height: int, width: int, scale: Sequence[float],
              ratio: Sequence[float]) -> tuple[jax.Array, ...]:
  """RandomResizedCrop.get_params driven by 2 * CROP_ATTEMPTS + 2 uniforms."""
  u_area, u_ratio, u_pos = jnp.split(u, [CROP_ATTEMPTS, 2 * CROP_ATTEMPTS])
  area = height * width * (scale[0] + (scale[1] - scale[0]) * u_area)
  log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
  aspect = jnp.exp(log_lo + (log_hi - log_lo) * u_ratio)
  ws = jnp.round(jnp.sqrt(area * aspect)).astype(jnp.int32)
  hs = jnp.round(jnp.sqrt(area / aspect)).astype(jnp.int32)
  fits = (ws > 0) & (ws <= width) & (hs > 0) & (hs <= height)
  first = jnp.argmax(fits)
  found = fits[first]
  in_ratio = width / height
  if in_ratio < min(ratio):
    fallback_h, fallback_w = round(width / min(ratio)), width
  elif in_ratio > max(ratio):
    fallback_h, fallback_w = height, round(height * max(ratio))
  else:
    fallback_h, fallback_w = height, width
  h = jnp.where(found, hs[first], fallback_h)
  w = jnp.where(found, ws[first], fallback_w)
  top = jnp.where(found, _below(u_pos[0], height - h + 1), (height - h) // 2)
  left = jnp.where(found, _below(u_pos[1], width - w + 1), (width - w) // 2)
  return top, left, h, w


def sample_crop(key: jax.Array, height: int, width: int, scale: Sequence[float] = (0.08, 1.0),
                ratio: Sequence[float] = (3 / 4, 4 / 3)) -> tuple[jax.Array, ...]:
  """torchvision RandomResizedCrop.get_params -> int32 scalars (top, left, crop_h, crop_w).

  All CROP_ATTEMPTS candidates are drawn at once and the first that fits is taken; if none fits, the central
  crop with the aspect ratio clamped to `ratio`.
  """
  return _crop_box(jax.random.uniform(key, (_CROP_UNIFORMS,)), height, width, scale, ratio)


def _resize_weights(start: jax.Array, length: jax.Array, in_size: int, out_size: int) -> jax.Array:
  """[out_size, in_size] bilinear weights over rows start..start+length-1 (half-pixel centres, edge clamp)."""
  length = length.astype(jnp.float32)
  src = start + (jnp.arange(out_size, dtype=jnp.float32) + 0.5) * (length / out_size) - 0.5
  src = jnp.clip(src, start, start + length - 1.0)
  return jnp.maximum(0.0, 1.0 - jnp.abs(src[:, None] - jnp.arange(in_size, dtype=jnp.float32)))


def resized_crop(img: jax.Array, top: jax.Array, left: jax.Array, h: jax.Array, w: jax.Array) -> jax.Array:
  """Crop [H, W, C] to rows top..top+h-1, columns left..left+w-1 and resize bilinearly back to [H, W, C].

  Two small matmuls with interpolation matrices: half-pixel bilinear as torch `interpolate(align_corners=False)`
  and PIL's BILINEAR when enlarging. No antialias: it only matters when shrinking, and a crop is never larger than
  the output.
  """
  height, width = img.shape[:2]
  wy = _resize_weights(top, h, height, height)
  wx = _resize_weights(left, w, width, width)
  hp = jax.lax.Precision.HIGHEST
  rows = jnp.einsum("yk,klc->ylc", wy, img, precision=hp)
  return jnp.einsum("xl,ylc->yxc", wx, rows, precision=hp)


def random_resized_crop(key: jax.Array, img: jax.Array, scale: Sequence[float] = (0.08, 1.0),
                        ratio: Sequence[float] = (3 / 4, 4 / 3)) -> jax.Array:
  """torchvision RandomResizedCrop to the input size: [H, W, C] -> [H, W, C]."""
  return resized_crop(img, *sample_crop(key, img.shape[0], img.shape[1], scale, ratio))


def hflip(img: jax.Array) -> jax.Array:
  """[..., H, W, C] mirrored left-right."""
  return img[..., ::-1, :]


def _augment_one(key: jax.Array, img: jax.Array, crop: bool, crop_scale, crop_ratio, flip_prob: float,
                 jitter, jitter_prob: float, gray_prob: float) -> jax.Array:
  """One [H, W, 3] image; all its randomness is one draw of uniforms (one threefry call per sample)."""
  u = jax.random.uniform(key, (_CROP_UNIFORMS + _JITTER_UNIFORMS + 3,))
  u_crop, u_jitter, (u_flip, u_apply, u_gray) = jnp.split(
      u, [_CROP_UNIFORMS, _CROP_UNIFORMS + _JITTER_UNIFORMS])
  if crop:
    img = resized_crop(img, *_crop_box(u_crop, img.shape[0], img.shape[1], crop_scale, crop_ratio))
  img = jnp.where(u_flip < flip_prob, hflip(img), img)
  img = jnp.where(u_apply < jitter_prob, _jitter(u_jitter, img, jitter), img)
  return jnp.where(u_gray < gray_prob, grayscale(img), img)


def batch_keys(key: jax.Array, images: jax.Array) -> jax.Array:
  """One key per sample, sharded like the batch axis of `images` (vmap needs matching shardings)."""
  keys = jax.random.split(key, images.shape[0])
  sharding = jax.typeof(images).sharding
  if sharding.spec and sharding.spec[0] is not None:
    keys = jax.sharding.reshard(keys, jax.NamedSharding(sharding.mesh, jax.P(sharding.spec[0])))
  return keys


def simclr_augment(key: jax.Array, images: jax.Array, *, crop: bool = True,
                   crop_scale: Sequence[float] = (0.08, 1.0), crop_ratio: Sequence[float] = (3 / 4, 4 / 3),
                   flip_prob: float = 0.5, jitter: Sequence[float] = (0.4, 0.4, 0.4, 0.1),
                   jitter_prob: float = 0.8, gray_prob: float = 0.2) -> jax.Array:
  """uint8 [B, H, W, 3] -> float32 [B, H, W, 3] in [0, 1], not normalised.

  RandomResizedCrop (if `crop`), HFlip, RandomApply(ColorJitter(*jitter), jitter_prob), RandomGrayscale; with
  `crop=False` this is BadEncoder's "finetune" transform. Sample b uses `jax.random.split(key, B)[b]`.
  """
  augment = functools.partial(_augment_one, crop=crop, crop_scale=tuple(crop_scale), crop_ratio=tuple(crop_ratio),
                              flip_prob=flip_prob, jitter=tuple(jitter), jitter_prob=jitter_prob,
                              gray_prob=gray_prob)
  return jax.vmap(augment)(batch_keys(key, images), to_float(images))


def crop_flip(key: jax.Array, images: jax.Array, padding: int, flip_prob: float) -> jax.Array:
  """RandomCrop(H, padding, zero fill) then RandomHorizontalFlip(flip_prob): uint8 [B, H, W, C] -> same.

  Sample b draws its offsets and flip from `jax.random.split(key, B)[b]`.
  """
  b, h, w, c = images.shape
  padded = jnp.pad(images, ((0, 0), (padding, padding), (padding, padding), (0, 0)))

  def one(k, img):
    k_top, k_left, k_flip = jax.random.split(k, 3)
    top = jax.random.randint(k_top, (), 0, 2 * padding + 1)
    left = jax.random.randint(k_left, (), 0, 2 * padding + 1)
    img = jax.lax.dynamic_slice(img, (top, left, 0), (h, w, c))
    return jnp.where(jax.random.uniform(k_flip) < flip_prob, hflip(img), img)

  return jax.vmap(one)(batch_keys(key, padded), padded)
