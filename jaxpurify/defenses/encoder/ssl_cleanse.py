"""SSL-Cleanse (Zheng et al., ECCV'24; github:UCF-ML-Research/SSL-Cleanse): a detector and a mitigator of a
backdoored self-supervised encoder, on the defender's unlabelled images.

Detector (detector/core/detector.py, utils.py, cfg.py; `_ssl_cleanse_detect`):
  1. pseudo-classes: k-means (sklearn KMeans, block.kmeans_restarts = the official n_init 30) on the encoder's raw
     features (the official encoder.model(x), not normalised), K = block.num_clusters, or, when 0, chosen by SWK;
  2. for each cluster k as target, a trigger (mask [H, W, 1], pattern [H, W, 3], both tanh/2 + 0.5) is reversed
     on N - (largest cluster) images of the other clusters, each paired with a random member of k: Adam(lr,
     betas 0.5, 0.9), loss 2 - 2 cos(f(stamped), f(member)) + lam mean(mask pattern); after each epoch the kNN
     attack success (k = 1 over the raw features of all images with their cluster labels; `knn_attack_success`)
     on knn_sample_num images drawn with replacement from all images; NC's cost schedule (lam 0 until `patience`
     epochs at success >= threshold, then block.lam, times/over lam_multiplier after `patience` epochs at/below
     it); the trigger size is the epoch's mean of mean(mask pattern) at the best epoch (success > threshold and
     size below the best), 1 where the attack never succeeded;
  3. the MAD outlier test on the sizes (`mad_anomaly_index`, utils.outlier): score = |min - median| / MAD with
     MAD = 1.4826 median(|size - median|) / 0.6745 and torch's lower median, both as the official code; the
     encoder is flagged when the score exceeds block.anomaly_threshold. The official code only logs the index;
     the threshold is Neural Cleanse's 2 (with the extra / 0.6745 the official index is 0.6745 times NC's, so
     this is NC's test at 2.97). flagged_clusters: every cluster below the median whose index exceeds it (NC's
     rule; the official code looks at the smallest only, which is flagged exactly when the encoder is).
Mitigator (mitigator/core/train.py, methods/byol.py, cfg.py; `_ssl_cleanse_mitigate`): BYOL-style fine-tuning of
  the suspect on the defender's images with four views per image: v0, v1 clean, v2 stamped with a reversed trigger
  (one drawn uniformly per image among the flagged clusters', every cluster's when none is flagged: the official
  mitigator is a separate script that runs on the trigger it is given, whatever the detector said), v3 clean;
  loss alpha_1 loss_1 + alpha_4 loss_4 (`mitigation_loss`) through a projector and a predictor, against the
  frozen suspect backbone and initial projector (README byol_tau 1: the official update_target(0) copy, never
  moved); Adam with coupled weight decay 1e-6, linear warm-up over 500 steps, lr x 0.2 at epochs - 50 and
  epochs - 25 (cfg lr_warmup, lr_step 'step', drop, drop_gamma).

Defaults: README detector command (lr 0.1, batch 32, 1000 epochs, lam 0.1, threshold 0.99, knn_sample_num 1000),
cfg.py (patience 5, lam_multiplier_up 1.5, early stop off), KMeans n_init 30; README mitigator command (lr 3e-3,
batch 1536, 500 epochs, emb 64, alpha_1 = alpha_4 = 1, byol_tau 1) and cfg.py (head_size 1024, adam_l2 1e-6,
augmentation crop 0.2-1, jitter 0.4/0.4/0.4/0.1 at 0.8, grayscale 0.1, flip 0.5). The README's --ratio 0.01 is
replaced by the harness's defender subset (config.defense.clean_fraction). SWK's K range (2..30, the paper's
CIFAR-10 plot goes to 28) and window 10 are this module's choice. quick (configs/baseline.py): SWK over 2..10
(window 5, 10 restarts), 12 trigger epochs at patience 2 (so that the cost schedule acts within them), 128 kNN
samples; the mitigator 12 epochs at batch 64, a 5-step warm-up, drops at epochs 10 and 11.

Departures, and why:
- SWK ("Sliding Window Kneedle" in the paper) has no code in the repository (cluster.ipynb only plots SSE and
  silhouette curves; the README passes --num_clusters). Here: SSE of k-means for every K in the range, Kneedle on
  every `window` consecutive K, the knee most windows find (the smaller on a tie).
- Every cluster's trigger is optimised at once (a [B, K] batch): each trigger's loss involves only its own
  parameters and Adam is elementwise, so this is the official per-target loop run side by side; the attack
  success is measured with the trigger after the epoch's last update (the official code: before it) and on one
  draw of images shared by the clusters.
- Every cluster's trigger is saved (triggers.npz in the stage folder; the official save sits after the loop and
  keeps the last target's); a cluster that never reached the threshold keeps its last trigger. k-means draws
  with config.seed (the official random_state 0).
- Mitigator views: the official n_2 view is a clean view of another image read from a file-list column that the
  repository does not ship; the paper's figure aligns the stamped view with a clean view of the same image, which
  v3 is here. The official code pastes a trigger image (README: 6 px, at location 0.9) after augmentation; here the
  reversed (mask, pattern) is blended there (the detector's `draw`). Every v2 is stamped (the code; the paper's
  figure says 50%).
- The harness gives the backbone only, so the projector (Linear 1024, BN, ReLU, Linear 64, its first bias dropped
  before BN) and the predictor are new (config.seed) and the frozen target's projector is the initial one.
- alpha_2 and alpha_3 weight terms that are identically 0 in the official active code (a commented-out branch):
  omitted.
"""

import os
import time

import jax
import numpy as np

from jaxpurify import encoders, evaluation, stages, validation
from jaxpurify.defenses.distill import training
from jaxpurify.defenses.encoder import _ssl_cleanse_detect as _detect
from jaxpurify.defenses.encoder import _ssl_cleanse_mitigate as _mitigate
from jaxpurify.defenses.encoder._ssl_cleanse_detect import knn_attack_success, swk
from jaxpurify.defenses.encoder._ssl_cleanse_mitigate import mitigation_loss
from jaxpurify.encoders import Encoder
from jaxpurify.errors import UserError

__all__ = ["CLEAN_DATA", "check", "detect", "knn_attack_success", "lower_median", "mad_anomaly_index",
           "mitigation_loss", "purify", "swk"]

CLEAN_DATA = True
DETECT_STAGE = "ssl_cleanse_detect_poisoned"  # the harness's detection of the suspect, which purify reuses
MITIGATE_STAGE = "ssl_cleanse_mitigate"
TRIGGERS_FILE = "triggers.npz"
CONSISTENCY = 1.4826  # official utils.outlier
NORMAL_QUANTILE = 0.6745  # official utils.outlier divides by it as well

_int = lambda v: isinstance(v, int) and not isinstance(v, bool)
_real = lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and np.isfinite(v)
_CHECKS = (  # fields jaxpurify.validation's generic rules do not cover
    ("num_clusters", lambda v, b: _int(v) and (v == 0 or v >= 2), "0 (SWK chooses) or an integer of at least 2"),
    ("min_clusters", lambda v, b: _int(v) and v >= 2, "an integer of at least 2"),
    ("max_clusters", lambda v, b: _int(v) and v >= b.min_clusters, "an integer of at least min_clusters"),
    ("window", lambda v, b: b.num_clusters or 3 <= v <= b.max_clusters - b.min_clusters + 1,
     "at least 3 and at most max_clusters - min_clusters + 1"),
    ("kmeans_restarts", lambda v, b: _int(v) and v >= 1, "an integer of at least 1"),
    ("lam", lambda v, b: _real(v) and v > 0, "a number above 0"),
    ("attack_succ_threshold", lambda v, b: _real(v) and 0 < v <= 1, "in (0, 1]"),
    ("knn_sample_num", lambda v, b: _int(v) and v >= 1, "an integer of at least 1"),
    ("patience", lambda v, b: _int(v) and v >= 1, "an integer of at least 1"),
    ("lam_multiplier", lambda v, b: _real(v) and v > 1, "a number above 1"),
    ("warmup_steps", lambda v, b: _int(v) and v >= 0, "an integer of at least 0"),
    ("drop_factor", lambda v, b: _real(v) and 0 < v <= 1, "in (0, 1]"),
    ("alpha_1", lambda v, b: _real(v) and v >= 0 and (v > 0 or b.alpha_4 > 0), "at least 0, with alpha_4 not both 0"),
    ("alpha_4", lambda v, b: _real(v) and v >= 0, "a number of at least 0"),
    ("predictor_hidden", lambda v, b: _int(v) and v >= 1, "an integer of at least 1"),
    ("head.hidden", lambda v, b: _int(v) and v >= 1, "an integer of at least 1"),
    ("head.dim", lambda v, b: _int(v) and v >= 1, "an integer of at least 1"),
)


def check(block, config) -> None:
  """UserError, one line, on a field of config.baseline.ssl_cleanse outside its range (the others: validation), or
  on a mitigator batch larger than the defender's subset (DECREE's mitigation uses it too)."""
  images = stages.load_data(config, config.data.name, config.data.split).images
  validation.check_fits(config, "baseline.ssl_cleanse.train.batch_size",
                        len(training.defender_images(config, images)), "defender images")
  for field, test, what in _CHECKS:
    value = block
    for part in field.split("."):
      value = value[part]
    if not test(value, block):
      raise UserError(f"config.baseline.ssl_cleanse.{field} must be {what}, got {value!r}; fix "
                      f"--config.baseline.ssl_cleanse.{field}")


def lower_median(x: np.ndarray) -> float:
  """torch.median: the lower of the two middle values for an even count."""
  return float(np.sort(np.asarray(x, np.float64))[(len(x) - 1) // 2])


def mad_anomaly_index(sizes) -> tuple[np.ndarray, float, float]:
  """The official outlier statistic of trigger sizes [K] -> (|size - median| / MAD per cluster, median, MAD),
  MAD = 1.4826 median(|size - median|) / 0.6745, medians lower (torch); the index of the smallest size is the
  official anomaly index. MAD 0: index 0 at the median, inf elsewhere (the official division)."""
  sizes = np.asarray(sizes, np.float64)
  median = lower_median(sizes)
  deviation = np.abs(sizes - median)
  mad = CONSISTENCY * lower_median(deviation) / NORMAL_QUANTILE
  index = np.divide(deviation, mad, out=np.where(deviation > 0, np.inf, 0.0), where=mad > 0)
  return index, median, mad


def _save_triggers(path: str, found: dict, labels: np.ndarray) -> None:
  """masks, patterns, sizes and pseudo-classes as one .npz (atomic, process 0)."""
  if jax.process_index() == 0:
    with open(path + ".tmp", "wb") as f:
      np.savez(f, mask=found["mask"], pattern=found["pattern"], size=found["size"], labels=labels)
    os.replace(path + ".tmp", path)


def detect(run, stage: str, block, config, encoder: Encoder, images: np.ndarray, mesh) -> dict:
  """The detector on `encoder` with the defender's uint8 images [N, H, W, 3] (stage `stage`; the triggers in its
  triggers.npz) -> {'score': the anomaly index of the smallest trigger, 'flagged', 'clusters': K,
  'flagged_clusters', 'trigger_sizes', 'anomaly_indices', 'median', 'mad', 'attack_success', 'reached',
  'cluster_sizes', 'sse' (and 'swk_votes'), 'seconds'}."""
  if (record := run.done(stage)) is not None:
    return record
  tick = time.perf_counter()
  features = evaluation.apply_batched(encoders.encode_fn(encoder, config.model), images,
                                      config.evaluate.batch_size, mesh)
  labels, clustering = _detect.cluster(features, block, config.seed)
  found = _detect.reverse_triggers(encoder, config.model, images, features, labels, block,
                                   config.evaluate.batch_size, mesh, config.seed, config.limits.max_steps)
  index, median, mad = mad_anomaly_index(found["size"])
  score = float(index[np.argmin(found["size"])])
  flagged = [int(k) for k in np.flatnonzero((found["size"] < median) & (index > block.anomaly_threshold))]
  _save_triggers(os.path.join(run.stage_dir(stage), TRIGGERS_FILE), found, labels)
  seconds = time.perf_counter() - tick
  if jax.process_index() == 0:
    print(f"{stage}: {len(found['size'])} clusters, anomaly index {score:.2f} "
          f"({'flagged' if flagged else 'not flagged'}), {seconds:.1f} s", flush=True)
  return run.finish(stage, {
      "score": score, "flagged": score > block.anomaly_threshold, "clusters": len(found["size"]),
      "flagged_clusters": flagged, "trigger_sizes": found["size"].tolist(), "anomaly_indices": index.tolist(),
      "median": median, "mad": mad, "attack_success": found["asr"].tolist(), "reached": found["reached"].tolist(),
      "cluster_sizes": np.bincount(labels).tolist(), **clustering, "seconds": seconds})


def purify(run, block, config, suspect: Encoder, images: np.ndarray, mesh, backdoor) -> tuple[Encoder, dict]:
  """The detector on the suspect (stage ssl_cleanse_detect_poisoned, reused when the harness ran it), then the
  mitigator with the flagged clusters' triggers, every cluster's when none is flagged (stage
  ssl_cleanse_mitigate) -> (cleaned backbone, {'score', 'flagged', 'trigger_clusters'})."""
  del backdoor  # monitors only; SSL-Cleanse has none
  detection = detect(run, DETECT_STAGE, block, config, suspect, images, mesh)
  with np.load(os.path.join(run.stage_dir(DETECT_STAGE), TRIGGERS_FILE)) as triggers:
    clusters = detection["flagged_clusters"] or list(range(detection["clusters"]))
    masks, patterns = triggers["mask"][clusters], triggers["pattern"][clusters]
  defended = _mitigate.mitigate(run, MITIGATE_STAGE, block, config, suspect, images, masks, patterns, mesh)
  return defended, {"score": detection["score"], "flagged": detection["flagged"], "trigger_clusters": clusters}
