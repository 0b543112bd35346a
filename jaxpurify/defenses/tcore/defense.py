"""T-Core (Zhang et al., S&P 2025): trusted-core bootstrapping of a clean downstream model, as stages of a run.

  seeds    <- sift(suspect encoder, downstream set)           stage tcore_sift                 (sift)
  trusted, suspected <- confusion training, seeds as confusion set   stages expand<r>_pretrain, expand<r>_confuse
                                                                                               (confusion)
  encoder' <- UCLC channel filter, selected on the trusted set      stage tcore_filter          (channels)
  model    <- progressive bootstrapping from the seeds              stages boot<k>_<protocol>   (bootstrap)

The published description names these four components; their details are jaxpurify's reconstruction
(tcore.md section 5, docs/tcore.md). A component named in config.tcore.skip is replaced by its naive
stand-in: random seeds per class, the seeds as the whole trusted set (nothing suspected), no channel filter,
one fine-tune on the trusted set. The evaluator, who knows the poison, scores every step against the true
poison positions.
"""

import json
import os

import jax
import numpy as np

from jaxpurify.defenses.tcore import bootstrap, channels, confusion, sift
from jaxpurify.errors import UserError
from jaxpurify.evaluation.metrics import detection, poison_counts
from jaxpurify.threats import Setting

COMPONENTS = ("sift", "expand", "filter", "boot")


def defend(run, setting: Setting, mesh) -> tuple[dict, dict]:
  """T-Core in the threat's `setting` -> ({'defended/<protocol>': {acc, asr, asr_all}}, diagnostics against the
  true poison positions); writes the diagnostics to tcore.json too."""
  config, rows = run.config, {}
  images, labels, poison = setting.victim_images, setting.victim_labels, setting.poison
  num_classes = setting.test.num_classes
  seeds = sift.seeds_stage(run, config, setting.encoder, images, labels, num_classes, mesh)
  diagnostics = {"seeds": poison_counts(seeds, poison)}
  if "expand" in config.tcore.skip:
    trusted, suspected = seeds, np.zeros(0, np.int64)
  else:
    trusted, suspected = confusion.expand(run, config, setting.encoder, images, labels, seeds, num_classes, mesh)
    diagnostics["expansion"] = {**detection(suspected, poison), "trusted": poison_counts(trusted, poison)}
  encoder, encoder_mask = setting.encoder, None
  if "filter" not in config.tcore.skip:
    masks, record = channels.filter_stage(run, config, setting.encoder, images, labels, trusted, mesh)
    encoder = channels.apply_masks(setting.encoder, masks)
    encoder_mask = channels.param_mask(encoder, masks)
    diagnostics["filter"] = {"u": record["u"], "pruned": record["pruned"],
                             "pruned_total": int(sum(record["pruned"].values()))}
  for protocol in config.finetune.protocols:
    rows[f"defended/{protocol}"], history = bootstrap.bootstrap(run, config, protocol, encoder, encoder_mask, images,
                                                                labels, seeds, trusted, suspected, setting, mesh)
    diagnostics[f"bootstrap/{protocol}"] = history
  if jax.process_index() == 0:
    with open(os.path.join(run.workdir, "tcore.json"), "w", encoding="utf-8") as f:
      json.dump(diagnostics, f, indent=2)
  return rows, diagnostics


def check(config, labels: np.ndarray, num_classes: int) -> None:
  """Fails fast on a T-Core config that cannot run (one line naming the field and the fix)."""
  t = config.tcore
  unknown = set(t.skip) - set(COMPONENTS)
  if unknown:
    raise UserError(f"unknown T-Core component(s) {', '.join(sorted(unknown))} in config.tcore.skip; use some of "
                    f"{', '.join(COMPONENTS)}")
  if {"sift", "expand"} <= set(t.skip):
    raise UserError("with both 'sift' and 'expand' in config.tcore.skip there is no trusted core for the channel "
                    "filter and the bootstrapping to start from; keep 'sift' or 'expand'")
  sift.check(t.sift.seeds_per_class, labels, num_classes)
  if t.sift.aggregate not in sift.AGGREGATES:
    raise UserError(f"unknown sift aggregate {t.sift.aggregate!r}; set config.tcore.sift.aggregate to one of "
                    f"{', '.join(sift.AGGREGATES)}")
  if t.filter.rule not in channels.RULES:
    raise UserError(f"unknown channel-filter rule {t.filter.rule!r}; set config.tcore.filter.rule to one of "
                    f"{', '.join(channels.RULES)}")
  e = t.expand
  if e.trainable not in ("head", "all"):
    raise UserError(f"config.tcore.expand.trainable is {e.trainable!r}; use 'head' or 'all'")
  rounds = len(e.ratios)
  for field in ("lambdas", "lrs", "iters", "pretrain_epochs"):
    if len(e[field]) != rounds:
      raise UserError(f"config.tcore.expand.{field} has {len(e[field])} entries for {rounds} rounds "
                      f"(len(config.tcore.expand.ratios)); give one per round")
  if any(lam <= 1 for lam in e.lambdas):
    raise UserError("config.tcore.expand.lambdas must be > 1: the confusion term is weighted (lambda - 1)")
  for field in ("low_loss_fraction", "per_class_cap", "min_seed_fraction"):
    if not 0 <= e[field] <= 1:
      raise UserError(f"config.tcore.expand.{field} is {e[field]}; it is a fraction in [0, 1]")
  b = t.boot
  if any(not 0 < f <= 1 for f in b.schedule):
    raise UserError(f"config.tcore.boot.schedule {tuple(b.schedule)} must hold fractions of a class in (0, 1]")
  if not 0 <= b.conf_threshold <= 1:
    raise UserError(f"config.tcore.boot.conf_threshold is {b.conf_threshold}; a softmax confidence is in [0, 1]")
