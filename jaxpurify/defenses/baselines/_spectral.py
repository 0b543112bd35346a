"""Per-class helpers of the spectral filters (SS, AC, SPECTRE): class members, principal directions of centred
class features, and a per-class removal budget. Host-side NumPy in float64."""

import math

import numpy as np

from jaxpurify.errors import UserError


def class_members(labels: np.ndarray, num_classes: int) -> list[np.ndarray]:
  """labels int [N] -> for each class c < num_classes the sorted int64 indices of its members."""
  labels = np.asarray(labels)
  return [np.flatnonzero(labels == c).astype(np.int64) for c in range(num_classes)]


def centred(features: np.ndarray) -> np.ndarray:
  """features [n, D] minus their mean, float64 [n, D]."""
  x = np.asarray(features, np.float64)
  return x - x.mean(axis=0)


def principal_directions(x: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
  """The top-k right singular vectors of x [n, D] (columns of float64 [D, k'], k' = min(k, D)) and the singular
  values of x, all D of them, descending; from the eigendecomposition of x^T x."""
  eigenvalues, vectors = np.linalg.eigh(x.T @ x)
  order = np.argsort(eigenvalues)[::-1]
  return vectors[:, order[:k]], np.sqrt(np.clip(eigenvalues[order], 0.0, None))


def budget(class_size: int, fraction: float) -> int:
  """How many of a class's samples a filter removes: ceil(fraction * size), at most half the class (the toolkits'
  'at least half of each class is clean')."""
  return min(math.ceil(fraction * class_size - 1e-9), class_size // 2)  # slack: 0.15 * 100 is 15.000000000000002


def top_per_class(scores: np.ndarray, labels: np.ndarray, num_classes: int, fraction: float) -> np.ndarray:
  """The `budget(class size, fraction)` highest-scoring samples of every class; scores float [N] -> sorted int64
  indices (ties broken towards the lower index; a NaN score, a sample not scored, is never removed)."""
  removed = []
  for members in class_members(labels, num_classes):
    order = members[np.argsort(-scores[members], kind="stable")]
    removed.append(order[np.isfinite(scores[order])][:budget(len(members), fraction)])
  return np.sort(np.concatenate(removed)).astype(np.int64)


def check_fraction(field: str, value: float) -> None:
  """UserError unless 0 <= value <= 0.5; field names the value in the config."""
  if not 0.0 <= value <= 0.5:
    raise UserError(f"{field} is {value}; set it between 0 and 0.5 (a fraction of each class)")
