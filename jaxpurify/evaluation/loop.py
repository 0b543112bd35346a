"""One compiled training loop for a classifier head on cached features, and its predictions."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from jaxpurify.evaluation.features import place


def train_head(graphdef: nnx.GraphDef, params: nnx.State, rest: nnx.State, tx: optax.GradientTransformation,
               feats: jax.Array, labels: jax.Array, key: jax.Array, *, epochs: int, batch_size: int,
               shuffle: bool) -> tuple[nnx.State, jax.Array]:
  """Softmax cross-entropy training of `nnx.merge(graphdef, params, rest)`, to be called inside `jax.jit`.

  feats [N, D], labels [N]. Every epoch visits all rows in batches of `batch_size`, in order or in a
  permutation drawn from `fold_in(key, epoch)`; the last partial batch is padded and its padding rows get
  weight 0, so each batch loss is the mean over its real rows. Dropout keys are `fold_in(key, step)`.
  Returns (params, mean train loss per epoch [epochs]).
  """
  n = feats.shape[0]
  num_batches = -(-n // batch_size)
  weights = (jnp.arange(num_batches * batch_size) < n).reshape(num_batches, batch_size).astype(jnp.float32)
  order_key, dropout_key = jax.random.split(key)

  def loss_fn(params, x, y, w, key):
    logits = nnx.merge(graphdef, params, rest)(x, rngs=key)
    return jnp.sum(optax.softmax_cross_entropy_with_integer_labels(logits, y) * w) / jnp.sum(w)

  def batch_step(carry, batch):
    params, opt_state, step = carry
    idx, w = batch
    loss, grads = jax.value_and_grad(loss_fn)(params, feats[idx], labels[idx], w,
                                              jax.random.fold_in(dropout_key, step))
    updates, opt_state = tx.update(grads, opt_state, params)
    return (optax.apply_updates(params, updates), opt_state, step + 1), loss * jnp.sum(w)

  def epoch_step(carry, epoch):
    order = jax.random.permutation(jax.random.fold_in(order_key, epoch), n) if shuffle else jnp.arange(n)
    order = jnp.pad(order, (0, num_batches * batch_size - n)).reshape(num_batches, batch_size)
    carry, losses = jax.lax.scan(batch_step, carry, (order, weights))
    return carry, jnp.sum(losses) / n

  init = (params, tx.init(params), jnp.zeros((), jnp.int32))
  (params, _, _), losses = jax.lax.scan(epoch_step, init, jnp.arange(epochs))
  return params, losses


@functools.partial(jax.jit, static_argnums=0)
def _predict(graphdef, state, feats):
  return jnp.argmax(nnx.merge(graphdef, state)(feats), axis=-1).astype(jnp.int32)


def predict(head: nnx.Module, feats, mesh: jax.sharding.Mesh | None = None) -> np.ndarray:
  """Top-1 labels of a trained head in eval mode (no dropout): features [N, D] -> int32 [N]."""
  graphdef, state = nnx.split(head)
  return np.asarray(_predict(graphdef, place(state, mesh), place(np.asarray(feats, np.float32), mesh)))
