"""MoCo v2's training step: a momentum key encoder, a queue of negative keys, InfoNCE (He et al.; Chen et al.).

The query encoder is the trained model (backbone + MLP projection head). `TrainState.extra` holds the key
encoder (`target_params`, `target_batch_stats`), the `queue` [K, dim] of L2-normalised keys and `queue_ptr`
(int32), where the next batch of keys goes.

Shuffle-BN is not implemented: under `jax.jit` over a `data`-sharded batch BatchNorm already uses the
statistics of the global batch (sync BN), and permuting the batch does not change them, so MoCo's shuffle
(which only stops per-device statistics from leaking the positive) would be a no-op.
"""

import jax
import jax.numpy as jnp
from flax import nnx

from jaxpurify.errors import UserError
from jaxpurify.losses import all_rows, l2_normalize, moco_infonce
from jaxpurify.models import build_ssl_model
from jaxpurify.ssl.simclr import make_views
from jaxpurify.train.state import TrainState, apply_gradients


def build_model(config):
  """The query encoder: backbone plus MoCo v2's MLP projection head."""
  return build_ssl_model(config.model, config.pretrain.head, config.seed)


def init_extra(config, state) -> dict:
  """The key encoder as a copy of the query encoder, and a queue of random unit vectors.

  The queue's key is split from `config.seed`'s, apart from the model's init and the step's fold_in stream.
  """
  _, queue_key = jax.random.split(jax.random.key(config.seed))
  queue = jax.random.normal(queue_key, (config.pretrain.moco.queue_size, config.pretrain.head.dim), jnp.float32)
  copy = lambda tree: jax.tree.map(jnp.copy, tree)  # own buffers, so the donated state holds no alias
  return {"target_params": copy(state.params), "target_batch_stats": copy(state.batch_stats),
          "queue": l2_normalize(queue), "queue_ptr": jnp.zeros((), jnp.int32)}


def momentum_update(target, online, momentum: float):
  """θ_target ← momentum · θ_target + (1 − momentum) · θ_online, leaf by leaf over matching pytrees."""
  return jax.tree.map(lambda t, o: momentum * t + (1.0 - momentum) * o, target, online)


def enqueue(queue: jax.Array, ptr: jax.Array, keys: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Writes keys [B, D] (rows may be sharded; gathered here) into queue [K, D] at rows ptr..ptr+B-1.

  K must be a multiple of B, so a batch never straddles the end. Returns (queue, (ptr + B) mod K).
  """
  size, batch = queue.shape[0], keys.shape[0]
  if size % batch:
    raise ValueError(f"queue size {size} is not a multiple of the batch size {batch}")
  keys = all_rows(keys).astype(queue.dtype)
  return jax.lax.dynamic_update_slice(queue, keys, (ptr, 0)), (ptr + batch) % size


def make_step(graphdef, tx, config):
  """-> step(state, batch, key) -> (state, metrics); pure, to be jitted with the state donated.

  batch: {'image': uint8 [B, H, W, 3]} sharded along `data`. The first view gives the queries, the second
  the keys. Raises UserError unless config.pretrain.moco.queue_size is a multiple of the batch size.
  """
  moco, batch_size = config.pretrain.moco, config.pretrain.train.batch_size
  if moco.queue_size <= 0 or moco.queue_size % batch_size:
    raise UserError(f"config.pretrain.moco.queue_size ({moco.queue_size}) must be a positive multiple of "
                    f"config.pretrain.train.batch_size ({batch_size})")

  def step(state: TrainState, batch, key):
    key = jax.random.fold_in(key, state.step)
    x1, x2 = make_views(key, batch["image"], config.pretrain.augment, config.model.mean, config.model.std)
    extra = state.extra
    # As MoCo: update the key encoder from the query encoder before this step's update, then encode the keys.
    target_params = momentum_update(extra["target_params"], state.params, moco.momentum)
    key_encoder = nnx.merge(graphdef, target_params, extra["target_batch_stats"], copy=True)
    _, k, _ = key_encoder(x2, train=True)
    k = jax.lax.stop_gradient(l2_normalize(k.astype(jnp.float32)))

    def loss_fn(params):
      model = nnx.merge(graphdef, params, state.batch_stats, copy=True)  # fresh Variables in this trace
      _, q, _ = model(x1, train=True)
      return moco_infonce(q, k, extra["queue"], moco.temperature), nnx.state(model, nnx.BatchStat)

    (loss, batch_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    queue, queue_ptr = enqueue(extra["queue"], extra["queue_ptr"], k)
    extra = {"target_params": target_params, "target_batch_stats": nnx.state(key_encoder, nnx.BatchStat),
             "queue": queue, "queue_ptr": queue_ptr}
    state, health = apply_gradients(state, tx, grads, batch_stats, extra)
    return state, {"loss": loss, **health}

  return step
