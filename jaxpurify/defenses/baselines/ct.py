"""CT: Confusion Training (Qi et al., "Fight Poison with Poison", USENIX Security 2023; docs/baselines.md), a
dataset cleanser that confuses a classifier with the defender's clean reserve, then tests each class.

Rounds r = 0 .. R-1 (R = len(block.ratios); lambdas, lrs, iters, pretrain_epochs give one entry per round):
  1. pretrain (stage ct0_pretrain, shared by the protocols; ct<r>_pretrain_<protocol> later): fine-tune the
     classifier on the distilled set (the whole set in round 0) with cross-entropy, in round 0 from the victim
     encoder + a fresh head, later from round r-1's pretrained classifier (the official `pretrain(load=True)`).
  2. confuse (ct<r>_confuse_<protocol>): SGD steps on batches of the reserve whose labels are the undefended
     classifier's predictions shifted by 1 + (step mod (C - 1)) classes, every block.batch_factor-th step also a
     batch of the distilled set, weighted 1 / sqrt(class frequency + 0.001): loss ((lam - 1) CE(reserve) +
     CE(distilled)) / lam on those steps, CE(reserve) on the others.
  3. distill: the lowest-loss ratios[r] of the whole set under the confused model, topped up per class to
     |class| // 50 (// 100 in the last round).
Then the inference model (ct_final_pretrain_<protocol>, ct_final_confuse_<protocol>): pretrained on the last
distilled set plus the reserve with its labels, then confused as above with unweighted classes and lam =
block.final_lambda (the last round's lr, iters and epochs otherwise). Its final test is the official
`identify_poison_samples_simplified`, per class: the class's encoder features under the inference model
(`encoder_features`, what its head reads; the official's ResNet features before the linear layer)
projected on their top 2 principal directions; the class split into the samples the inference model predicts as
the class and the others; one Gaussian per group (its mean and sample covariance, every entry of the covariance
raised by COVARIANCE_SHIFT), no EM; the likelihood ratio exp(mean over the class of log N(x | its group's
Gaussian) - log N(x | the others' Gaussian)), 1 unless each group has at least 2 samples. A class whose ratio
exceeds block.lr_threshold is flagged, and the class with the largest ratio when it exceeds
block.max_ratio_threshold; the members of a flagged class that the inference model predicts as their label are
removed. The clean chunklet (the block.median_sample_fraction of each class around its median loss) only gates
the test, as in the official: each class needs at least 2 samples in it.

Against the official code (github:Unispac/Fight-Poison-With-Poison `ct_cleanser.py`, `confusion_training.py`,
`config.py`):
- Transfer learning: every classifier is the victim encoder + a head, all of it trained (FT-all, TRAINABLE), with
  the harness's crop-and-flip augmentation; the official trains a ResNet-18 from scratch on un-augmented images.
- The confused labels are the official ones, a deterministic cycle (`confusion.confused_labels` at the step)
  from the predictions of the model trained on the whole poisoned set (the official `full_base_aug`; here the
  undefended classifier of `inputs.protocol`, so every stage after ct0_pretrain depends on the protocol); the
  random labels of the docs' card are the deprecated backdoor-toolbox copy's.
- The final test's projection is exact PCA in float64 (the official: `torch.pca_lowrank(q=2)`, randomised, in
  float32), each direction signed by its largest loading: the official's COVARIANCE_SHIFT on the off-diagonal
  entries makes the ratio depend on the directions' signs, which `pca_lowrank` leaves arbitrary. The ratios are
  compared in log space. The features are L2-normalised, so the fixed COVARIANCE_SHIFT weighs more against their
  covariances than against the official's unnormalised ones. The chunklet's gate runs on the class counts before
  any training, as a UserError (the official raises after the whole confusion training).
- A distillation keeps round(ratio * N) samples (the official int(ratio * N)).
"""

import numpy as np

from jaxpurify import finetune, stages
from jaxpurify.defenses.baselines.inputs import Inputs, encoder_features
from jaxpurify.defenses.tcore import confusion
from jaxpurify.errors import UserError

KIND = "filter"
CLEAN_DATA = True

TRAINABLE = "all"  # FT-all: the encoder and the head train in every round
MIN_PER_CLASS_DIVISORS = (50, 100)  # distillation top-up: |class| // 50, // 100 in the last round (official)
COVARIANCE_SHIFT = 1e-3  # added to every entry of each group's covariance (the official's "avoid singularity")
# a covariance's eigenvalues up to PSEUDO_RCOND times its largest are dropped (SciPy's multivariate_normal with
# allow_singular=True, the official's density)
PSEUDO_RCOND = 1e6 * np.finfo(np.float64).eps


def check(block, config, victim_counts: np.ndarray, reserve_counts: np.ndarray) -> None:
  """UserError on a CT setting that cannot run: no round, per-round lists of another length, lambdas or
  final_lambda not above 1, fewer than 2 classes."""
  rounds = len(block.ratios)
  if not rounds:
    raise UserError("config.baseline.ct.ratios is empty; give one distillation ratio per round, e.g. (0.5, 0.2)")
  for field in ("lambdas", "lrs", "iters", "pretrain_epochs"):
    if len(block[field]) != rounds:
      raise UserError(f"config.baseline.ct.{field} has {len(block[field])} entries for {rounds} rounds "
                      "(len(config.baseline.ct.ratios)); give one per round")
  if any(lam <= 1 for lam in block.lambdas):
    raise UserError("config.baseline.ct.lambdas must be > 1: the confusion term is weighted (lambda - 1)")
  if block.final_lambda <= 1:
    raise UserError(f"config.baseline.ct.final_lambda={block.final_lambda} must be > 1: the confusion term is "
                    "weighted (lambda - 1)")
  if len(victim_counts) < 2:
    raise UserError(f"CT shifts labels to another class and needs at least 2 classes, the data set has "
                    f"{len(victim_counts)}; use another downstream data set")
  if not reserve_counts.sum():
    raise UserError("CT confuses with the defender's reserved clean set and there is none; set "
                    "config.baseline.clean_fraction above 0")
  check_chunklets(victim_counts, block.median_sample_fraction)


def suspects(inputs: Inputs, block, run) -> np.ndarray:
  """The confusion rounds, the inference model and its final test -> sorted int64 indices into inputs.images."""
  base_pred = np.argmax(inputs.reserve_logits, -1).astype(np.int32)
  distilled, pretrained = distillation_rounds(run, inputs, block, base_pred)
  graphdef, model = inference_model(run, inputs, block, distilled, pretrained, base_pred)
  config, mesh = inputs.config, inputs.mesh
  predictions = np.argmax(finetune.logits(config, graphdef, model, inputs.images, mesh), -1)
  features = encoder_features(config, graphdef, model, inputs.images, mesh)
  log_ratios = class_log_ratios(features, inputs.labels, predictions, inputs.num_classes)
  flagged = flagged_classes(log_ratios, block.lr_threshold, block.max_ratio_threshold)
  return flagged_members(inputs.labels, predictions, flagged)


def distillation_rounds(run, inputs: Inputs, block, base_pred: np.ndarray):
  """The R rounds -> (the last distilled set's sorted indices, the last round's pretrained TrainState)."""
  labels, rounds, p = inputs.labels, len(block.ratios), inputs.protocol
  counts = np.bincount(labels, minlength=inputs.num_classes)
  distilled, pretrained = np.arange(len(labels)), None
  for r, ratio in enumerate(block.ratios):
    names = (f"ct{r}_pretrain" + (f"_{p}" if r else ""), f"ct{r}_confuse_{p}")
    inspected = {"image": inputs.images[distilled], "label": labels[distilled].astype(np.int32),
                 "weight": confusion.class_weights(labels[distilled], inputs.num_classes)[labels[distilled]]}
    graphdef, pretrained, confused = trained_round(
        run, inputs, confusion.round_settings(block, r, TRAINABLE), names, inputs.config.seed + r, pretrained,
        (inputs.images[distilled], labels[distilled]), inspected, base_pred, block.batch_factor)
    logits = finetune.logits(inputs.config, graphdef, confused, inputs.images, inputs.mesh)
    minimum = counts // MIN_PER_CLASS_DIVISORS[int(r == rounds - 1)]
    distilled = confusion.distill(confusion.sample_losses(logits, labels), labels, ratio, minimum)
  return distilled, pretrained


def inference_model(run, inputs: Inputs, block, distilled: np.ndarray, pretrained, base_pred: np.ndarray):
  """The final round: pretrained on the distilled set plus the reserve, confused with unweighted classes and
  lam = block.final_lambda -> (graphdef, TrainState)."""
  rounds, p = len(block.ratios), inputs.protocol
  rs = confusion.round_settings(block, rounds - 1, TRAINABLE)._replace(lam=block.final_lambda)
  train_set = (np.concatenate([inputs.images[distilled], inputs.reserve_images]),
               np.concatenate([inputs.labels[distilled], inputs.reserve_labels]))
  inspected = {"image": inputs.images[distilled], "label": inputs.labels[distilled].astype(np.int32),
               "weight": np.ones(len(distilled), np.float32)}
  graphdef, _, model = trained_round(run, inputs, rs, (f"ct_final_pretrain_{p}", f"ct_final_confuse_{p}"),
                                     inputs.config.seed + rounds, pretrained, train_set, inspected, base_pred,
                                     block.batch_factor)
  return graphdef, model


def trained_round(run, inputs: Inputs, rs: confusion.RoundSettings, names: tuple[str, str], seed: int, init,
                  train_set: tuple, inspected: dict, base_pred: np.ndarray, batch_factor: int):
  """One round as two stages, each restored when finished: plain fine-tuning on train_set (uint8 images
  [K, H, W, 3], labels [K]) from `init` (a TrainState; None: the victim encoder + a fresh head), stage names[0];
  then the confusion steps on the reserve with base_pred [M] shifted, with a batch of `inspected` {'image',
  'label', 'weight'} every batch_factor-th step, stage names[1]. -> (graphdef, pretrained TrainState, confused
  TrainState)."""
  config, mesh = inputs.config, inputs.mesh
  graphdef, state, step, dataset, num_steps, train_config = confusion.pretraining(
      config, rs, inputs.encoder, *train_set, inputs.num_classes, mesh)
  if init is not None:
    state = state.replace(params=init.params, batch_stats=init.batch_stats)
  pretrained = stages.trained(run, names[0], state, num_steps, lambda: stages.train(
      run, names[0], state, step, dataset.batch, train_config, num_steps, mesh, seed), {"examples": len(train_set[1])})
  tx = confusion.round_optimizer(rs)
  start = confusion.restart(pretrained, tx, mesh)
  step = confusion.alternating_step(
      confusion.jitted_confusion_step(config, rs, graphdef, tx, inputs.num_classes),
      confusion.jitted_confusion_step(config, rs, graphdef, tx, inputs.num_classes, mixed=False))
  batch_fn = confusion.confusion_batches(
      rs, inspected, {"seed_image": inputs.reserve_images, "seed_pred": base_pred}, mesh, seed, batch_factor)
  confused = stages.trained(run, names[1], start, rs.iters, lambda: stages.train(
      run, names[1], start, step, batch_fn, confusion.confusion_train_config(rs), rs.iters, mesh, seed),
                            {"inspected": len(inspected["label"]), "lam": rs.lam})
  return graphdef, pretrained, confused


# ---------------------------------------------------------------------------------------------------------------
# The final test


def chunklet_sizes(counts: np.ndarray, fraction: float) -> np.ndarray:
  """The clean chunklet's size per class, the official's sorted-loss positions int(n/2 - n f/2) to
  int(n/2 + n f/2) - 1 of a class's n; counts [C] -> int [C]."""
  counts = np.asarray(counts, np.float64)
  return (counts / 2 + counts * fraction / 2).astype(np.int64) - (counts / 2 - counts * fraction / 2).astype(np.int64)


def check_chunklets(counts: np.ndarray, fraction: float) -> None:
  """UserError when a class (counts [C]) has fewer than 2 samples in its clean chunklet (the official raises)."""
  sizes = chunklet_sizes(counts, fraction)
  if (sizes < 2).any():
    c = int(np.argmin(sizes))
    raise UserError(f"CT's final test needs 2 samples of each class in its clean chunklet; class {c} has "
                    f"{int(counts[c])} samples, {int(sizes[c])} in the chunklet of "
                    f"config.baseline.ct.median_sample_fraction={fraction}; raise it")


def projection(features: np.ndarray) -> np.ndarray:
  """features [n, D] centred and projected on their top min(2, D) principal directions, each direction signed so
  that its largest-magnitude loading is positive (scikit-learn's PCA convention) -> [n, min(2, D)]."""
  centred = features.astype(np.float64) - features.mean(0, dtype=np.float64)
  directions = np.linalg.svd(centred, full_matrices=False)[2][:2]
  signs = np.sign(directions[np.arange(len(directions)), np.argmax(np.abs(directions), axis=1)])
  return centred @ (directions * signs[:, None]).T


def gaussian_log_density(x: np.ndarray, mean: np.ndarray, cov: np.ndarray) -> np.ndarray:
  """log N(x | mean, cov) of x [n, d] -> [n] as SciPy's multivariate_normal.logpdf(allow_singular=True): cov [d, d]
  by its eigenvalues above eps = PSEUDO_RCOND times the largest (pseudo-inverse, pseudo-determinant), -inf for a
  sample whose offset has a component of eps or more along the dropped eigenvectors."""
  values, vectors = np.linalg.eigh(cov)
  eps = PSEUDO_RCOND * np.abs(values).max()
  kept = values > eps
  offset = x - mean
  mahalanobis = np.sum((offset @ vectors[:, kept]) ** 2 / values[kept], axis=1)
  log_density = -0.5 * (kept.sum() * np.log(2 * np.pi) + np.log(values[kept]).sum() + mahalanobis)
  return np.where(np.linalg.norm(offset @ vectors[:, ~kept], axis=1) < eps, log_density, -np.inf)


def class_log_ratio(features: np.ndarray, isolated: np.ndarray) -> float:
  """The log likelihood ratio of one class (features [n, D]) split into the isolated samples (mask [n], predicted
  as the class) and the others: (sum over the class of log N(x | its group's Gaussian) - log N(x | the others'
  Gaussian)) / n on the `projection`, each Gaussian its group's mean and sample covariance + COVARIANCE_SHIFT;
  0 (ratio 1) unless each group has at least 2 samples."""
  if not 2 <= isolated.sum() <= len(isolated) - 2:
    return 0.0
  x = projection(features)
  gaussians = [(x[group].mean(0), np.atleast_2d(np.cov(x[group], rowvar=False)) + COVARIANCE_SHIFT)
               for group in (~isolated, isolated)]
  single = gaussian_log_density(x, *gaussians[0])
  two = np.where(isolated, gaussian_log_density(x, *gaussians[1]), single)
  return float((two.sum() - single.sum()) / len(x))


def class_log_ratios(features: np.ndarray, labels: np.ndarray, predictions: np.ndarray,
                     num_classes: int) -> np.ndarray:
  """Per class, the `class_log_ratio` of its members split by whether the inference model predicts their label;
  features [N, D], labels, predictions [N] -> float [C]."""
  return np.array([class_log_ratio(features[labels == c], predictions[labels == c] == c)
                   for c in range(num_classes)])


def flagged_classes(log_ratios: np.ndarray, lr_threshold: float, max_ratio_threshold: float) -> np.ndarray:
  """Classes whose ratio exceeds lr_threshold, and the one with the largest ratio when it exceeds
  max_ratio_threshold; log_ratios [C] -> bool [C]."""
  largest = log_ratios == log_ratios.max()
  return (log_ratios > np.log(lr_threshold)) | (largest & (log_ratios > np.log(max_ratio_threshold)))


def flagged_members(labels: np.ndarray, predictions: np.ndarray, flagged: np.ndarray) -> np.ndarray:
  """The members of flagged classes (bool [C]) predicted as their label; labels, predictions [N] -> sorted int64
  indices."""
  return np.where(flagged[labels] & (predictions == labels))[0].astype(np.int64)
