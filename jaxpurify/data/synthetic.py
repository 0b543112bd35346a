"""Synthetic data for benchmarks: uniform uint8 images and cycling labels, deterministic."""

import numpy as np

BENCH_BATCHES = 4  # a benchmark's synthetic set holds this many global batches, cycled through as epochs


def images(count: int, size: int, seed: int = 0) -> np.ndarray:
  """uint8 [count, size, size, 3] uniform noise from `seed`."""
  return np.random.default_rng(seed).integers(0, 256, (count, size, size, 3), np.uint8)


def labels(count: int, num_classes: int = 10) -> np.ndarray:
  """int32 [count]: 0, 1, ..., num_classes - 1, 0, 1, ..."""
  return (np.arange(count) % num_classes).astype(np.int32)
