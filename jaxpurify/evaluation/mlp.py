"""BadEncoder's downstream MLP classifier (`training_downstream_classifier.py`), trained on cached features."""

import functools

import jax
import numpy as np
import optax
from flax import nnx

from jaxpurify.evaluation.features import place
from jaxpurify.evaluation.loop import train_head
from jaxpurify.models.heads import MLPHead


@functools.partial(jax.jit, static_argnames=("graphdef", "epochs", "batch_size", "shuffle"))
def _fit(graphdef, params, rest, feats, labels, key, lr, *, epochs, batch_size, shuffle):
  return train_head(graphdef, params, rest, optax.adam(lr), feats, labels, key, epochs=epochs,
                    batch_size=batch_size, shuffle=shuffle)


def fit_mlp(head: MLPHead, feats, labels, key: jax.Array, *, epochs: int = 500, lr: float = 1e-4,
            batch_size: int = 64, shuffle: bool = False,
            mesh: jax.sharding.Mesh | None = None) -> tuple[MLPHead, np.ndarray]:
  """Adam on softmax cross-entropy, in one compiled loop: features [N, D], labels [N].

  Defaults are BadEncoder's: lr 1e-4, batch 64, 500 epochs, unshuffled, last partial batch kept; the head of
  the last epoch is returned with the mean train loss per epoch [epochs]. `head` itself is left untouched.
  """
  graphdef, params, rest = nnx.split(head, nnx.Param, ...)
  feats, labels = place((np.asarray(feats, np.float32), np.asarray(labels, np.int32)), mesh)
  params, losses = _fit(graphdef, params, rest, feats, labels, key, lr, epochs=epochs, batch_size=batch_size,
                        shuffle=shuffle)
  return nnx.merge(graphdef, params, rest), np.asarray(losses)


def train_mlp(train_feats, train_labels, num_classes: int, key: jax.Array, *, hidden: tuple[int, int] = (512, 256),
              dropout: float = 0.5, **fit_kwargs) -> tuple[MLPHead, np.ndarray]:
  """A fresh `MLPHead` (init from `split(key)[0]`) fitted by `fit_mlp` (keys from `split(key)[1]`)."""
  init_key, fit_key = jax.random.split(key)
  head = MLPHead(np.shape(train_feats)[1], num_classes, hidden=hidden, dropout=dropout,
                 rngs=nnx.Rngs(params=init_key))
  return fit_mlp(head, train_feats, train_labels, fit_key, **fit_kwargs)
