"""Clean accuracy and attack success rate (attacks.md section 5)."""

import numpy as np

from jaxpurify.errors import UserError


def backdoor_metrics(pred_clean, labels, pred_triggered=None, target: int | None = None) -> dict[str, float]:
  """Metrics from predicted labels: clean [N], true labels [N], triggered copies of the same images [N].

  acc: top-1 on the clean test set. asr: fraction of triggered images whose true label is not `target` that
  are predicted as `target` (BackdoorBench; nan when there are none). asr_all: fraction of all triggered images
  predicted as `target` (BadEncoder). Without `pred_triggered`, only acc.
  """
  pred_clean, labels = np.asarray(pred_clean), np.asarray(labels)
  metrics = {"acc": float(np.mean(pred_clean == labels))}
  if pred_triggered is None:
    return metrics
  pred_triggered = np.asarray(pred_triggered)
  if target is None or pred_triggered.shape != labels.shape:
    raise UserError(f"triggered predictions {pred_triggered.shape} need a target (got {target}) and one entry per "
                    f"test label {labels.shape}; pass the triggered copies of the test images, in order")
  hit = pred_triggered == target
  non_target = labels != target
  metrics["asr"] = float(np.mean(hit[non_target])) if non_target.any() else float("nan")
  metrics["asr_all"] = float(np.mean(hit))
  return metrics


def poison_counts(indices: np.ndarray, poison: np.ndarray) -> dict:
  """How many of `indices` are true poisons, and the set's purity (fraction clean)."""
  poisoned = int(np.isin(indices, poison).sum())
  return {"count": int(len(indices)), "poisoned": poisoned,
          "purity": float(1 - poisoned / len(indices)) if len(indices) else float("nan")}


def detection(suspected: np.ndarray, poison: np.ndarray) -> dict:
  """Precision and recall of the suspected set against the true poisons (nan where undefined)."""
  hits = int(np.isin(suspected, poison).sum())
  return {"suspected": int(len(suspected)), "precision": hits / len(suspected) if len(suspected) else float("nan"),
          "recall": hits / len(poison) if len(poison) else float("nan")}


def removal_rates(removed: np.ndarray, poison: np.ndarray, num_examples: int) -> dict:
  """A filter's removals against the true poisons of a set of `num_examples`: the count, the true-positive rate
  (poisons removed / poisons; nan without poisons) and the false-positive rate (clean removed / clean)."""
  hits = int(np.isin(removed, poison).sum())
  clean = num_examples - len(poison)
  return {"removed": int(len(removed)), "tpr": hits / len(poison) if len(poison) else float("nan"),
          "fpr": (len(removed) - hits) / clean if clean else float("nan")}
