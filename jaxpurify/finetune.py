"""Downstream fine-tuning of a pre-trained encoder into a classifier: FT-head and FT-all (tcore.md section 3).

The classifier is the encoder's backbone, its feature L2-normalised (as BadEncoder's downstream protocol feeds
its head), then BadEncoder's 3-layer head `Dense(512) -> ReLU -> Dropout(0.5) -> Dense(256) -> ReLU -> Dense(C)`.

- FT-head: the encoder is frozen (inference-mode BatchNorm, no gradient, no update, no weight decay); only the
  head trains. Unlike the MLP evaluation protocol, features are not cached: every step augments its images and
  runs the frozen encoder on them.
- FT-all: encoder and head train together, BatchNorm in training mode.

Both train on uint8 images with the usual supervised augmentation (random crop with zero padding, horizontal
flip), on device, with softmax cross-entropy.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from jaxpurify import augment, evaluation
from jaxpurify.encoders import Encoder
from jaxpurify.evaluation.mlp import MLPHead
from jaxpurify.losses import l2_normalize
from jaxpurify.train.state import TrainState, apply_gradients

PROTOCOLS = ("ft_head", "ft_all")


class Classifier(nnx.Module):
  """backbone + MLPHead on the L2-normalised feature: normalised images [B, H, W, 3] -> logits [B, C]."""

  def __init__(self, backbone: nnx.Module, num_classes: int, *, hidden=(512, 256), dropout: float = 0.5,
               rngs: nnx.Rngs):
    self.backbone = backbone
    self.head = MLPHead(backbone.feature_dim, num_classes, hidden=tuple(hidden), dropout=dropout, rngs=rngs)

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


def crop_flip(key: jax.Array, images: jax.Array, padding: int, flip_prob: float) -> jax.Array:
  """RandomCrop(H, padding, zero fill) then RandomHorizontalFlip(flip_prob): uint8 [B, H, W, C] -> same.

  Sample b draws its offsets and flip from `jax.random.split(key, B)[b]`.
  """
  b, h, w, c = images.shape
  padded = jnp.pad(images, ((0, 0), (padding, padding), (padding, padding), (0, 0)))

  def one(k, img):
    k_top, k_left, k_flip = jax.random.split(k, 3)
    top = jax.random.randint(k_top, (), 0, 2 * padding + 1)
    left = jax.random.randint(k_left, (), 0, 2 * padding + 1)
    img = jax.lax.dynamic_slice(img, (top, left, 0), (h, w, c))
    return jnp.where(jax.random.uniform(k_flip) < flip_prob, augment.hflip(img), img)

  return jax.vmap(one)(augment.batch_keys(key, padded), padded)


def make_step(graphdef, tx, protocol: str, augment_config, mean, std, param_mask=None):
  """-> step(state, batch, key) -> (state, metrics) of `protocol` (PROTOCOLS); pure, jit it with the state donated.

  batch: 'image' uint8 [B, H, W, 3] and 'label' int32 [B], sharded along `data`. augment_config: padding,
  flip_prob. param_mask: a tree like the params of multipliers applied after every update (pruned channels
  stay 0), or None. metrics: loss (mean cross-entropy), accuracy (on the augmented batch) and the health norms.
  """
  if protocol not in PROTOCOLS:
    raise ValueError(f"unknown fine-tuning protocol {protocol!r}; use one of {PROTOCOLS}")
  train_backbone = protocol == "ft_all"
  mean, std = jnp.asarray(mean), jnp.asarray(std)

  def step(state: TrainState, batch, key):
    key = jax.random.fold_in(key, state.step)
    aug_key, drop_key = jax.random.split(key)
    images = crop_flip(aug_key, batch["image"], augment_config.padding, augment_config.flip_prob)
    x = augment.normalize(augment.to_float(images), mean, std)

    def loss_fn(params):
      if not train_backbone:  # the frozen encoder gets no gradient, so XLA skips its backward pass
        params = jax.tree.map(lambda p, keep: p if keep else jax.lax.stop_gradient(p), params, head_only(params))
      model = nnx.merge(graphdef, params, state.batch_stats, copy=True)
      logits = model(x, train_backbone=train_backbone, dropout_key=drop_key)
      loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"]).mean()
      return loss, (logits, nnx.state(model, nnx.BatchStat))

    (loss, (logits, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    state, health = apply_gradients(state, tx, grads, batch_stats)
    if param_mask is not None:
      state = state.replace(params=jax.tree.map(lambda p, m: p * m, state.params, param_mask))
    accuracy = jnp.mean(jnp.argmax(logits, -1) == batch["label"])
    return state, {"loss": loss, "accuracy": accuracy, **health}

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


def predict(logits_fn, images: np.ndarray, batch_size: int, mesh) -> np.ndarray:
  """Predicted labels int [N] of uint8 images [N, H, W, 3], batched over the mesh (argmax of the logits)."""
  return np.argmax(predict_logits(logits_fn, images, batch_size, mesh), axis=-1)
