"""SimCLR's training step: two augmented views per image, NT-Xent over the global batch."""

import jax
import jax.numpy as jnp
from flax import nnx

from jaxpurify import augment
from jaxpurify.losses import nt_xent
from jaxpurify.models import build_ssl_model
from jaxpurify.train.state import TrainState, apply_gradients


def build_model(config):
  """The backbone with SimCLR's projection head."""
  return build_ssl_model(config.model, config.pretrain.head, config.seed)


def init_extra(config, state) -> dict:
  """SimCLR keeps no state besides the model."""
  del config, state
  return {}


def augment_kwargs(aug) -> dict:
  """config.augment -> keyword arguments of `augment.simclr_augment`."""
  return dict(crop_scale=tuple(aug.crop_scale), crop_ratio=tuple(aug.crop_ratio), flip_prob=aug.flip_prob,
              jitter=tuple(aug.jitter), jitter_prob=aug.jitter_prob, gray_prob=aug.gray_prob)


def make_views(key, images, aug, mean, std):
  """uint8 [B, H, W, 3] -> two normalised float32 views [B, H, W, 3]."""
  k1, k2 = jax.random.split(key)
  mean, std = jnp.asarray(mean), jnp.asarray(std)
  view = lambda k: augment.normalize(augment.simclr_augment(k, images, **augment_kwargs(aug)), mean, std)
  return view(k1), view(k2)


def make_step(graphdef, tx, config):
  """-> step(state, batch, key) -> (state, metrics); pure, to be jitted with the state donated.

  batch: {'image': uint8 [B, H, W, 3]} sharded along `data`. The two views pass through the model
  separately, as in the reference code (BatchNorm statistics per view).
  """
  temperature = config.pretrain.simclr.temperature

  def step(state: TrainState, batch, key):
    key = jax.random.fold_in(key, state.step)
    x1, x2 = make_views(key, batch["image"], config.pretrain.augment, config.model.mean, config.model.std)

    def loss_fn(params):
      model = nnx.merge(graphdef, params, state.batch_stats, copy=True)  # fresh Variables in this trace
      _, z1, _ = model(x1, train=True)
      _, z2, _ = model(x2, train=True)
      return nt_xent(z1, z2, temperature), nnx.state(model, nnx.BatchStat)

    (loss, batch_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    state, health = apply_gradients(state, tx, grads, batch_stats)
    return state, {"loss": loss, **health}

  return step
