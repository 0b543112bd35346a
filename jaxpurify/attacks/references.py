"""Reference inputs of BadEncoder and DRUPE: images of the target class of the downstream set."""

import os
from typing import Callable

import numpy as np

from jaxpurify.data import ImageSplit
from jaxpurify.errors import UserError


def check_target(target: int, split: ImageSplit) -> None:
  if not 0 <= target < split.num_classes:
    raise UserError(f"target class {target} is outside {split.name}'s {split.num_classes} classes "
                    f"(0-{split.num_classes - 1}); set config.attack.target")


CHOICES = ("random", "typical")


def choose(split: ImageSplit, target: int, count: int, seed: int, reference_file: str = "",
           features: Callable[[np.ndarray], np.ndarray] | None = None) -> np.ndarray:
  """uint8 [count, H, W, 3]: from `reference_file` (BadEncoder/DRUPE .npz, key `x`) if given, else `count`
  images of class `target` of `split`: drawn with `seed`, or, given `features` (uint8 [N, H, W, 3] -> the clean
  encoder's features [N, D]), the most typical ones (`most_typical`)."""
  check_target(target, split)
  if reference_file:
    return load_file(reference_file, split.images.shape[1:])
  pool = np.flatnonzero(split.labels == target)
  if len(pool) < count:
    raise UserError(f"{split.name} {split.split} has {len(pool)} images of target class {target}, fewer than the "
                    f"{count} references asked for; lower config.attack.num_references or choose another target")
  if features is not None:
    return split.images[pool[most_typical(features(split.images[pool]), count)]]
  return split.images[np.random.default_rng(seed).choice(pool, count, replace=False)]


def most_typical(features: np.ndarray, count: int) -> np.ndarray:
  """Indices of the `count` rows of features [N, D] with the highest cosine similarity to the rows' mean direction,
  most typical first: the images a clean encoder places at the centre of their class, as a hand-picked reference
  file would be."""
  unit = features / np.maximum(np.linalg.norm(features, axis=1, keepdims=True), 1e-12)
  centre = unit.mean(axis=0)
  return np.argsort(-(unit @ centre), kind="stable")[:count]


def load_file(path: str, shape: tuple[int, ...]) -> np.ndarray:
  """The images under key `x` of a reference .npz (BadEncoder: [1, 32, 32, 3]; DRUPE: [3, 32, 32, 3]) as uint8.

  Accepted: integers in 0..255, floats holding whole numbers in 0..255, and floats in [0, 1], which are scaled by
  255 and rounded. Anything else is refused in one line that says what the file holds.
  """
  if not os.path.isfile(path):
    raise UserError(f"reference file {path} does not exist; fix config.attack.reference_file or leave it empty")
  try:
    with np.load(path, allow_pickle=False) as npz:
      images = np.asarray(npz["x"])
  except Exception as err:  # numpy raises several types for a damaged or foreign file
    raise UserError(f"reference file {path} is not an .npz with key 'x' ({type(err).__name__}); fix "
                    "config.attack.reference_file") from None
  images = images.reshape((-1,) + images.shape[-3:]) if images.ndim >= 3 else images
  needs = f"uint8 images [N, {', '.join(map(str, shape))}] (or floats in [0, 1])"
  numeric = np.issubdtype(images.dtype, np.integer) or np.issubdtype(images.dtype, np.floating)
  if not numeric or not images.size or images.shape[1:] != tuple(shape):
    raise UserError(f"reference file {path} holds {images.dtype} {images.shape}; config.attack.reference_file needs "
                    f"{needs}")
  if np.issubdtype(images.dtype, np.floating) and np.all(np.isfinite(images)) and 0 <= images.min() \
      and images.max() <= 1:
    images = np.round(images * 255.0)
  if not np.all(np.isfinite(images)) or images.min() < 0 or images.max() > 255 or np.any(images != np.round(images)):
    raise UserError(f"reference file {path} holds {images.dtype} values in [{images.min()}, {images.max()}] that are "
                    f"not pixel values; config.attack.reference_file needs {needs}")
  return images.astype(np.uint8)
