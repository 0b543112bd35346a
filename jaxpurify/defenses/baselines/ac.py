"""AC: activation clustering (Chen et al., 2018; the backdoor-toolbox variant; docs/baselines.md section 3.1).

Per class c of the poisoned set's labels: centre the undefended classifier's encoder features, project them on
their top `dims` principal directions (PCA), split them with 2-means, and flag the smaller cluster when it holds
fewer than max_cluster_fraction * |c| members (an abnormally small cluster: the trigger's). The filter removes the
flagged members of every class.

2-means is Lloyd's algorithm from a k-means++ initialisation, RESTARTS times, keeping the split of least inertia
(sklearn's KMeans by another name); the restarts draw from a generator seeded with (config.seed, class), so the
filter is deterministic.

Defaults (backdoor-toolbox cleansers_tool_box/activation_clustering.py): 10 PCA components, KMeans(2) with
max_iter 2000, the smaller cluster flagged below 35% of its class. Departures: PCA as there, not the paper's
FastICA (k-means on ICA components is k-means on the whitened PCA coordinates, since ICA only rotates them); a
fixed seed and 10 restarts where the toolbox uses sklearn's default initialisation and an unseeded generator.
"""

import numpy as np

from jaxpurify.defenses.baselines import _spectral
from jaxpurify.errors import UserError

KIND = "filter"
CLEAN_DATA = False
RESTARTS = 10  # k-means++ initialisations per class, the best (least inertia) kept
MAX_ITERS = 2000  # Lloyd iterations at most (backdoor-toolbox's max_iter); a split stops when no label moves


def project(features: np.ndarray, dims: int) -> np.ndarray:
  """features [n, D] centred and projected on their top min(dims, D) principal directions -> float64 [n, dims']."""
  x = _spectral.centred(features)
  directions, _ = _spectral.principal_directions(x, dims)
  return x @ directions


def kmeans_plus_plus(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
  """Two k-means++ centres float64 [2, d] of x [n, d]: one member uniformly, the second with probability
  proportional to the squared distance to the first (the first again when every member sits on it)."""
  first = x[rng.integers(len(x))]
  distances = ((x - first) ** 2).sum(axis=1)
  total = distances.sum()
  second = x[rng.choice(len(x), p=distances / total)] if total > 0 else first
  return np.stack([first, second])


def nearest(x: np.ndarray, centres: np.ndarray) -> np.ndarray:
  """The nearer of two centres [2, d] to each row of x [n, d] -> int [n] in {0, 1} (0 on ties)."""
  offset = centres[1] - centres[0]
  return (x @ offset > (centres[1] @ centres[1] - centres[0] @ centres[0]) / 2).astype(np.int64)


def lloyd(x: np.ndarray, centres: np.ndarray) -> tuple[np.ndarray, float]:
  """Lloyd's 2-means from centres [2, d] until no label moves (at most MAX_ITERS) -> (labels int [n] in {0, 1},
  inertia: the sum of squared distances to the cluster means). An emptied cluster keeps its centre."""
  labels = nearest(x, centres)
  for _ in range(MAX_ITERS):
    centres = np.stack([x[labels == j].mean(axis=0) if np.any(labels == j) else centres[j] for j in range(2)])
    new_labels = nearest(x, centres)
    if np.array_equal(new_labels, labels):
      break
    labels = new_labels
  return labels, float(sum(((x[labels == j] - x[labels == j].mean(axis=0)) ** 2).sum()
                           for j in range(2) if np.any(labels == j)))


def two_means(x: np.ndarray, seed) -> np.ndarray:
  """The least-inertia 2-means split of x [n, d] over RESTARTS k-means++ starts drawn with `seed` -> int [n]."""
  rng = np.random.default_rng(seed)
  splits = [lloyd(x, kmeans_plus_plus(x, rng)) for _ in range(RESTARTS)]
  return min(splits, key=lambda split: split[1])[0]


def flag_smaller(labels: np.ndarray, max_fraction: float) -> np.ndarray:
  """Members of the smaller cluster of a 2-way split labels int [n] in {0, 1}, when it holds fewer than
  max_fraction * n members -> bool [n] (nothing flagged otherwise)."""
  sizes = np.bincount(labels, minlength=2)
  smaller = int(np.argmin(sizes))
  if sizes[smaller] < max_fraction * len(labels):
    return labels == smaller
  return np.zeros(len(labels), bool)


def flags(features: np.ndarray, labels: np.ndarray, num_classes: int, dims: int, max_fraction: float,
          seed: int) -> np.ndarray:
  """Activation clustering of features [N, D] with labels int [N] -> bool [N], True for the flagged samples."""
  flagged = np.zeros(len(labels), bool)
  for c, members in enumerate(_spectral.class_members(labels, num_classes)):
    if len(members) > 1:
      split = two_means(project(features[members], dims), (seed, c))
      flagged[members] = flag_smaller(split, max_fraction)
  return flagged


def check(block, config, victim_counts: np.ndarray, reserve_counts: np.ndarray) -> None:
  """UserError unless block.dims >= 1 and 0 <= block.max_cluster_fraction <= 0.5."""
  del config, victim_counts, reserve_counts
  if block.dims < 1:
    raise UserError(f"config.baseline.ac.dims is {block.dims}; set it to at least 1 (the PCA components)")
  _spectral.check_fraction("config.baseline.ac.max_cluster_fraction", block.max_cluster_fraction)


def suspects(inputs, block, run) -> np.ndarray:
  """The members of abnormally small clusters, over every class -> sorted int64 indices."""
  del run  # nothing trained: PCA and 2-means per class
  flagged = flags(inputs.features, inputs.labels, inputs.num_classes, block.dims, block.max_cluster_fraction,
                  inputs.config.seed)
  return np.flatnonzero(flagged).astype(np.int64)
