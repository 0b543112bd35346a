"""T-Core (Zhang et al., S&P 2025): trusted-core bootstrapping of a clean downstream model, as stages of a run.

  seeds    <- sift(suspect encoder, downstream set)           stage tcore_sift
  trusted, suspected <- confusion training, seeds as confusion set   stages expand<r>_pretrain, expand<r>_confuse
  encoder' <- UCLC channel filter, selected on the trusted set      stage tcore_filter
  model    <- progressive bootstrapping from the seeds              stages boot<k>_<protocol>

The published description names these four components; their details are jaxpurify's reconstruction
(tcore.md section 5, README "T-Core"). A component named in config.tcore.skip is replaced by its naive
stand-in: random seeds per class, the seeds as the whole trusted set (nothing suspected), no channel filter,
one fine-tune on the trusted set. The evaluator, who knows the poison, scores every step against the true
poison positions.
"""

import json
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from jaxpurify import finetune, parallel, stages, threats
from jaxpurify.data.device import DeviceDataset
from jaxpurify.defenses import channels, confusion, sift
from jaxpurify.encoders import Encoder
from jaxpurify.errors import UserError
from jaxpurify.train.state import TrainState, make_optimizer

COMPONENTS = ("sift", "expand", "filter", "boot")


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


def _skipped(config, component: str) -> bool:
  return component in config.tcore.skip


def seeds_stage(run, config, encoder: Encoder, images, labels, num_classes: int, mesh) -> np.ndarray:
  """Stage tcore_sift: seeds_per_class trusted seeds per class (random ones when 'sift' is skipped)."""
  if (record := run.done("tcore_sift")) is not None:
    return np.array(record["seeds"], dtype=np.int64)
  block = config.tcore.sift
  if _skipped(config, "sift"):
    rng = np.random.default_rng(config.seed)
    seeds = np.sort(np.concatenate([rng.choice(np.where(labels == c)[0], block.seeds_per_class, replace=False)
                                    for c in range(num_classes)]))
    record = {"seeds": seeds.tolist(), "method": "random"}
  else:
    out = sift.sift(encoder, config.model, images, labels, num_classes, block, config.evaluate.batch_size, mesh)
    seeds = np.asarray(out["seeds"], dtype=np.int64)
    np.savez(os.path.join(run.stage_dir("tcore_sift"), "ranks.npz"), rank=out["rank"], margin=out["margin"])
    record = {"seeds": seeds.tolist(), "method": "topology", "layers": list(block.layers)}
  run.finish("tcore_sift", record)
  return seeds


def _restart(state: TrainState, tx, mesh) -> TrainState:
  """The same weights with a fresh optimiser state and step 0, replicated over `mesh`."""
  fresh = lambda s: TrainState(jnp.zeros((), jnp.int32), s.params, s.batch_stats, tx.init(s.params))
  return jax.jit(fresh, out_shardings=parallel.replicated(mesh))(state)


def _logits(config, graphdef, state, images, mesh) -> np.ndarray:
  fn = finetune.predict_fn(graphdef, state, config.model.mean, config.model.std)
  return finetune.predict_logits(fn, images, config.evaluate.batch_size, mesh)


def _block(optim, batch_size: int, epochs: int, log_every: int) -> ml_collections.ConfigDict:
  """A finetune-style {optim, train} block for a training inside the defense."""
  return ml_collections.ConfigDict(dict(optim=optim, train=dict(
      batch_size=batch_size, epochs=epochs, log_every=log_every, checkpoint_every=10**9, keep_checkpoints=1)))


def confusion_optimizer(config, r: int):
  """Round r's confusion optimiser: SGD (lr, momentum, weight decay of config.tcore.expand), the head only when
  expand.trainable is 'head'."""
  e = config.tcore.expand
  return make_optimizer(ml_collections.ConfigDict(dict(name="sgd", lr=e.lrs[r], momentum=e.momentum,
                                                       weight_decay=e.weight_decay)),
                        trainable=finetune.head_only if e.trainable == "head" else None)


def confusion_training(config, r: int, graphdef, tx, suspects: dict, confusers: dict, num_classes: int, mesh,
                       seed: int):
  """-> (jitted donating confusion step of round r, batch_fn(step)) over suspects {'image', 'label', 'weight'}
  and confusers {'seed_image', 'seed_pred'} (host arrays), batched as config.tcore.expand says."""
  e = config.tcore.expand
  step = jax.jit(confusion.make_confusion_step(graphdef, tx, e.trainable, config.finetune.augment, config.model.mean,
                                               config.model.std, e.lambdas[r], num_classes), donate_argnums=0)
  suspect_set = DeviceDataset(suspects, mesh, e.batch_size, seed)
  confuser_set = DeviceDataset(confusers, mesh, min(e.seed_batch_size, len(confusers["seed_image"])), seed + 1000)
  return step, lambda i: suspect_set.batch(i) | confuser_set.batch(i)


def confusion_round(run, config, r: int, encoder: Encoder, images, labels, distilled: np.ndarray,
                    seeds: np.ndarray, num_classes: int, mesh) -> np.ndarray:
  """Round r of confusion training: fine-tune on the distilled set, confuse with the seeds; -> the per-sample
  cross-entropy float [N] of every sample under the confused model (stage expand<r>_confuse keeps it)."""
  stage, e = f"expand{r}_confuse", config.tcore.expand
  path = os.path.join(run.stage_dir(stage), "losses.npy")
  if run.done(stage) is not None:
    return np.load(path)
  protocol = "ft_all" if e.trainable == "all" else "ft_head"
  block = _block(e.pretrain_optim, e.batch_size, e.pretrain_epochs[r], e.log_every)
  graphdef, state, step, dataset, num_steps = threats.finetune_training(
      config, protocol, encoder, images[distilled], labels[distilled], num_classes, mesh, block=block)
  state = stages.train(run, f"expand{r}_pretrain", state, step, dataset.batch, block.train, num_steps, mesh,
                       config.seed + r)
  base_pred = np.argmax(_logits(config, graphdef, state, images[seeds], mesh), -1).astype(np.int32)
  tx = confusion_optimizer(config, r)
  state = _restart(state, tx, mesh)
  weights = confusion.class_weights(labels[distilled], num_classes)[labels[distilled]]
  step, batch_fn = confusion_training(
      config, r, graphdef, tx, {"image": images[distilled], "label": labels[distilled].astype(np.int32),
                                "weight": weights},
      {"seed_image": images[seeds], "seed_pred": base_pred}, num_classes, mesh, config.seed + r)
  train_block = _block(None, e.batch_size, 0, e.log_every).train
  state = stages.train(run, stage, state, step, batch_fn, train_block, e.iters[r], mesh, config.seed + r)
  losses = confusion.sample_losses(_logits(config, graphdef, state, images, mesh), labels)
  if jax.process_index() == 0:
    np.save(path, losses)
  run.finish(stage, {"distilled": len(distilled), "iters": e.iters[r]})
  return losses


def expand(run, config, encoder: Encoder, images, labels, seeds: np.ndarray, num_classes: int, mesh):
  """Seed expansion: the rounds of confusion training -> (trusted, suspected) sorted indices."""
  e, n = config.tcore.expand, len(labels)
  distilled = np.arange(n)
  for r, ratio in enumerate(e.ratios):
    losses = confusion_round(run, config, r, encoder, images, labels, distilled, seeds, num_classes, mesh)
    counts = np.bincount(labels, minlength=num_classes)
    distilled = confusion.distill(losses, labels, ratio, max(1, int(counts.min() * e.min_per_class_fraction)))
  return confusion.split_trusted(losses, labels, seeds, e.low_loss_fraction, e.per_class_cap, e.min_seed_fraction)


def filter_stage(run, config, encoder: Encoder, images, labels, trusted: np.ndarray, mesh):
  """Stage tcore_filter: the channel masks of the encoder's conv+BN layers -> ({layer: keep bool [C]}, record)."""
  if (record := run.done("tcore_filter")) is not None:
    return {k: np.array(v, bool) for k, v in record["masks"].items()}, record
  f = config.tcore.filter
  trusted_labels = labels[trusted]

  def trusted_accuracy(candidate: Encoder) -> float:
    """Leave-one-out 1-nearest-neighbour accuracy of the trusted set on the final features."""
    features = sift.depth_features(candidate, config.model, images[trusted], config.evaluate.batch_size, mesh)[-1]
    rank, _ = sift.neighbour_ranks(features, trusted_labels, config.tcore.sift.chunk_rows)
    return float(np.mean(np.asarray(rank) == 1))

  masks, chosen_u, sweep = channels.select_masks(encoder, f.rule, f.u, tuple(f.u_grid), f.acc_tol,
                                                 trusted_accuracy, f.std_ddof, f.bn_eps)
  record = {"u": chosen_u, "rule": f.rule, "pruned": channels.pruned_counts(masks), "sweep": sweep,
            "masks": {k: np.asarray(v).tolist() for k, v in masks.items()}}
  run.finish("tcore_filter", record)
  return masks, record


def bootstrap(run, config, protocol: str, encoder: Encoder, masks, images, labels, seeds: np.ndarray,
              trusted: np.ndarray, suspected: np.ndarray, setting: threats.Setting, mesh):
  """Progressive bootstrapping with `protocol`: train on the seeds the expansion kept trusted, then per stage
  admit, per class, samples the current model predicts as their label with confidence >= conf_threshold (most
  confident first) up to the schedule's fraction of the class, and train on. The pool widens: stage 1 admits
  from the expanded trusted set, middle stages from every sample outside the suspected set, the last stage
  from every sample. Skipped ('boot'): one training on the trusted set.
  -> (evaluation of the final model, per stage the core's size and poison count)."""
  b, num_classes = config.tcore.boot, setting.test.num_classes
  schedule = () if _skipped(config, "boot") else tuple(b.schedule)
  core = trusted if _skipped(config, "boot") else np.intersect1d(seeds, trusted)
  outside = np.setdiff1d(np.arange(len(labels)), suspected)
  block = config.finetune[protocol].copy_and_resolve_references()
  history, graphdef, state = [], None, None
  for k in range(len(schedule) + 1):
    if k:
      pool = trusted if k == 1 else outside if k < len(schedule) else np.arange(len(labels))
      core = admit(_logits(config, graphdef, state, images, mesh), labels, core, pool, schedule[k - 1],
                   b.conf_threshold)
    history.append(poison_counts(core, setting.poison))
    block.train.epochs = max(1, -(-b.steps_per_stage * block.train.batch_size // len(core)))
    graphdef, fresh, step, dataset, num_steps = threats.finetune_training(
        config, protocol, encoder, images[core], labels[core], num_classes, mesh, masks, block=block)
    if state is not None:  # warm start from the previous stage's model
      fresh = fresh.replace(params=state.params, batch_stats=state.batch_stats)
    stage = f"boot{k}_{protocol}"
    state = stages.train(run, stage, fresh, step, dataset.batch, block.train, num_steps, mesh, config.seed + k)
    if run.done(stage) is None:
      run.finish(stage, {"core": len(core), "steps": num_steps})
  evaluation = threats.evaluate_classifier(config, graphdef, state, setting.test, setting.trigger, setting.target,
                                           mesh)
  return evaluation, history


def admit(logits: np.ndarray, labels: np.ndarray, core: np.ndarray, pool: np.ndarray, fraction: float,
          conf_threshold: float) -> np.ndarray:
  """The core grown per class to `fraction` of the class with samples of `pool` predicted as their label with
  softmax confidence >= conf_threshold, most confident first; logits [N, C] -> sorted indices."""
  probs = np.exp(logits - logits.max(1, keepdims=True))
  probs /= probs.sum(1, keepdims=True)
  confidence = probs[np.arange(len(labels)), labels]
  eligible = np.zeros(len(labels), bool)
  eligible[pool] = True
  eligible &= (np.argmax(logits, 1) == labels) & (confidence >= conf_threshold)
  in_core = np.zeros(len(labels), bool)
  in_core[core] = True
  grown = set(core.tolist())
  for c in np.unique(labels):
    members = np.where(labels == c)[0]
    room = int(fraction * len(members)) - int(in_core[members].sum())
    candidates = members[eligible[members] & ~in_core[members]]
    candidates = candidates[np.argsort(-confidence[candidates], kind="stable")]
    grown.update(candidates[:max(room, 0)].tolist())
  return np.array(sorted(grown), dtype=np.int64)


def tcore(run, mesh):
  """The threat's setting and undefended rows, then T-Core -> (rows with 'defended/<protocol>', diagnostics)."""
  config = run.config
  setting = threats.setting(run, mesh)
  rows = threats.undefended_rows(run, setting, mesh)
  images, labels, poison = setting.victim_images, setting.victim_labels, setting.poison
  num_classes = setting.test.num_classes
  seeds = seeds_stage(run, config, setting.encoder, images, labels, num_classes, mesh)
  diagnostics = {"seeds": poison_counts(seeds, poison)}
  if _skipped(config, "expand"):
    trusted, suspected = seeds, np.zeros(0, np.int64)
  else:
    trusted, suspected = expand(run, config, setting.encoder, images, labels, seeds, num_classes, mesh)
    diagnostics["expansion"] = {**detection(suspected, poison), "trusted": poison_counts(trusted, poison)}
  encoder, masks = setting.encoder, None
  if not _skipped(config, "filter"):
    masks, record = filter_stage(run, config, setting.encoder, images, labels, trusted, mesh)
    encoder = channels.apply_masks(setting.encoder, masks)
    diagnostics["filter"] = {"u": record["u"], "pruned": record["pruned"],
                             "pruned_total": int(sum(record["pruned"].values()))}
  for protocol in config.finetune.protocols:
    rows[f"defended/{protocol}"], history = bootstrap(run, config, protocol, encoder, masks, images, labels, seeds,
                                                      trusted, suspected, setting, mesh)
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
  if not t.filter.u > 0:
    raise UserError(f"config.tcore.filter.u is {t.filter.u}; the channel filter's threshold is mean + u * std of "
                    "a layer's UCLC and needs u > 0 (CLP's default is 3)")
  if any(not u > 0 for u in t.filter.u_grid):
    raise UserError(f"config.tcore.filter.u_grid {tuple(t.filter.u_grid)} holds a u <= 0; every u must be > 0")
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
