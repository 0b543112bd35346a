"""Heads: the projection head of self-supervised training and the MLP classifier head of BadEncoder's downstream
protocol (`training_downstream_classifier.py`), which fine-tuning puts on an encoder too. Both take the compute
`dtype` of their matmuls (float32 or bfloat16, as the backbone's; parameters and outputs are float32)."""

import jax
import jax.numpy as jnp
from flax import nnx

from jaxpurify.models.batch_norm import BatchNorm
from jaxpurify.models.resnet import BN_EPSILON, BN_MOMENTUM


class ProjectionHead(nnx.Module):
  """SimCLR head as BadEncoder uses it: Linear(D, hidden, no bias) → BN → ReLU → Linear(hidden, out)."""

  def __init__(self, in_dim: int, hidden_dim: int, out_dim: int, *, dtype=jnp.float32, rngs: nnx.Rngs):
    self.fc1 = nnx.Linear(in_dim, hidden_dim, use_bias=False, dtype=dtype, rngs=rngs)
    self.bn = BatchNorm(hidden_dim, momentum=BN_MOMENTUM, epsilon=BN_EPSILON, dtype=dtype, rngs=rngs)
    self.fc2 = nnx.Linear(hidden_dim, out_dim, dtype=dtype, rngs=rngs)

  def __call__(self, h, train: bool = False):
    """h: [B, D] -> [B, out_dim] float32 (not normalised)."""
    return self.fc2(jax.nn.relu(self.bn(self.fc1(h), use_running_average=not train))).astype(jnp.float32)


def _torch_linear(fan_in: int, fan_out: int, dtype, rngs: nnx.Rngs) -> nnx.Linear:
  """`torch.nn.Linear`'s default init: kernel and bias ~ U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
  bound = fan_in ** -0.5

  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -bound, bound)

  return nnx.Linear(fan_in, fan_out, kernel_init=init, bias_init=init, dtype=dtype, rngs=rngs)


class MLPHead(nnx.Module):
  """Dense(h1) -> ReLU -> Dropout -> Dense(h2) -> ReLU -> Dense(C): features [B, D] -> logits [B, C]."""

  def __init__(self, in_features: int, num_classes: int, *, hidden: tuple[int, int] = (512, 256),
               dropout: float = 0.5, dtype=jnp.float32, rngs: nnx.Rngs):
    self.fc1 = _torch_linear(in_features, hidden[0], dtype, rngs)
    self.drop = nnx.Dropout(dropout)
    self.fc2 = _torch_linear(hidden[0], hidden[1], dtype, rngs)
    self.fc3 = _torch_linear(hidden[1], num_classes, dtype, rngs)

  def __call__(self, x: jax.Array, *, rngs: jax.Array | None = None) -> jax.Array:
    """float32 logits; training mode (dropout) when given a dropout key `rngs`, eval mode otherwise."""
    x = self.drop(jax.nn.relu(self.fc1(x)), deterministic=rngs is None, rngs=rngs)
    return self.fc3(jax.nn.relu(self.fc2(x))).astype(jnp.float32)
