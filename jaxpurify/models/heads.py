"""Projection heads for self-supervised training."""

import jax
from flax import nnx

from jaxpurify.models.resnet import BN_EPSILON, BN_MOMENTUM


class ProjectionHead(nnx.Module):
  """SimCLR head as BadEncoder uses it: Linear(D, hidden, no bias) → BN → ReLU → Linear(hidden, out)."""

  def __init__(self, in_dim: int, hidden_dim: int, out_dim: int, *, rngs: nnx.Rngs):
    self.fc1 = nnx.Linear(in_dim, hidden_dim, use_bias=False, rngs=rngs)
    self.bn = nnx.BatchNorm(hidden_dim, momentum=BN_MOMENTUM, epsilon=BN_EPSILON, rngs=rngs)
    self.fc2 = nnx.Linear(hidden_dim, out_dim, rngs=rngs)

  def __call__(self, h, train: bool = False):
    """h: [B, D] -> [B, out_dim] (not normalised)."""
    return self.fc2(jax.nn.relu(self.bn(self.fc1(h), use_running_average=not train)))
