"""T-Core's seed expansion by confusion training (tcore.md sections 4.2 and 5.2; a reconstruction).

Confusion training (Qi et al., "Fight Poison with Poison") trains a classifier on the suspect set while pulling
a small clean set towards wrong ("confused") labels. The confusion destroys the benign image-label links, so
clean samples end with a high loss, while the backdoor's shortcut survives, so poisons keep a low one. T-Core
has no clean reserve: the sifted seeds play the confusion set.

One round: fine-tune a fresh classifier (suspect encoder + new head) on the current distilled set with plain
cross-entropy, then run the confusion steps, then keep the lowest-loss `ratio` of all samples as the next
distilled set. After the last round, the lowest `low_loss_fraction` of the losses are the suspected poisons (a
seed among them loses its trust, down to a floor per class) and the rest, per class at most `per_class_cap` of
the class, join the seeds as the trusted set. `expand` runs the rounds as stages of a run.

The round's pieces (`RoundSettings`, `pretraining`, `round_optimizer`, `jitted_confusion_step`,
`confusion_batches`, `distill`) take one round's settings and the confusion set as arguments: the Confusion
Training baseline (`defenses/baselines/ct.py`) runs its rounds with them, the defender's clean reserve as the
confusion set and the inspected set every other step (`make_confusion_only_step`, `alternating_step`).
"""

import os
from typing import NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx

from jaxpurify import augment, finetune, parallel, stages
from jaxpurify.data.device import DeviceDataset
from jaxpurify.encoders import Encoder
from jaxpurify.train.state import TrainState, apply_gradients, make_optimizer


class RoundSettings(NamedTuple):
  """One confusion round's settings. trainable: 'head' (frozen encoder) or 'all'; pretrain_optim, pretrain_epochs:
  the plain fine-tuning; lam, lr, momentum, weight_decay, iters: the confusion steps (SGD); batch_size: inspected
  images per batch (both phases); seed_batch_size: confusion images per step; log_every: metrics period."""
  trainable: str
  pretrain_optim: ml_collections.ConfigDict
  pretrain_epochs: int
  lam: float
  lr: float
  momentum: float
  weight_decay: float
  iters: int
  batch_size: int
  seed_batch_size: int
  log_every: int


def round_settings(block, r: int, trainable: str) -> RoundSettings:
  """Round r's settings from a block with per-round lists (lambdas, lrs, iters, pretrain_epochs) and shared
  fields (pretrain_optim, momentum, weight_decay, batch_size, seed_batch_size, log_every)."""
  return RoundSettings(trainable, block.pretrain_optim, block.pretrain_epochs[r], block.lambdas[r], block.lrs[r],
                       block.momentum, block.weight_decay, block.iters[r], block.batch_size, block.seed_batch_size,
                       block.log_every)


def expand_settings(config, r: int) -> RoundSettings:
  """T-Core's round r: config.tcore.expand, trainable as expand.trainable says."""
  return round_settings(config.tcore.expand, r, config.tcore.expand.trainable)


def class_weights(labels: np.ndarray, num_classes: int) -> np.ndarray:
  """CT's per-class weights of the distilled set: 1 / sqrt(frequency + 0.001); labels [N] -> float32 [C]."""
  freq = np.bincount(labels, minlength=num_classes) / max(len(labels), 1)
  return (1.0 / np.sqrt(freq + 0.001)).astype(np.float32)


def confused_labels(base_pred: jax.Array, step: jax.Array, num_classes: int) -> jax.Array:
  """(prediction + 1 + step mod (C - 1)) mod C: never the base model's prediction, and cycling through every
  other class as the steps go; base_pred int [B] -> int32 [B]."""
  return ((base_pred + 1 + step % (num_classes - 1)) % num_classes).astype(jnp.int32)


def make_confusion_step(graphdef, tx, trainable: str, augment_config, mean, std, lam: float, num_classes: int):
  """-> step(state, batch, key) -> (state, metrics); pure, jit it with the state donated.

  batch: 'image' uint8 [B, H, W, 3], 'label' int32 [B], 'weight' float32 [B] (the distilled set, class-weighted)
  and 'seed_image' uint8 [S, H, W, 3], 'seed_pred' int32 [S] (the confusion set and the base model's
  predictions). loss = ((lam - 1) * CE(seeds, confused labels) + weighted CE(distilled)) / lam.
  trainable: 'head' (frozen encoder, inference BatchNorm) or 'all'.
  """
  return _make_step(graphdef, tx, trainable, augment_config, mean, std, num_classes, lam, mixed=True)


def make_confusion_only_step(graphdef, tx, trainable: str, augment_config, mean, std, num_classes: int):
  """`make_confusion_step` on a batch of the confusion set alone ('seed_image', 'seed_pred'): loss = CE(seeds,
  confused labels), the steps between two mixed ones when the inspected set comes every few steps."""
  return _make_step(graphdef, tx, trainable, augment_config, mean, std, num_classes, None, mixed=False)


def _make_step(graphdef, tx, trainable: str, augment_config, mean, std, num_classes: int, lam, mixed: bool):
  """The confusion step on mixed (inspected + confusion) or confusion-only batches (static `mixed`)."""
  train_backbone = trainable == "all"
  mean, std = jnp.asarray(mean), jnp.asarray(std)

  def step(state: TrainState, batch, key):
    key = jax.random.fold_in(key, state.step)
    aug_key, seed_aug_key, drop_key = jax.random.split(key, 3)
    prepare = lambda k, images: augment.normalize(augment.to_float(
        augment.crop_flip(k, images, augment_config.padding, augment_config.flip_prob)), mean, std)
    if mixed:
      x = jnp.concatenate([prepare(aug_key, batch["image"]), prepare(seed_aug_key, batch["seed_image"])])
    else:
      x = prepare(seed_aug_key, batch["seed_image"])
    confused = confused_labels(batch["seed_pred"], state.step, num_classes)
    n = batch["image"].shape[0] if mixed else 0

    def loss_fn(params):
      if not train_backbone:
        params = jax.tree.map(lambda p, keep: p if keep else jax.lax.stop_gradient(p), params,
                              finetune.head_only(params))
      model = nnx.merge(graphdef, params, state.batch_stats, copy=True)
      logits = model(x, train_backbone=train_backbone, dropout_key=drop_key)
      batch_stats = nnx.state(model, nnx.BatchStat)
      confusion = optax.softmax_cross_entropy_with_integer_labels(logits[n:], confused).mean()
      if not mixed:
        return confusion, ({"confusion_ce": confusion}, batch_stats)
      distilled = optax.softmax_cross_entropy_with_integer_labels(logits[:n], batch["label"])
      distilled = jnp.sum(batch["weight"] * distilled) / jnp.sum(batch["weight"])
      loss = ((lam - 1.0) * confusion + distilled) / lam
      return loss, ({"distilled_ce": distilled, "confusion_ce": confusion}, batch_stats)

    (loss, (parts, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    state, health = apply_gradients(state, tx, grads, batch_stats)
    return state, {"loss": loss, **parts, **health}

  return step


def sample_losses(logits: np.ndarray, labels: np.ndarray) -> np.ndarray:
  """Per-sample cross-entropy of logits [N, C] on integer labels [N] -> float [N] (float64 on the host)."""
  logits = logits.astype(np.float64)
  shifted = logits - logits.max(axis=1, keepdims=True)
  log_probs = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
  return -log_probs[np.arange(len(labels)), labels]


def distill(losses: np.ndarray, labels: np.ndarray, ratio: float, min_per_class) -> np.ndarray:
  """CT's distillation: the lowest-loss round(ratio * N) samples, topped up per class with that class's
  lowest-loss samples to at least `min_per_class` (an int, or int [C] indexed by class); -> sorted indices."""
  keep = set(np.argsort(losses, kind="stable")[:max(1, round(ratio * len(losses)))].tolist())
  minimum = np.broadcast_to(min_per_class, (labels.max() + 1,))
  for c in np.unique(labels):
    members = np.where(labels == c)[0]
    members = members[np.argsort(losses[members], kind="stable")]
    keep.update(members[:minimum[c]].tolist())
  return np.array(sorted(keep), dtype=np.int64)


def split_trusted(losses: np.ndarray, labels: np.ndarray, seeds: np.ndarray, low_loss_fraction: float,
                  per_class_cap: float, min_seed_fraction: float) -> tuple[np.ndarray, np.ndarray]:
  """-> (trusted, suspected) sorted indices. Suspected: the lowest `low_loss_fraction` of all losses.
  Trusted: the seeds outside the suspected set (per class at least `min_seed_fraction` of the class's seeds,
  the highest-loss ones, so that no class loses every seed), plus per class the highest-loss samples outside
  the suspected set, up to `per_class_cap` of the class (seeds included)."""
  suspected = np.sort(np.argsort(losses, kind="stable")[:round(low_loss_fraction * len(losses))])
  outside = np.ones(len(losses), bool)
  outside[suspected] = False
  kept = []
  for c in np.unique(labels[seeds]):
    members = seeds[labels[seeds] == c]
    members = members[np.argsort(-losses[members], kind="stable")]
    floor = int(np.ceil(min_seed_fraction * len(members)))
    kept.append(members[outside[members] | (np.arange(len(members)) < floor)])
  kept = np.concatenate(kept) if kept else np.zeros(0, np.int64)
  outside[seeds] = False
  trusted = set(kept.tolist())
  for c in np.unique(labels):
    members = np.where(labels == c)[0]
    room = int(per_class_cap * len(members)) - int(np.isin(members, kept).sum())
    candidates = members[outside[members]]
    candidates = candidates[np.argsort(-losses[candidates], kind="stable")]
    trusted.update(candidates[:max(room, 0)].tolist())
  return np.array(sorted(trusted), dtype=np.int64), suspected


def restart(state: TrainState, tx, mesh) -> TrainState:
  """The same weights with a fresh optimiser state and step 0, replicated over `mesh`."""
  fresh = lambda s: TrainState(jnp.zeros((), jnp.int32), s.params, s.batch_stats, tx.init(s.params))
  return jax.jit(fresh, out_shardings=parallel.replicated(mesh))(state)


def _block(optim, batch_size: int, epochs: int, log_every: int) -> ml_collections.ConfigDict:
  """A finetune-style {optim, train} block for a training inside the defense."""
  return ml_collections.ConfigDict(dict(optim=optim, train=dict(
      batch_size=batch_size, epochs=epochs, log_every=log_every, checkpoint_every=10**9, keep_checkpoints=1)))


def pretraining(config, rs: RoundSettings, encoder: Encoder, images, labels, num_classes: int, mesh):
  """-> (graphdef, state at step 0, jitted donating step, DeviceDataset, number of steps, train config) of a
  round's plain fine-tuning of `encoder` + a fresh head on uint8 images [N, H, W, 3] with labels [N] (FT-all when
  rs.trainable is 'all', else FT-head)."""
  protocol = "ft_all" if rs.trainable == "all" else "ft_head"
  block = _block(rs.pretrain_optim, rs.batch_size, rs.pretrain_epochs, rs.log_every)
  graphdef, state, step, dataset, num_steps = finetune.finetune_training(
      config, protocol, encoder, images, labels, num_classes, mesh, block=block)
  return graphdef, state, step, dataset, num_steps, block.train


def round_optimizer(rs: RoundSettings):
  """A round's confusion optimiser: SGD (lr, momentum, weight decay of `rs`), the head only when rs.trainable is
  'head'."""
  return make_optimizer(ml_collections.ConfigDict(dict(name="sgd", lr=rs.lr, momentum=rs.momentum,
                                                       weight_decay=rs.weight_decay)),
                        trainable=finetune.head_only if rs.trainable == "head" else None)


def confusion_optimizer(config, r: int):
  """T-Core's round r confusion optimiser (config.tcore.expand)."""
  return round_optimizer(expand_settings(config, r))


def confusion_train_config(rs: RoundSettings) -> ml_collections.ConfigDict:
  """The train config (batch size, logging, checkpointing) `stages.train` runs a round's confusion steps with."""
  return _block(None, rs.batch_size, 0, rs.log_every).train


def jitted_confusion_step(config, rs: RoundSettings, graphdef, tx, num_classes: int, mixed: bool = True):
  """A round's confusion step, jitted with the state donated: on mixed batches (`make_confusion_step`) or, with
  `mixed` False, on confusion-only ones (`make_confusion_only_step`); config's augmentation, mean and std."""
  common = (graphdef, tx, rs.trainable, config.finetune.augment, config.model.mean, config.model.std)
  if mixed:
    return jax.jit(make_confusion_step(*common, rs.lam, num_classes), donate_argnums=0)
  return jax.jit(make_confusion_only_step(*common, num_classes), donate_argnums=0)


def alternating_step(mixed, confusion_only):
  """A step over `confusion_batches` with batch_factor > 1: `mixed` on the batches that hold inspected images,
  `confusion_only` on the others."""
  return lambda state, batch, key: (mixed if "image" in batch else confusion_only)(state, batch, key)


def confusion_batches(rs: RoundSettings, inspected: dict, confusers: dict, mesh, seed: int, batch_factor: int = 1):
  """-> batch_fn(step) over inspected {'image', 'label', 'weight'} and confusers {'seed_image', 'seed_pred'}
  (host arrays): a confusion batch every step, with the next inspected batch every `batch_factor`-th step (steps
  0, f, 2f, ...)."""
  inspected_set = DeviceDataset(inspected, mesh, rs.batch_size, seed)
  confuser_set = DeviceDataset(confusers, mesh, min(rs.seed_batch_size, len(confusers["seed_image"])), seed + 1000)
  return lambda i: ({} if i % batch_factor else inspected_set.batch(i // batch_factor)) | confuser_set.batch(i)


def confusion_training(config, r: int, graphdef, tx, suspects: dict, confusers: dict, num_classes: int, mesh,
                       seed: int):
  """-> (jitted donating confusion step of T-Core's round r, batch_fn(step)) over suspects {'image', 'label',
  'weight'} and confusers {'seed_image', 'seed_pred'} (host arrays), batched as config.tcore.expand says."""
  rs = expand_settings(config, r)
  return (jitted_confusion_step(config, rs, graphdef, tx, num_classes),
          confusion_batches(rs, suspects, confusers, mesh, seed))


def confusion_round(run, config, r: int, encoder: Encoder, images, labels, distilled: np.ndarray,
                    seeds: np.ndarray, num_classes: int, mesh) -> np.ndarray:
  """Round r of confusion training: fine-tune on the distilled set, confuse with the seeds; -> the per-sample
  cross-entropy float [N] of every sample under the confused model (stage expand<r>_confuse keeps it)."""
  stage, rs = f"expand{r}_confuse", expand_settings(config, r)
  path = os.path.join(run.stage_dir(stage), "losses.npy")
  if run.done(stage) is not None:
    return np.load(path)
  graphdef, state, step, dataset, num_steps, train_config = pretraining(
      config, rs, encoder, images[distilled], labels[distilled], num_classes, mesh)
  pretrain = f"expand{r}_pretrain"
  state = stages.trained(run, pretrain, state, num_steps, lambda: stages.train(
      run, pretrain, state, step, dataset.batch, train_config, num_steps, mesh, config.seed + r),
                         {"examples": len(distilled)})
  base_pred = np.argmax(finetune.logits(config, graphdef, state, images[seeds], mesh), -1).astype(np.int32)
  tx = round_optimizer(rs)
  state = restart(state, tx, mesh)
  weights = class_weights(labels[distilled], num_classes)[labels[distilled]]
  step, batch_fn = confusion_training(
      config, r, graphdef, tx, {"image": images[distilled], "label": labels[distilled].astype(np.int32),
                                "weight": weights},
      {"seed_image": images[seeds], "seed_pred": base_pred}, num_classes, mesh, config.seed + r)
  state = stages.train(run, stage, state, step, batch_fn, confusion_train_config(rs), rs.iters, mesh,
                       config.seed + r)
  losses = sample_losses(finetune.logits(config, graphdef, state, images, mesh), labels)
  if jax.process_index() == 0:
    np.save(path, losses)
  run.finish(stage, {"distilled": len(distilled), "iters": rs.iters})
  return losses


def expand(run, config, encoder: Encoder, images, labels, seeds: np.ndarray, num_classes: int, mesh):
  """Seed expansion: the rounds of confusion training -> (trusted, suspected) sorted indices."""
  e, n = config.tcore.expand, len(labels)
  distilled = np.arange(n)
  for r, ratio in enumerate(e.ratios):
    losses = confusion_round(run, config, r, encoder, images, labels, distilled, seeds, num_classes, mesh)
    counts = np.bincount(labels, minlength=num_classes)
    distilled = distill(losses, labels, ratio, max(1, int(counts.min() * e.min_per_class_fraction)))
  return split_trusted(losses, labels, seeds, e.low_loss_fraction, e.per_class_cap, e.min_seed_fraction)
