"""Reference inputs of BadEncoder and DRUPE: images of the target class of the downstream set."""

import os

import numpy as np

from jaxpurify.data import ImageSplit
from jaxpurify.errors import UserError


def check_target(target: int, split: ImageSplit) -> None:
  if not 0 <= target < split.num_classes:
    raise UserError(f"target class {target} is outside {split.name}'s {split.num_classes} classes "
                    f"(0-{split.num_classes - 1}); set config.attack.target")


def choose(split: ImageSplit, target: int, count: int, seed: int, reference_file: str = "") -> np.ndarray:
  """uint8 [count, H, W, 3]: from `reference_file` (BadEncoder/DRUPE .npz, key `x`) if given, else `count`
  images of class `target` drawn from `split` with `seed`."""
  check_target(target, split)
  if reference_file:
    return load_file(reference_file, split.images.shape[1:])
  pool = np.flatnonzero(split.labels == target)
  if len(pool) < count:
    raise UserError(f"{split.name} {split.split} has {len(pool)} images of target class {target}, fewer than the "
                    f"{count} references asked for; lower config.attack.num_references or choose another target")
  return split.images[np.random.default_rng(seed).choice(pool, count, replace=False)]


def load_file(path: str, shape: tuple[int, ...]) -> np.ndarray:
  """The images under key `x` of a reference .npz (BadEncoder: [1, 32, 32, 3]; DRUPE: [3, 32, 32, 3])."""
  if not os.path.isfile(path):
    raise UserError(f"reference file {path} does not exist; fix config.attack.reference_file or leave it empty")
  try:
    with np.load(path) as npz:
      images = np.asarray(npz["x"])
  except Exception as err:  # numpy raises several types for a damaged or foreign file
    raise UserError(f"reference file {path} is not an .npz with key 'x' ({type(err).__name__}); fix "
                    "config.attack.reference_file") from None
  images = images.reshape((-1,) + images.shape[-3:]) if images.ndim >= 3 else images
  if images.shape[1:] != tuple(shape) or images.min() < 0 or images.max() > 255:
    raise UserError(f"reference file {path} holds images of shape {images.shape[1:]}, the downstream images are "
                    f"{tuple(shape)} uint8; use references at the data's image size")
  return images.astype(np.uint8)
