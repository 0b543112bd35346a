"""What a baseline defense reads: the victim's poisoned set and encoder, the defender's reserved clean set, and
the undefended classifier trained on the poisoned set (its features and logits).

The features are the classifier's encoder output, L2-normalised as its head reads it: the layer before the
linear classifier in the papers' ResNets, and the representation transfer learning hands to the downstream head.
(The last hidden layer of jaxpurify's 3-layer head separates poisons less: on threat 2 BadNets quick, seed 0,
SCAn found 0% of them there and 89% here; docs/baselines.md.)

The evaluator's knowledge (poison positions, target, poison rate) is not in here: a method cannot read it.
"""

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxpurify import augment, evaluation, finetune
from jaxpurify.encoders import Encoder
from jaxpurify.losses import l2_normalize


class Inputs(NamedTuple):
  """A baseline's inputs for one fine-tuning protocol.

  images uint8 [N, H, W, 3], labels int [N]: the victim's (possibly poisoned) training set.
  reserve_images uint8 [M, H, W, 3], reserve_labels int [M]: the defender's clean labelled set (M = 0 without one).
  model: (graphdef, TrainState) of the undefended classifier, `protocol` on the poisoned set.
  features float32 [N, D] / reserve_features [M, D]: its encoder features (`encoder_features`).
  logits float32 [N, C] / reserve_logits [M, C]: its logits.
  """
  config: Any
  mesh: Any
  protocol: str
  encoder: Encoder
  images: np.ndarray
  labels: np.ndarray
  num_classes: int
  reserve_images: np.ndarray
  reserve_labels: np.ndarray
  model: tuple
  features: np.ndarray
  reserve_features: np.ndarray
  logits: np.ndarray
  reserve_logits: np.ndarray

  def model_logits(self, images: np.ndarray) -> np.ndarray:
    """The undefended classifier's logits float32 [K, C] of uint8 images [K, H, W, 3]."""
    graphdef, state = self.model
    return finetune.logits(self.config, graphdef, state, images, self.mesh)


@functools.lru_cache(maxsize=8)
def _encoder_forward(graphdef, mean: tuple, std: tuple):
  """A jitted (params, batch_stats, uint8 [B, H, W, 3]) -> the classifier's L2-normalised encoder feature [B, D]."""

  @jax.jit
  def forward(params, batch_stats, images):
    model = nnx.merge(graphdef, params, batch_stats)
    x = augment.normalize(augment.to_float(images), jnp.asarray(mean), jnp.asarray(std))
    feature, _ = model.backbone(x, False)
    return l2_normalize(feature)

  return forward


def encoder_features(config, graphdef, state, images: np.ndarray, mesh) -> np.ndarray:
  """A fine-tuned classifier's encoder features float32 [N, D] of uint8 images [N, H, W, 3] (inference mode,
  L2-normalised: what its head reads), batched by config.evaluate.batch_size."""
  forward = _encoder_forward(graphdef, tuple(config.model.mean), tuple(config.model.std))
  return evaluation.apply_batched(lambda x: forward(state.params, state.batch_stats, x), images,
                                  config.evaluate.batch_size, mesh)


def gather(config, mesh, protocol: str, encoder: Encoder, images, labels, num_classes: int, reserve_images,
           reserve_labels, model: tuple) -> Inputs:
  """The Inputs of `protocol`: the undefended `model`'s features and logits of the victim set and the reserve."""
  graphdef, state = model
  features = lambda x: encoder_features(config, graphdef, state, x, mesh) if len(x) else np.zeros((0, 1), np.float32)
  logits = lambda x: finetune.logits(config, graphdef, state, x, mesh) if len(x) else np.zeros(
      (0, num_classes), np.float32)
  return Inputs(config, mesh, protocol, encoder, images, np.asarray(labels), num_classes, reserve_images,
                np.asarray(reserve_labels), model, features(images), features(reserve_images), logits(images),
                logits(reserve_images))
