"""Which training positions a dataset-poisoning attack changes: deterministic, logged index sets.

- `poison_indices`: the poisoned positions of a dirty-label (BadNets, Blended, Trojan, WaNet, Adaptive-Blend) or
  clean-label (SIG, LC) attack, following BackdoorBench's `utils/backdoor_generate_poison_index.py` (attacks.md 4.1).
- `cross_indices`: the extra positions that get the trigger but keep their labels, disjoint from the poisoned ones:
  WaNet's cross (noise-mode) samples, or Adaptive-Blend/Adaptive-Patch cover samples.

Both draw with `np.random.default_rng(seed).choice(pool, count, replace=False)` and return sorted int64 arrays, so
a (labels, settings, seed) triple always gives the same positions (attacks.md section 9, item 7; log them with the
run). The draws are not BackdoorBench's (it uses the global `np.random` state), only their counts and pools are.
"""

import math

import numpy as np

from jaxpurify.errors import UserError

PREFIX = "config.poison"
CONVENTIONS = ("dataset", "class")


def _seed(seed) -> int:
  if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
    raise UserError(f"{PREFIX}.seed must be a non-negative integer, got {seed!r}; fix {PREFIX}.seed")
  return int(seed)


def _fraction(value, name: str, high: float | None = 1.0) -> float:
  """A finite number in [0, high], else UserError naming `config.poison.<name>`."""
  if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
    raise UserError(f"{PREFIX}.{name} must be a number, got {value!r}; set {PREFIX}.{name} to a fraction such "
                    f"as 0.1")
  value = float(value)
  if not math.isfinite(value) or value < 0 or (high is not None and value > high):
    span = f"in [0, {high:g}]" if high is not None else "a finite number of at least 0"
    raise UserError(f"{PREFIX}.{name} must be {span}, got {value}; set {PREFIX}.{name} to a fraction such as 0.1")
  return value


def _draw(pool: np.ndarray, count: int, seed: int) -> np.ndarray:
  chosen = np.random.default_rng(seed).choice(pool, size=count, replace=False)
  return np.sort(chosen).astype(np.int64)


def poison_indices(labels, rate: float, target: int, *, seed: int, convention: str = "dataset",
                   clean_label: bool = False, exclude_target: bool = False) -> np.ndarray:
  """int64 [P], sorted: the training positions to poison, drawn without replacement from `seed`.

  labels: int [N], the true training labels. The count uses Python's `round` (half to even), as BackdoorBench's
  `round(pratio * len(targets))`:
  - dirty-label (`clean_label=False`): round(rate · N) positions from the whole set, the target class included, as
    BackdoorBench ("in train state, all2one non-clean-label case NO NEED TO AVOID target class img");
    `exclude_target=True` draws them from non-target images only (jaxpurify's option). Only convention "dataset".
  - clean-label (`clean_label=True`, SIG and LC): positions of target-class images only, labels kept. convention
    "dataset" (BackdoorBench: "pratio is ALWAYS #poison / #all samples"): round(rate · N) of them, so rate 0.1 on
    CIFAR-10 takes all 5,000 target images, and more than the class holds is an error; convention "class":
    round(rate · N_target).
  rate 0 gives an empty array. Bad settings raise UserError: rate outside [0, 1], a target that is not a label of
  the data, too few candidate images, an unknown convention.
  """
  labels = np.asarray(labels)
  if labels.ndim != 1 or not (labels.dtype.kind in "iu" or labels.size == 0):
    raise UserError(f"poison selection needs the training labels as a 1-D integer array, got {labels.dtype} "
                    f"{labels.shape}; pass the data set's labels")
  rate = _fraction(rate, "rate")
  if isinstance(target, bool) or not isinstance(target, (int, np.integer)):
    raise UserError(f"{PREFIX}.target must be an integer class label, got {target!r}; fix {PREFIX}.target")
  target = int(target)
  if convention not in CONVENTIONS:
    raise UserError(f"unknown {PREFIX}.convention {convention!r}; use 'dataset' (rate of all images) or 'class' "
                    f"(rate of the target class, clean-label only)")
  seed = _seed(seed)
  total = len(labels)
  is_target = labels == target
  if not is_target.any():
    present = np.unique(labels)
    shown = ", ".join(map(str, present[:20])) + (", ..." if len(present) > 20 else "")
    raise UserError(f"{PREFIX}.target {target} is not a label of the training data (labels: {shown}); set "
                    f"{PREFIX}.target to one of them")
  if clean_label:
    if exclude_target:
      raise UserError(f"{PREFIX}.exclude_target does not apply to clean-label attacks, which poison target-class "
                      f"images only; set {PREFIX}.exclude_target=False")
    pool = np.flatnonzero(is_target)
    count = round(rate * (total if convention == "dataset" else len(pool)))
    if count > len(pool):
      raise UserError(f"clean-label poisoning at {PREFIX}.rate {rate:g} needs {count} images of target class "
                      f"{target} but it has {len(pool)}; lower {PREFIX}.rate to at most {len(pool) / total:.4g} or "
                      f"set {PREFIX}.convention='class'")
  else:
    if convention != "dataset":
      raise UserError(f"{PREFIX}.convention 'class' applies to clean-label attacks only; use 'dataset' for "
                      f"dirty-label poisoning")
    pool = np.flatnonzero(~is_target) if exclude_target else np.arange(total)
    count = round(rate * total)
    if count > len(pool):
      raise UserError(f"dirty-label poisoning at {PREFIX}.rate {rate:g} needs {count} non-target images but there "
                      f"are {len(pool)}; lower {PREFIX}.rate or set {PREFIX}.exclude_target=False")
  return _draw(pool, count, seed)


def cross_indices(num_samples: int, poisoned, cross_ratio: float = 2.0, *, seed: int) -> np.ndarray:
  """int64 [C], sorted: int(cross_ratio · P) positions outside `poisoned` (P positions), drawn from `seed`.

  WaNet's cross (noise-mode) samples get a perturbed warp and keep their labels; BackdoorBench and the official
  WaNet take `num_cross = int(num_bd * cross_ratio)` per batch (default cross_ratio 2, attacks.md 4.2) and BackdoorBox
  the same count over the whole set, from samples not backdoored: so here any class, disjoint from `poisoned`, the
  count truncated. The same draw gives Adaptive-Blend/Adaptive-Patch cover samples (cover rate / poison rate as
  cross_ratio, e.g. 1 for 0.003 / 0.003). Errors: cross_ratio negative or not finite, positions out of range or
  repeated, too few positions left.
  """
  if isinstance(num_samples, bool) or not isinstance(num_samples, (int, np.integer)) or num_samples < 0:
    raise UserError(f"cross selection needs the number of training samples as an integer >= 0, got "
                    f"{num_samples!r}")
  num_samples = int(num_samples)
  poisoned = np.asarray(poisoned)
  if poisoned.ndim != 1 or not (poisoned.dtype.kind in "iu" or poisoned.size == 0):
    raise UserError(f"cross selection needs the poisoned positions as a 1-D integer array, got {poisoned.dtype} "
                    f"{poisoned.shape}; pass the output of poison_indices")
  poisoned = poisoned.astype(np.int64)
  if poisoned.size and (poisoned.min() < 0 or poisoned.max() >= num_samples):
    raise UserError(f"poisoned positions must lie in 0..{num_samples - 1}; pass the output of poison_indices for "
                    f"this data set")
  if len(np.unique(poisoned)) != len(poisoned):
    raise UserError("poisoned positions repeat; pass the output of poison_indices")
  cross_ratio = _fraction(cross_ratio, "cross_ratio", high=None)
  seed = _seed(seed)
  count = int(cross_ratio * len(poisoned))
  free = np.ones(num_samples, bool)
  free[poisoned] = False
  pool = np.flatnonzero(free)
  if count > len(pool):
    raise UserError(f"{PREFIX}.cross_ratio {cross_ratio:g} asks for {count} cross samples besides the "
                    f"{len(poisoned)} poisoned ones, but only {len(pool)} images are left; lower "
                    f"{PREFIX}.cross_ratio or {PREFIX}.rate")
  return _draw(pool, count, seed)
