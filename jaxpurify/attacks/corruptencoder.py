"""CorruptEncoder (Zhang et al., CVPR 2024): poisoned images added to the pre-training set, each a reference object
of the target class on one side of a background and the trigger on the other (attacks.md section 2.5).

The official `generate-poison/generate_poisoned_images.py` at our image size (our stand-ins, docs/encoder-attacks.md):
- references: `num_references` target-class images of the pre-training set (drawn with the seed); the object is
  the bounding box of the pixels whose brightest channel is >= `object_threshold` (0: the whole image), in place
  of the labelme masks;
- backgrounds: images of the other classes of the pre-training set (`background='other_classes'`, drawn without
  replacement) or black (`'black'`), in place of Places365; the canvas is the image size, so the object is fitted
  (aspect kept) into a box of the full height and width/area_ratio (the code: canvas = o_h x area_ratio·o_w);
- layout as the code: object at the bottom, on the left (x in [0, δW)) or right (x in [W - o_w - δW, W - o_w))
  with probability 1/2; trigger on the other side, x uniform between o_x + o_w + Δx·W and W - Δx·W - t (object
  left) or between Δx·W and o_x - Δx·W - t (object right), Δx = trigger_marginal / 2, y uniform in
  [Δy·H, H - Δy·H - t], Δy = trigger_marginal; positions truncated to integers and clipped into the image. The
  object's mask is pasted hard (the code blurs it with a 1-pixel Gaussian, a large fraction of 32 pixels).
"""

from typing import NamedTuple

import numpy as np
from PIL import Image

from jaxpurify.errors import UserError

BACKGROUNDS = ("other_classes", "black")


class Layout(NamedTuple):
  """Where each poisoned image's parts come from and lie (P poisoned images):
  references int64 [R] (positions in the pre-training set), reference int64 [P] (which of them), background
  int64 [P] (position, -1 for black), object_box int64 [P, 4] (row, col, height, width), trigger int64 [P, 2]
  (row, col), object_left bool [P]."""
  references: np.ndarray
  reference: np.ndarray
  background: np.ndarray
  object_box: np.ndarray
  trigger: np.ndarray
  object_left: np.ndarray


def num_poisoned(num_examples: int, ratio: float) -> int:
  """round(ratio x N): the official 650 images are 0.5% of ImageNet100-A."""
  if not 0 < ratio <= 1:
    raise UserError(f"poison ratio {ratio} is not in (0, 1]; set config.attack.poison_ratio")
  return round(ratio * num_examples)


def reference_object(image: np.ndarray, threshold: int, box: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
  """The object of uint8 `image` [H, W, 3] (bounding box of pixels with max channel >= threshold) resized, aspect
  kept, to fit `box` (height, width) -> (uint8 [h, w, 3], bool mask [h, w])."""
  mask = image.max(-1) >= threshold
  if not mask.any():
    raise UserError(f"a reference image has no pixel of brightness >= {threshold}; lower "
                    "config.attack.object_threshold (0 takes the whole image)")
  rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
  crop = (slice(rows[0], rows[-1] + 1), slice(cols[0], cols[-1] + 1))
  height, width = rows[-1] + 1 - rows[0], cols[-1] + 1 - cols[0]
  scale = min(box[0] / height, box[1] / width)
  size = (max(1, int(width * scale)), max(1, int(height * scale)))  # PIL: (width, height)
  pixels = np.asarray(Image.fromarray(image[crop]).resize(size, Image.Resampling.BICUBIC), np.uint8)
  shape = np.asarray(Image.fromarray(mask[crop]).resize(size, Image.Resampling.NEAREST), bool)
  return pixels, shape


def layout(labels: np.ndarray, target: int, count: int, object_sizes: np.ndarray, references: np.ndarray,
           image_size: int, trigger_size: int, object_marginal: float, trigger_marginal: float, background: str,
           seed: int) -> Layout:
  """The random choices of `count` poisoned images: a reference (sizes int [R, 2] of their fitted objects), a
  background, the object's side and position, the trigger's position; all from np.random.default_rng([seed, 3])."""
  rng = np.random.default_rng([seed, 3])
  size, t = image_size, trigger_size
  if background == "other_classes":
    pool = np.flatnonzero(labels != target)
    if len(pool) < count:
      raise UserError(f"{count} poisoned images need as many background images, but the pre-training set has "
                      f"{len(pool)} outside class {target}; lower config.attack.poison_ratio")
    backgrounds = rng.choice(pool, count, replace=False).astype(np.int64)
  else:
    backgrounds = np.full(count, -1, np.int64)
  reference = rng.integers(0, len(references), count)
  left = rng.random(count) < 0.5
  o_h, o_w = object_sizes[reference, 0], object_sizes[reference, 1]
  delta, dx, dy = object_marginal * size, trigger_marginal / 2 * size, trigger_marginal * size
  uniform = lambda a, b: a + (b - a) * rng.random(count)  # Python's random.uniform: either order of a, b
  o_x = np.trunc(np.where(left, uniform(0, delta), uniform(size - o_w - delta, size - o_w)))
  t_x = np.where(left, uniform(o_x + o_w + dx, size - dx - t), uniform(dx, o_x - dx - t))
  t_y = uniform(dy, size - dy - t)
  object_box = np.stack([size - o_h, np.clip(o_x, 0, size - o_w), o_h, o_w], 1).astype(np.int64)
  trigger = np.clip(np.trunc(np.stack([t_y, t_x], 1)), 0, size - t).astype(np.int64)
  return Layout(references, reference.astype(np.int64), backgrounds, object_box, trigger, left)


def compose(images: np.ndarray, plan: Layout, objects: list, patch: np.ndarray | None) -> np.ndarray:
  """uint8 [P, H, W, 3]: each poisoned image of `plan` from the pre-training `images` and the fitted `objects`
  [(pixels, mask)] of its references, with `patch` uint8 [t, t, 3] at the trigger position (None: no trigger,
  threat 3 applies the data attack's trigger afterwards)."""
  out = np.zeros((len(plan.reference),) + images.shape[1:], np.uint8)
  for i, (ref, bg, (o_y, o_x, o_h, o_w), (t_y, t_x)) in enumerate(zip(
      plan.reference, plan.background, plan.object_box, plan.trigger)):
    if bg >= 0:
      out[i] = images[bg]
    pixels, mask = objects[ref]
    region = out[i, o_y:o_y + o_h, o_x:o_x + o_w]
    region[mask] = pixels[mask]
    if patch is not None:
      out[i, t_y:t_y + len(patch), t_x:t_x + len(patch)] = patch
  return out


def poison(images: np.ndarray, labels: np.ndarray, target: int, settings, patch: np.ndarray | None,
           seed: int) -> tuple[np.ndarray, Layout]:
  """-> (the poisoned images uint8 [P, H, W, 3] to append to the pre-training set, their Layout), P =
  round(settings.poison_ratio x N), references from class `target`, from config.attack-like `settings`
  (poison_ratio, num_references, object_threshold, area_ratio, object_marginal, trigger_marginal, background).
  patch None: no trigger pasted (the Layout's trigger positions are -1; threat 3 applies its own trigger)."""
  if settings.background not in BACKGROUNDS:
    raise UserError(f"unknown config.attack.background {settings.background!r}; use one of {', '.join(BACKGROUNDS)}")
  size = images.shape[1]
  if patch is not None and len(patch) > size // 2:
    raise UserError(f"a {len(patch)}-pixel trigger does not fit beside the object in a {size}-pixel image; lower "
                    f"config.attack.trigger.size to at most {size // 2}")
  members = np.flatnonzero(labels == target)
  if len(members) < settings.num_references:
    raise UserError(f"the pre-training set has {len(members)} images of target class {target}, fewer than "
                    f"config.attack.num_references={settings.num_references}; lower it or choose another target")
  references = np.sort(np.random.default_rng([seed, 2]).choice(members, settings.num_references, replace=False))
  box = (size, int(size / settings.area_ratio))
  objects = [reference_object(images[r], settings.object_threshold, box) for r in references]
  plan = layout(labels, target, num_poisoned(len(labels), settings.poison_ratio),
                np.array([o[1].shape for o in objects]), references.astype(np.int64), size,
                1 if patch is None else len(patch), settings.object_marginal, settings.trigger_marginal,
                settings.background, seed)
  if patch is None:
    plan = plan._replace(trigger=np.full_like(plan.trigger, -1))
  return compose(images, plan, objects, patch), plan
