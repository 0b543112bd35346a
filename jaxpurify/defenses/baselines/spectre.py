"""SPECTRE: robust-covariance whitening and quantum-entropy (QUE) scores (Hayase et al., ICML 2021; docs/baselines.md
section 3.1).

Per class c of the poisoned set's labels, with n = |c| and b = ceil(remove_fraction * n) (at most n // 2):
  1. centre the undefended classifier's encoder features and project them on their top K right singular
     vectors, K = min(max_dims, rank) (the rank counts singular values above RANK_TOLERANCE x the largest; it is at
     most min(D, n - 1));
  2. for each k in 2..K, on the first k coordinates x_i:
     a. robust mean m_k and covariance S_k: a trimmed estimate by C-steps (Rousseeuw & Van Driessen's minimum
        covariance determinant steps) that drops t = min(round(4/3 b), n // 2) members: the kept set shrinks to
        n - t in SHRINK_STEPS equal steps, then C-steps at that size run until the kept set is stable (at most
        MAX_CSTEPS); each step keeps the members of least Mahalanobis distance under the kept set's mean and
        covariance, all n members competing. S_k is then rescaled by median(d_i^2) / median(chi2_k), the consistency
        correction of sklearn's MinCovDet, so that clean Gaussian data whitens to unit variance;
     b. whiten y_i = S_k^(-1/2) (x_i - m_k), Sigma = (1/n) sum_i y_i y_i^T (the second moment about the robust mean),
        Q = exp(alpha (Sigma - I) / (||Sigma||_2 - 1)), QUE scores tau_i = y_i^T Q y_i / tr Q;
     c. the tau statistic of k: whiten all n members in the K coordinates by the mean and covariance of the members
        left after removing the top b taus of (b), and take the mean of their QUE scores in K dimensions,
        tr(Sigma' Q') / tr Q' (the reference's `QUEscore(whitened_feats, max_dim).mean()`, the Julia code's
        `tr(Sigma' M) / tr(M)`);
  3. keep the k of the largest tau statistic (the smallest such k on ties) and remove the b members of the highest
     taus at that k. A class with fewer than 2 directions (K < 2) is not scored and loses nothing.

Defaults: alpha (config que_alpha) 4 and the k search from 2 (backdoor-toolbox
cleansers_tool_box/spectre_python.py); max_dims 32 (the toolbox searches 2..2, the Julia code k in {1, 4, 9, ...,
64}); remove_fraction 0.15 as SS.
Departures from the reference code:
  * budget: the config's fraction of each class, every class scored, where both the toolbox and the Julia code
    remove 1.5 x the true poison count (an oracle);
  * robust estimator: the Julia code filters with Diakonikolas et al.'s 2017 covariance filter (a 4th-moment test on
    a d^2 x d^2 operator, at most 2 eps = 4/3 x the removal budget dropped) and the Python port with "being robust"
    mean filtering, whose Gaussian tail test in raw feature units breaks on features not at unit scale. Here a
    trimmed C-step estimate that drops 4/3 of the budget, affine-equivariant, deterministic and scale-free;
  * QUE when ||Sigma||_2 <= 1 (no direction of excess variance, the formula undefined): the denominator is floored
    at QUE_FLOOR, so Q tends to the projector on the top eigenvector; Q is computed from the eigendecomposition of
    the symmetric Sigma, with exp(alpha (lambda - lambda_max) / (lambda_max - 1)) (the factor exp(-alpha) cancels
    in tau);
  * whitening floors covariance eigenvalues at EIGENVALUE_FLOOR x the largest (the toolbox adds 0.001 to their
    square roots).
"""

import numpy as np

from jaxpurify.defenses.baselines import _spectral
from jaxpurify.errors import UserError

KIND = "filter"
CLEAN_DATA = False
TRIM_RATIO = 4 / 3  # members the robust estimate drops per member removed (the Julia code's limit1 / limit2)
SHRINK_STEPS = 5  # C-steps that shrink the kept set from n to n - t
MAX_CSTEPS = 20  # C-steps at size n - t at most
RANK_TOLERANCE = 1e-5  # singular values below this x the largest are no direction (float32 features)
EIGENVALUE_FLOOR = 1e-9  # whitening treats covariance eigenvalues below this x the largest as this
QUE_FLOOR = 1e-6  # the least ||Sigma||_2 - 1 in Q's exponent


def inverse_sqrt(cov: np.ndarray) -> np.ndarray:
  """S^(-1/2) of a symmetric PSD cov [k, k], eigenvalues floored at EIGENVALUE_FLOOR x the largest."""
  eigenvalues, vectors = np.linalg.eigh(cov)
  eigenvalues = np.maximum(eigenvalues, EIGENVALUE_FLOOR * max(eigenvalues[-1], np.finfo(float).tiny))
  return (vectors / np.sqrt(eigenvalues)) @ vectors.T


def whiten(x: np.ndarray, mean: np.ndarray, cov: np.ndarray) -> np.ndarray:
  """x [n, k] -> S^(-1/2) (x_i - mean) for each row, [n, k]."""
  return (x - mean) @ inverse_sqrt(cov)


def moments(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Mean [k] and covariance [k, k] (divided by n) of x [n, k]."""
  mean = x.mean(axis=0)
  return mean, (x - mean).T @ (x - mean) / len(x)


def chi2_median(k: int) -> float:
  """The median of a chi-squared distribution with k degrees of freedom (Wilson-Hilferty: 1.3% low at k = 2,
  0.1% at k = 10)."""
  return k * (1 - 2 / (9 * k)) ** 3


def robust_estimate(x: np.ndarray, trim: int) -> tuple[np.ndarray, np.ndarray]:
  """Trimmed mean [k] and consistency-corrected covariance [k, k] of x [n, k], `trim` members dropped by C-steps
  (module docstring, step 2a)."""
  n, k = x.shape
  kept = np.arange(n)
  sizes = [n - round(trim * (s + 1) / SHRINK_STEPS) for s in range(SHRINK_STEPS)] + [n - trim] * MAX_CSTEPS
  for size in sizes:
    distances = (whiten(x, *moments(x[kept])) ** 2).sum(axis=1)
    new_kept = np.sort(np.argsort(distances, kind="stable")[:size])
    if size == n - trim and np.array_equal(new_kept, kept):  # a C-step's fixed point
      break
    kept = new_kept
  mean, cov = moments(x[kept])
  distances = (whiten(x, mean, cov) ** 2).sum(axis=1)
  return mean, cov * np.median(distances) / chi2_median(k)


def que_scores(y: np.ndarray, alpha: float) -> np.ndarray:
  """QUE scores float64 [n] of whitened y [n, k]: tau_i = y_i^T Q y_i / tr Q, Q = exp(alpha (Sigma - I) /
  (||Sigma||_2 - 1)), Sigma = y^T y / n."""
  eigenvalues, vectors = np.linalg.eigh(y.T @ y / len(y))
  top = eigenvalues[-1]
  weights = np.exp(alpha * (eigenvalues - top) / max(top - 1.0, QUE_FLOOR))
  return (y @ vectors) ** 2 @ weights / weights.sum()


def class_scores(features: np.ndarray, alpha: float, max_dims: int, budget: int) -> tuple[np.ndarray, int]:
  """One class's QUE scores float64 [n] at the chosen k, and k (module docstring, steps 1-3); features [n, D].
  A class with fewer than 2 directions gets NaN scores and k = 0."""
  x = _spectral.centred(features)
  directions, singular_values = _spectral.principal_directions(x, max_dims)
  rank = int(np.sum(singular_values > RANK_TOLERANCE * singular_values[0])) if singular_values[0] > 0 else 0
  dims = min(max_dims, rank)
  if dims < 2:
    return np.full(len(x), np.nan), 0
  projected = x @ directions[:, :dims]
  trim = min(round(TRIM_RATIO * budget), len(x) // 2)
  best = (-np.inf, None, 0)
  for k in range(2, dims + 1):
    taus = que_scores(whiten(projected[:, :k], *robust_estimate(projected[:, :k], trim)), alpha)
    left = np.argsort(-taus, kind="stable")[budget:]
    statistic = que_scores(whiten(projected, *moments(projected[left])), alpha).mean()
    if statistic > best[0]:
      best = (statistic, taus, k)
  return best[1], best[2]


def scores(features: np.ndarray, labels: np.ndarray, num_classes: int, alpha: float, max_dims: int,
           fraction: float) -> tuple[np.ndarray, np.ndarray]:
  """SPECTRE over every class of features [N, D] with labels int [N] -> (QUE scores float64 [N] at each class's
  chosen k, NaN in classes not scored; the chosen k int [C], 0 where not scored)."""
  result, dims = np.full(len(labels), np.nan), np.zeros(num_classes, np.int64)
  for c, members in enumerate(_spectral.class_members(labels, num_classes)):
    if len(members):
      result[members], dims[c] = class_scores(features[members], alpha, max_dims,
                                              _spectral.budget(len(members), fraction))
  return result, dims


def check(block, config, victim_counts: np.ndarray, reserve_counts: np.ndarray) -> None:
  """UserError unless 0 <= remove_fraction <= 0.5, que_alpha > 0 and max_dims >= 2."""
  del config, victim_counts, reserve_counts
  _spectral.check_fraction("config.baseline.spectre.remove_fraction", block.remove_fraction)
  if block.que_alpha <= 0:
    raise UserError(f"config.baseline.spectre.que_alpha is {block.que_alpha}; set it above 0 (QUE's alpha, 4 by "
                    "default)")
  if block.max_dims < 2:
    raise UserError(f"config.baseline.spectre.max_dims is {block.max_dims}; set it to at least 2 (k runs from 2)")


def suspects(inputs, block, run) -> np.ndarray:
  """The top block.remove_fraction of each scored class by QUE score at its chosen k -> sorted int64 indices."""
  del run  # nothing trained: SVDs, C-steps and QUE per class
  taus, _ = scores(inputs.features, inputs.labels, inputs.num_classes, block.que_alpha, block.max_dims,
                   block.remove_fraction)
  return _spectral.top_per_class(taus, inputs.labels, inputs.num_classes, block.remove_fraction)
