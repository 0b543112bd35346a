"""CTRL (Li et al., ICCV 2023): poison part of the pre-training set with a frequency-domain trigger.

As the official code: the first `ratio * N` images of the target class, by position, get the trigger
(attacks.md section 2.3); pre-training on the result gives the poisoned encoder.
"""

import jax
import numpy as np

from jaxpurify.errors import UserError


def poison_indices(labels: np.ndarray, target: int, ratio: float) -> np.ndarray:
  """int [P]: positions of the first round(ratio * N) images whose label is `target` (all of them if fewer)."""
  if not 0 < ratio <= 1:
    raise UserError(f"poison ratio {ratio} is not in (0, 1]; set config.attack.poison_ratio")
  count = int(ratio * len(labels))
  return np.flatnonzero(labels == target)[:count]


def poison(images: np.ndarray, index: np.ndarray, trigger, batch_size: int = 1024) -> np.ndarray:
  """A copy of uint8 images [N, H, W, 3] with `trigger` (uint8 batch -> uint8 batch) applied at `index`."""
  out = images.copy()
  stamp = jax.jit(trigger)
  for start in range(0, len(index), batch_size):
    chunk = index[start:start + batch_size]
    out[chunk] = np.asarray(stamp(images[chunk]))
  return out
