"""SCAn (Tang et al., "Demon in the Variant", USENIX Security 2021) as a dataset filter (docs/baselines.md 3.1).

Representations r are the undefended classifier's encoder features (Inputs.features, reserve_features), in
float64, centred at the reserve's mean.

1. Global model, fitted on the defender's clean reserve: r = mu_y + eps with class identities mu ~ N(0, S_u)
   (between-class) and eps ~ N(0, S_e) (within-class). The EM of the joint Bayesian model, as the reference runs
   it: start from the class means; E-step mu_k = S_u (n_k S_u + S_e)^+ sum_{i in k} r_i (the posterior mean of
   class k's identity); M-step S_u = cov(mu_{y_i}), S_e = cov(r_i - mu_{y_i}) over the samples (point estimates,
   no posterior covariance terms, as the reference); stop once ||dS_u||_F + ||dS_e||_F <= 1e-5 or after
   `em_iters` iterations.
2. Untangling, per class c: the victim samples labelled c together with the reserve's members of c are split into
   two sub-groups by 2-means in the within-class metric F = S_e^+ (each sample goes to the sub-group mean nearer in
   F; at most `em_iters` rounds). J_c = mean_i [(r_i - mu)' F (r_i - mu) - (r_i - m_g(i))' F (r_i - m_g(i))], mu the
   one-group posterior identity (step 1's E-step on the whole class) and m_g the sub-group means: twice the
   log-likelihood ratio per sample of two sub-groups against one.
3. Anomaly index (J_c - median J) / (1.4826 MAD J) over the classes; a class above `threshold` is flagged, and its
   victim samples in the sub-group holding fewer reserve samples (the reference's choice; on a tie, the smaller
   sub-group) are removed.

Defaults: threshold e and at most 100 EM iterations, backdoor-toolbox `cleansers_tool_box/scan.py` (BackdoorBench
`detection_pretrain/scan.py` uses e^2). pinv where the reference uses it; no other regularisation. With fewer
reserve samples than feature dimensions plus classes (e.g. STL-10's 250-image reserve against the head's 256-d
features) S_e is singular: F = S_e^+ ignores its null space and inflates its smallest, poorly estimated directions,
so the test is noisy there.

Departures from the toolbox code:
- the E-step is written S_u (n_k S_u + S_e)^+ s_k, not the toolbox's S_e (n_k S_u + S_e)^+ S_u S_e^+ s_k: equal
  when S_e is invertible, but with a singular S_e the toolbox's form sends S_u to 0 in one iteration.
- the anomaly index is one-sided: the toolbox takes |J_c - median|, which also flags a class whose J is abnormally
  small (a compact, unimodal class) and then removes half of it. The toolbox's division of J by max J (J >= 0)
  does not change the index and is left out.
- the untangling starts from the sign of each sample's projection on the leading principal direction of the
  F-whitened class (deterministic) instead of a uniform random split, and runs at most `em_iters` rounds (the
  toolbox: 100, hard-coded).
- both steps centre at the reserve mean (the toolbox centres step 2 at the mean of victim and reserve together).
- the toolbox's `tar[index] > size_inspection_set` counts the first reserve sample as a victim one; here a reserve
  sample is never among the removed.
"""

from typing import NamedTuple

import numpy as np

from jaxpurify.errors import UserError

KIND = "filter"
CLEAN_DATA = True
TOLERANCE = 1e-5  # the reference's stop of the global EM: summed Frobenius change of S_u and S_e
MAD_SCALE = 1.4826  # MAD -> standard deviation of a normal


class GlobalModel(NamedTuple):
  """mean [D] (of the reserve), between-class S_u [D, D], within-class S_e [D, D] and the metric F = S_e^+ [D, D],
  float64."""
  mean: np.ndarray
  between: np.ndarray
  within: np.ndarray
  metric: np.ndarray


def check(block, config, victim_counts: np.ndarray, reserve_counts: np.ndarray) -> None:
  """UserError on a SCAn setting that cannot run: fewer than 3 classes, no EM iteration, a threshold <= 0."""
  del config, reserve_counts
  if len(victim_counts) < 3:
    raise UserError(f"scan's median/MAD test over classes needs at least 3 classes, the data has {len(victim_counts)}; "
                    "use another defense")
  if block.em_iters < 1:
    raise UserError(f"config.baseline.scan.em_iters is {block.em_iters}; set it to at least 1")
  if block.threshold <= 0:
    raise UserError(f"config.baseline.scan.threshold is {block.threshold}; set it to a positive anomaly index")


def covariance(x: np.ndarray) -> np.ndarray:
  """Sample covariance (ddof 1, as np.cov) of rows x [N, D] -> [D, D]; zeros for N = 1."""
  centred = x - x.mean(0)
  return centred.T @ centred / max(len(x) - 1, 1)


def class_identities(sums: np.ndarray, counts: np.ndarray, between: np.ndarray, within: np.ndarray) -> np.ndarray:
  """Posterior mean identities S_u (n_k S_u + S_e)^+ s_k of classes with member sums s [K, D] and sizes n [K]
  -> [K, D]."""
  return np.stack([between @ np.linalg.pinv(n * between + within, hermitian=True) @ s for s, n in zip(sums, counts)])


def global_model(features: np.ndarray, labels: np.ndarray, num_classes: int, max_iters: int) -> GlobalModel:
  """Step 1 on clean features [M, D] with labels [M]: the EM fit of S_u and S_e (module docstring)."""
  mean = features.mean(0)
  x = features - mean
  members = labels[:, None] == np.arange(num_classes)
  counts, sums = members.sum(0), members.T.astype(np.float64) @ x
  identity = sums / np.maximum(counts, 1)[:, None]
  between, within = covariance(identity[labels]), covariance(x - identity[labels])
  for _ in range(max_iters):
    identity = class_identities(sums, counts, between, within)
    new_between, new_within = covariance(identity[labels]), covariance(x - identity[labels])
    moved = np.linalg.norm(new_between - between) + np.linalg.norm(new_within - within)
    between, within = new_between, new_within
    if moved <= TOLERANCE:
      break
  return GlobalModel(mean, between, within, np.linalg.pinv(within, hermitian=True))


def _whitener(metric: np.ndarray) -> np.ndarray:
  """The symmetric square root of a PSD metric [D, D]."""
  values, vectors = np.linalg.eigh(metric)
  return (vectors * np.sqrt(np.clip(values, 0, None))) @ vectors.T


def untangle(x: np.ndarray, metric: np.ndarray, max_iters: int) -> np.ndarray:
  """Step 2's split of one class x [n, D] into two sub-groups by 2-means in the metric F [D, D] -> bool [n]."""
  if len(x) < 2:
    return np.zeros(len(x), bool)
  white = (x - x.mean(0)) @ _whitener(metric)
  groups = white @ np.linalg.svd(white, full_matrices=False)[2][0] > 0
  projected = x @ metric
  for _ in range(max_iters):
    if groups.all() or not groups.any():
      break
    first, second = x[groups].mean(0), x[~groups].mean(0)
    bias = first @ metric @ first - second @ metric @ second
    nearer_first = bias - 2 * projected @ (first - second) < 0
    if np.array_equal(nearer_first, groups):
      break
    groups = nearer_first
  return groups


def llr_statistic(x: np.ndarray, groups: np.ndarray, model: GlobalModel) -> float:
  """J of one class x [n, D] (centred at model.mean) split into sub-groups bool [n] (module docstring); 0 for n = 0."""
  if len(x) == 0:
    return 0.0
  metric = model.metric
  identity = class_identities(x.sum(0)[None], np.array([len(x)]), model.between, model.within)[0]
  means = np.zeros_like(x)
  for side in (groups, ~groups):
    if side.any():
      means[side] = x[side].mean(0)
  one, two = x - identity, x - means
  return float(np.mean(np.sum((one @ metric) * one, 1) - np.sum((two @ metric) * two, 1)))


def anomaly_index(stats: np.ndarray) -> np.ndarray:
  """(J - median J) / (1.4826 MAD J) of per-class statistics [C] -> [C] (0 where all are equal)."""
  deviation = stats - np.median(stats)
  mad = MAD_SCALE * np.median(np.abs(deviation))
  return deviation / max(mad, np.finfo(np.float64).tiny)


def poisoned_side(groups: np.ndarray, from_reserve: np.ndarray) -> np.ndarray:
  """The sub-group to remove, bool [n] over one class: the one with fewer reserve members (from_reserve bool [n]);
  on a tie, the smaller one."""
  first, second = (groups & from_reserve).sum(), (~groups & from_reserve).sum()
  if first == second:
    return groups if groups.sum() < (~groups).sum() else ~groups
  return groups if first < second else ~groups


def suspects(inputs, block, run) -> np.ndarray:
  """The victim samples in the flagged classes' poisoned sub-groups -> sorted int64 indices into inputs.images."""
  del run  # no trained part
  if len(inputs.reserve_labels) == 0:
    raise UserError("scan needs the defender's clean reserve; set config.baseline.clean_fraction above 0")
  model = global_model(inputs.reserve_features.astype(np.float64), inputs.reserve_labels, inputs.num_classes,
                       block.em_iters)
  victim = inputs.features.astype(np.float64) - model.mean
  reserve = inputs.reserve_features.astype(np.float64) - model.mean
  stats, removable = [], []
  for c in range(inputs.num_classes):
    members = np.flatnonzero(inputs.labels == c)
    x = np.concatenate([victim[members], reserve[inputs.reserve_labels == c]])
    groups = untangle(x, model.metric, block.em_iters)
    stats.append(llr_statistic(x, groups, model))
    from_reserve = np.arange(len(x)) >= len(members)
    removable.append(members[poisoned_side(groups, from_reserve)[:len(members)]])
  flagged = np.flatnonzero(anomaly_index(np.array(stats)) > block.threshold)
  removed = [removable[c] for c in flagged]
  return np.sort(np.concatenate(removed)).astype(np.int64) if removed else np.zeros(0, np.int64)
