"""Downstream fine-tuning of a pre-trained encoder into a classifier: FT-head and FT-all (tcore.md section 3).

The classifier is the encoder's backbone, its feature L2-normalised (as BadEncoder's downstream protocol feeds
its head), then BadEncoder's 3-layer head `Dense(512) -> ReLU -> Dropout(0.5) -> Dense(256) -> ReLU -> Dense(C)`.

- FT-head: the encoder is frozen (inference-mode BatchNorm, no gradient, no update, no weight decay); only the
  head trains. Unlike the MLP evaluation protocol, features are not cached: every step augments its images and
  runs the frozen encoder on them.
- FT-all: encoder and head train together, BatchNorm in training mode.

Both train on uint8 images with the usual supervised augmentation (random crop with zero padding, horizontal
flip), on device, with softmax cross-entropy. This module is the one downstream trainer: the threat harness,
T-Core and every baseline build, train and evaluate their classifiers with `finetune_training`,
`finetune_stage` and `evaluate_classifier`.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from jaxpurify import augment, data, evaluation, stages
from jaxpurify.data.device import DeviceDataset
from jaxpurify.encoders import Encoder
from jaxpurify.errors import moved
from jaxpurify.evaluation.metrics import backdoor_metrics
from jaxpurify.losses import l2_normalize
from jaxpurify.models.heads import MLPHead
from jaxpurify.train.state import (
  TrainState,
  apply_gradients,
  create_state,
  make_optimizer,
)

PROTOCOLS = ("ft_head", "ft_all")
__getattr__ = moved(__name__, {"crop_flip": "jaxpurify.augment.crop_flip"})


class Classifier(nnx.Module):
  """backbone + MLPHead on the L2-normalised feature: normalised images [B, H, W, 3] -> logits [B, C]."""

  def __init__(self, backbone: nnx.Module, num_classes: int, *, hidden=(512, 256), dropout: float = 0.5,
               rngs: nnx.Rngs):
    self.backbone = backbone
    self.head = MLPHead(backbone.feature_dim, num_classes, hidden=tuple(hidden), dropout=dropout,
                        dtype=backbone.dtype, rngs=rngs)

  def __call__(self, x: jax.Array, *, train_backbone: bool = False, dropout_key: jax.Array | None = None):
    feature, _ = self.backbone(x, train_backbone)
    return self.head(l2_normalize(feature), rngs=dropout_key)


def build_classifier(encoder: Encoder, num_classes: int, head_config, seed: int) -> Classifier:
  """`encoder`'s backbone (its arrays) with a fresh head drawn from `seed`; head_config: hidden, dropout."""
  backbone = nnx.merge(encoder.graphdef, encoder.params, encoder.batch_stats, copy=True)
  return Classifier(backbone, num_classes, hidden=head_config.hidden, dropout=head_config.dropout,
                    rngs=nnx.Rngs(seed))


def head_only(params) -> object:
  """A tree of bools over a Classifier's params: True for the head's (FT-head's trainable set)."""
  return jax.tree_util.tree_map_with_path(lambda path, _: getattr(path[0], "key", None) == "head", params)


def make_step(graphdef, tx, protocol: str, augment_config, mean, std, param_mask=None, objective=None):
  """-> step(state, batch, key) -> (state, metrics) of `protocol` (PROTOCOLS); pure, jit it with the state donated.

  batch: 'image' uint8 [B, H, W, 3] and 'label' int32 [B], sharded along `data`. augment_config: padding,
  flip_prob. param_mask: a tree like the params of multipliers applied after every update (pruned channels
  stay 0), or None. objective: a jnp scalar -> scalar function of the batch's mean cross-entropy that the step
  minimises (e.g. ABL's flooding or `jnp.negative`), or None for the mean cross-entropy itself.
  metrics: loss (the minimised value), ce (the mean cross-entropy, only with an objective), accuracy (on the
  augmented batch) and the health norms.
  """
  if protocol not in PROTOCOLS:
    raise ValueError(f"unknown fine-tuning protocol {protocol!r}; use one of {PROTOCOLS}")
  train_backbone = protocol == "ft_all"
  mean, std = jnp.asarray(mean), jnp.asarray(std)

  def step(state: TrainState, batch, key):
    key = jax.random.fold_in(key, state.step)
    aug_key, drop_key = jax.random.split(key)
    images = augment.crop_flip(aug_key, batch["image"], augment_config.padding, augment_config.flip_prob)
    x = augment.normalize(augment.to_float(images), mean, std)

    def loss_fn(params):
      if not train_backbone:  # the frozen encoder gets no gradient, so XLA skips its backward pass
        params = jax.tree.map(lambda p, keep: p if keep else jax.lax.stop_gradient(p), params, head_only(params))
      model = nnx.merge(graphdef, params, state.batch_stats, copy=True)
      logits = model(x, train_backbone=train_backbone, dropout_key=drop_key)
      ce = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"]).mean()
      loss = ce if objective is None else objective(ce)
      return loss, (ce, logits, nnx.state(model, nnx.BatchStat))

    (loss, (ce, logits, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    state, health = apply_gradients(state, tx, grads, batch_stats)
    if param_mask is not None:
      state = state.replace(params=jax.tree.map(lambda p, m: p * m, state.params, param_mask))
    accuracy = jnp.mean(jnp.argmax(logits, -1) == batch["label"])
    reported_ce = {} if objective is None else {"ce": ce}
    return state, {"loss": loss, **reported_ce, "accuracy": accuracy, **health}

  return step


def predict_fn(graphdef, state: TrainState, mean, std, transform=None):
  """A jitted uint8 [B, H, W, 3] -> logits [B, C] in inference mode; `transform` (uint8 -> uint8, e.g. a
  trigger) is applied first, on device."""
  mean, std = jnp.asarray(mean), jnp.asarray(std)

  @jax.jit
  def logits(params, batch_stats, images):
    if transform is not None:
      images = transform(images)
    model = nnx.merge(graphdef, params, batch_stats)
    return model(augment.normalize(augment.to_float(images), mean, std))

  return lambda images: logits(state.params, state.batch_stats, images)


def predict_logits(logits_fn, images: np.ndarray, batch_size: int, mesh) -> np.ndarray:
  """Logits float32 [N, C] of uint8 images [N, H, W, 3], batched over the mesh."""
  return evaluation.apply_batched(logits_fn, images, batch_size, mesh)


def logits(config, graphdef, state: TrainState, images: np.ndarray, mesh) -> np.ndarray:
  """A classifier's logits float32 [N, C] of uint8 images [N, H, W, 3], normalised with config.model's mean and
  std, batched by config.evaluate.batch_size."""
  fn = predict_fn(graphdef, state, config.model.mean, config.model.std)
  return predict_logits(fn, images, config.evaluate.batch_size, mesh)


def predict(logits_fn, images: np.ndarray, batch_size: int, mesh) -> np.ndarray:
  """Predicted labels int [N] of uint8 images [N, H, W, 3], batched over the mesh (argmax of the logits)."""
  return np.argmax(predict_logits(logits_fn, images, batch_size, mesh), axis=-1)


def classifier_mask(params, encoder_mask):
  """A Classifier's params (nnx.State) and multipliers over its encoder's params (a tree like Encoder.params, e.g.
  `defenses.tcore.channels.param_mask`) -> multipliers over the classifier's params: the encoder's on 'backbone',
  1.0 on the head."""
  multipliers = jax.tree.map(lambda _: jnp.ones((), jnp.float32), params)
  pure = nnx.to_pure_dict(multipliers)
  pure["backbone"] = nnx.to_pure_dict(encoder_mask)
  nnx.replace_by_pure_dict(multipliers, pure)
  return multipliers


def finetune_training(config, protocol: str, encoder: Encoder, images: np.ndarray, labels: np.ndarray,
                      num_classes: int, mesh, encoder_mask=None, block=None, objective=None):
  """-> (graphdef, state at step 0, jitted donating step, DeviceDataset, number of steps) of `protocol` on
  uint8 images [N, H, W, 3] with labels [N], starting from `encoder`. encoder_mask: multipliers over the encoder's
  params applied after every update (pruned channels stay 0), or None. block: {optim, train}, default
  config.finetune[protocol]. objective: what the step minimises, a function of the mean cross-entropy (make_step's),
  or None for the cross-entropy.
  """
  ft, block = config.finetune, block or config.finetune[protocol]
  dataset = DeviceDataset({"image": images, "label": labels.astype(np.int32)}, mesh, block.train.batch_size,
                          config.seed)
  num_steps = block.train.epochs * dataset.steps_per_epoch
  trainable = head_only if protocol == "ft_head" else None
  tx = make_optimizer(block.optim, num_steps, dataset.steps_per_epoch, trainable=trainable)
  graphdef, state = create_state(lambda: build_classifier(encoder, num_classes, ft.head, config.seed), tx, mesh)
  param_mask = classifier_mask(state.params, encoder_mask) if encoder_mask is not None else None
  step = jax.jit(make_step(graphdef, tx, protocol, ft.augment, config.model.mean, config.model.std, param_mask,
                           objective), donate_argnums=0)
  return graphdef, state, step, dataset, num_steps


def evaluate_classifier(config, graphdef, state, test: data.ImageSplit, trigger, target: int, mesh) -> dict:
  """{acc, asr, asr_all} of a fine-tuned classifier on `test` and its triggered copy."""
  batch, mean, std = config.evaluate.batch_size, config.model.mean, config.model.std
  clean = predict(predict_fn(graphdef, state, mean, std), test.images, batch, mesh)
  triggered = predict(predict_fn(graphdef, state, mean, std, trigger), test.images, batch, mesh)
  return backdoor_metrics(clean, test.labels, triggered, target)


def trained_classifier(run, stage: str, config, protocol: str, encoder: Encoder, images, labels, num_classes: int,
                       mesh) -> tuple:
  """-> (graphdef, final state) of `encoder` fine-tuned on (images, labels) with `protocol`: stage `stage`, trained
  now or restored from its last checkpoint."""
  graphdef, state, step, dataset, num_steps = finetune_training(config, protocol, encoder, images, labels,
                                                                num_classes, mesh)
  state = stages.trained(run, stage, state, num_steps, lambda: stages.train(
      run, stage, state, step, dataset.batch, config.finetune[protocol].train, num_steps, mesh, config.seed))
  return graphdef, state


def finetune_stage(run, stage: str, config, protocol: str, encoder: Encoder, images, labels,
                   test: data.ImageSplit, trigger, target: int, mesh) -> dict:
  """Fine-tunes `encoder` on (images, labels) with `protocol` (stage `stage`), then -> {acc, asr, asr_all} on
  `test` with `trigger` and `target` (kept in the stage's record)."""
  if "evaluation" in (record := run.done(stage) or {}):
    return record["evaluation"]
  graphdef, state = trained_classifier(run, stage, config, protocol, encoder, images, labels, test.num_classes, mesh)
  evaluation_ = evaluate_classifier(config, graphdef, state, test, trigger, target, mesh)
  run.finish(stage, {**run.done(stage), "evaluation": evaluation_})
  return evaluation_
