"""A true linear probe (SSL-Backdoor / CorruptEncoder): standardized features -> one linear layer."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from jaxpurify.evaluation.features import place
from jaxpurify.evaluation.loop import train_head
from jaxpurify.losses import l2_normalize


class LinearProbe(nnx.Module):
  """L2-normalize, standardize per dimension with train statistics, Dense(C): [B, D] -> logits [B, C]."""

  def __init__(self, train_feats, num_classes: int, *, rngs: nnx.Rngs):
    x = l2_normalize(jnp.asarray(train_feats, jnp.float32))
    self.mean = nnx.BatchStat(jnp.mean(x, axis=0))
    self.std = nnx.BatchStat(jnp.maximum(jnp.std(x, axis=0), 1e-6))
    self.fc = nnx.Linear(x.shape[1], num_classes, kernel_init=nnx.initializers.normal(0.01), rngs=rngs)

  def __call__(self, x: jax.Array, *, rngs: jax.Array | None = None) -> jax.Array:
    """`rngs` is accepted for a uniform head interface and unused (no dropout)."""
    del rngs
    return self.fc((l2_normalize(x) - self.mean[...]) / self.std[...])


@functools.partial(jax.jit, static_argnames=("graphdef", "epochs", "batch_size", "shuffle", "milestones"))
def _fit(graphdef, params, rest, feats, labels, key, lr, momentum, decay, *, epochs, batch_size, shuffle,
         milestones):
  boundaries = jnp.asarray(milestones, jnp.int32) * -(-feats.shape[0] // batch_size)  # in steps

  def schedule(count):
    return lr * decay ** jnp.sum(count >= boundaries)

  return train_head(graphdef, params, rest, optax.sgd(schedule, momentum), feats, labels, key, epochs=epochs,
                    batch_size=batch_size, shuffle=shuffle)


def fit_linear(probe: LinearProbe, feats, labels, key: jax.Array, *, epochs: int = 40, lr: float = 0.01,
               momentum: float = 0.9, milestones: tuple[int, ...] = (15, 30), decay: float = 0.1,
               batch_size: int = 256, shuffle: bool = True,
               mesh: jax.sharding.Mesh | None = None) -> tuple[LinearProbe, np.ndarray]:
  """SGD with momentum (PyTorch semantics) on softmax cross-entropy, in one compiled loop: [N, D], [N].

  The learning rate is multiplied by `decay` at the start of each epoch in `milestones`; batches are
  reshuffled every epoch from `key` when `shuffle`. Returns the last-epoch probe and the mean train loss
  per epoch [epochs]; `probe` itself is left untouched.
  """
  graphdef, params, rest = nnx.split(probe, nnx.Param, ...)
  feats, labels = place((np.asarray(feats, np.float32), np.asarray(labels, np.int32)), mesh)
  params, losses = _fit(graphdef, params, rest, feats, labels, key, lr, momentum, decay, epochs=epochs,
                        batch_size=batch_size, shuffle=shuffle, milestones=tuple(milestones))
  return nnx.merge(graphdef, params, rest), np.asarray(losses)


def train_linear(train_feats, train_labels, num_classes: int, key: jax.Array,
                 **fit_kwargs) -> tuple[LinearProbe, np.ndarray]:
  """A fresh `LinearProbe` on `train_feats` (init from `split(key)[0]`) fitted by `fit_linear`."""
  init_key, fit_key = jax.random.split(key)
  probe = LinearProbe(train_feats, num_classes, rngs=nnx.Rngs(params=init_key))
  return fit_linear(probe, train_feats, train_labels, fit_key, **fit_kwargs)
