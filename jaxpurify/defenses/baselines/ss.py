"""SS: spectral signatures (Tran et al., NeurIPS 2018; docs/baselines.md section 3.1).

Per class c of the poisoned set's labels, centre the undefended classifier's encoder features R_c, take the top
right singular vector v of the centred matrix and score each member s_i = <r_i - mean_c, v>^2. The filter removes
the highest-scoring ceil(remove_fraction * |c|) members of every class (at most half of a class).

Defaults: remove_fraction 0.15 is BackdoorBench's `percentile: 85` (config/defense/spectral/config.yaml).
Departures from the reference code: every class is scored (BackdoorBench scores only the known target class), and
the budget is the config's fraction of each class, not backdoor-toolbox's 1.5 x the true poison rate x N (both
oracles). Like backdoor-toolbox, a class never loses more than half of its samples.
"""

import numpy as np

from jaxpurify.defenses.baselines import _spectral

KIND = "filter"
CLEAN_DATA = False


def scores(features: np.ndarray, labels: np.ndarray, num_classes: int) -> np.ndarray:
  """Spectral-signature scores float64 [N] of features [N, D] with labels int [N]: per class, the squared
  projection of the centred features on their top right singular vector."""
  result = np.zeros(len(labels))
  for members in _spectral.class_members(labels, num_classes):
    if len(members):
      x = _spectral.centred(features[members])
      top, _ = _spectral.principal_directions(x, 1)
      result[members] = (x @ top[:, 0]) ** 2
  return result


def check(block, config, victim_counts: np.ndarray, reserve_counts: np.ndarray) -> None:
  """UserError unless 0 <= block.remove_fraction <= 0.5."""
  del config, victim_counts, reserve_counts
  _spectral.check_fraction("config.baseline.ss.remove_fraction", block.remove_fraction)


def suspects(inputs, block, run) -> np.ndarray:
  """The top block.remove_fraction of each class by spectral-signature score -> sorted int64 indices."""
  del run  # nothing trained: one SVD per class
  return _spectral.top_per_class(scores(inputs.features, inputs.labels, inputs.num_classes), inputs.labels,
                                 inputs.num_classes, block.remove_fraction)
