"""SSL-Backdoor (Saha et al., CVPR 2022): an opaque image patch pasted into target-class images of the pre-training
set, at a random location within [0.25, 0.75] of the image (attacks.md section 2.4).

As the official code (`poison-generation/generate_poison.py`, position 'random'): round(rate x class size) images of
the target class (rate 1.0 in the code's config; the paper used 0.5), drawn with the seed, each get the patch with
its top-left corner uniform in [int(0.25 H), max(int(0.75 H - S), int(0.25 H))]; the poisoned test images take
[0.10, 0.90] (`patches.random_paste`).
"""

import jax
import numpy as np

from jaxpurify.attacks import patches
from jaxpurify.errors import UserError


def poison_indices(labels: np.ndarray, target: int, rate: float, seed: int) -> np.ndarray:
  """int64 [P], sorted: round(rate x class size) positions of class `target`, drawn without replacement."""
  if not 0 < rate <= 1:
    raise UserError(f"poison rate {rate} is not in (0, 1]; set config.attack.poison_rate")
  members = np.flatnonzero(labels == target)
  count = round(rate * len(members))
  return np.sort(np.random.default_rng(seed).choice(members, count, replace=False)).astype(np.int64)


def poison(images: np.ndarray, index: np.ndarray, patch: np.ndarray, bounds: tuple[int, int],
           seed: int) -> tuple[np.ndarray, np.ndarray]:
  """-> (a copy of uint8 images [N, H, W, 3] with `patch` pasted into images `index`, the (row, col) positions
  int64 [P, 2]), the positions drawn uniformly in `bounds` with np.random.default_rng(seed)."""
  positions = patches.draw_positions(np.random.default_rng([seed, 1]), len(index), bounds)
  out = images.copy()
  if len(index):
    out[index] = np.asarray(jax.jit(patches.paste)(images[index], patch, positions))
  return out, positions
