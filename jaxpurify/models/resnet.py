"""ResNets in Flax NNX, no classifier: CIFAR's stem (3×3 stride-1 conv, no max-pool) by default, torchvision's
ImageNet stem (7×7 stride-2 conv, 3×3 stride-2 max-pool) with `stem="imagenet"`.

`ResNet(x, train)` maps normalised images [B, H, W, 3] to the pooled feature [B, D] and its taps: the output
of each stage by name, `layer1`..`layer4` (torchvision's names), NHWC [B, H_i, W_i, C_i] with H_i = H, H/2,
H/4, H/8 (ImageNet stem: H/4 .. H/32). `conv_bn_pairs()` names every convolution that feeds a BatchNorm, for the
channel-Lipschitz defenses.

Mixed precision: with `dtype=jnp.bfloat16` convolutions compute in bfloat16 on float32 parameters; BatchNorm takes
its statistics and normalises in float32 (Flax keeps its reductions in float32) and the running statistics stay
float32. The pooled feature and the taps are returned in float32, so every loss downstream reduces in float32.

On XLA:CPU every convolution's input goes through `held` (identity): without it XLA recomputes the BatchNorm, ReLU and
residual chain behind an activation inside the transposes of each kernel gradient, with strided reads, which took
more than half of a training step at width 8 (docs/benchmark.md#cpu-steps-stored-activations-and-huge-pages).
"""

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from jaxpurify.models.batch_norm import BatchNorm

# PyTorch's BatchNorm momentum 0.1 is Flax's 0.9 (the weight of the old running value).
BN_MOMENTUM = 0.9
BN_EPSILON = 1e-5
conv_init = nnx.initializers.variance_scaling(2.0, "fan_out", "normal")  # torchvision's kaiming_normal_


@jax.custom_jvp
def held(x):
  """x [B, H, W, C] unchanged, kept in memory as computed for the forward pass instead of recomputed by its
  consumers: on the CPU backend, x / (1 + 0 x), a division XLA cannot fold and its fusion does not duplicate (a
  divisor of another shape becomes a cheap multiplication by its reciprocal, which XLA duplicates); elsewhere x.
  Its derivative is the identity, so the backward pass does no work for it."""
  if jax.default_backend() != "cpu":
    return x
  return x / (1 + 0 * x)


@held.defjvp
def _held_jvp(primals, tangents):
  return held(*primals), tangents[0]


def _conv(cin, cout, kernel, stride, dtype, rngs):
  pad = kernel // 2
  return nnx.Conv(cin, cout, (kernel, kernel), strides=stride, padding=((pad, pad), (pad, pad)),
                  use_bias=False, kernel_init=conv_init, dtype=dtype, rngs=rngs)


def _bn(c, dtype, rngs):
  return BatchNorm(c, momentum=BN_MOMENTUM, epsilon=BN_EPSILON, dtype=dtype, rngs=rngs)


def _shortcut(cin, cout, stride, dtype, rngs):
  """1×1 conv + BN projection when the block changes shape, else None (identity)."""
  if stride == 1 and cin == cout:
    return None
  return nnx.List([_conv(cin, cout, 1, stride, dtype, rngs), _bn(cout, dtype, rngs)])


class BasicBlock(nnx.Module):
  expansion = 1

  def __init__(self, cin: int, width: int, stride: int, dtype, *, rngs: nnx.Rngs):
    self.conv1, self.bn1 = _conv(cin, width, 3, stride, dtype, rngs), _bn(width, dtype, rngs)
    self.conv2, self.bn2 = _conv(width, width, 3, 1, dtype, rngs), _bn(width, dtype, rngs)
    self.shortcut = _shortcut(cin, width, stride, dtype, rngs)

  def __call__(self, x, train: bool):
    ura, x = not train, held(x)
    y = held(jax.nn.relu(self.bn1(self.conv1(x), use_running_average=ura)))
    y = self.bn2(self.conv2(y), use_running_average=ura)
    if self.shortcut is not None:
      conv, bn = self.shortcut
      x = bn(conv(x), use_running_average=ura)
    return jax.nn.relu(x + y)


class Bottleneck(nnx.Module):
  expansion = 4

  def __init__(self, cin: int, width: int, stride: int, dtype, *, rngs: nnx.Rngs):
    cout = width * self.expansion
    self.conv1, self.bn1 = _conv(cin, width, 1, 1, dtype, rngs), _bn(width, dtype, rngs)
    self.conv2, self.bn2 = _conv(width, width, 3, stride, dtype, rngs), _bn(width, dtype, rngs)
    self.conv3, self.bn3 = _conv(width, cout, 1, 1, dtype, rngs), _bn(cout, dtype, rngs)
    self.shortcut = _shortcut(cin, cout, stride, dtype, rngs)

  def __call__(self, x, train: bool):
    ura, x = not train, held(x)
    y = held(jax.nn.relu(self.bn1(self.conv1(x), use_running_average=ura)))
    y = held(jax.nn.relu(self.bn2(self.conv2(y), use_running_average=ura)))
    y = self.bn3(self.conv3(y), use_running_average=ura)
    if self.shortcut is not None:
      conv, bn = self.shortcut
      x = bn(conv(x), use_running_average=ura)
    return jax.nn.relu(x + y)


RESNETS = {
    "resnet10": (BasicBlock, (1, 1, 1, 1)),  # one block per stage: the smallest, for tests and tiny runs
    "resnet18": (BasicBlock, (2, 2, 2, 2)),
    "resnet34": (BasicBlock, (3, 4, 6, 3)),
    "resnet50": (Bottleneck, (3, 4, 6, 3)),
}


class ResNet(nnx.Module):
  """CIFAR ResNet (`stem="imagenet"`: torchvision's); `width` is the first stage's channel count (64 in the
  papers); `dtype` the compute dtype of its convolutions (float32 or bfloat16; parameters are float32)."""

  def __init__(self, block, stage_sizes: Sequence[int], width: int = 64, *, stem: str = "cifar",
               dtype=jnp.float32, rngs: nnx.Rngs):
    if stem not in ("cifar", "imagenet"):
      raise ValueError(f"unknown stem {stem!r}; use 'cifar' or 'imagenet'")
    self.stem, self.dtype = stem, dtype
    kernel, stride = (3, 1) if stem == "cifar" else (7, 2)
    self.stem_conv, self.stem_bn = _conv(3, width, kernel, stride, dtype, rngs), _bn(width, dtype, rngs)
    cin, stages = width, []
    for i, n_blocks in enumerate(stage_sizes):
      blocks = []
      for j in range(n_blocks):
        stride = 2 if (i > 0 and j == 0) else 1
        blocks.append(block(cin, width * 2**i, stride, dtype, rngs=rngs))
        cin = width * 2**i * block.expansion
      stages.append(nnx.List(blocks))
    self.stages = nnx.List(stages)
    self.feature_dim = cin
    self.tap_names = tuple(f"layer{i + 1}" for i in range(len(stage_sizes)))

  def __call__(self, x, train: bool = False):
    """x: [B, H, W, 3] normalised -> (feature [B, D], {'layer<i>': stage output [B, H_i, W_i, C_i]}), float32."""
    x = jax.nn.relu(self.stem_bn(self.stem_conv(held(x.astype(self.dtype))), use_running_average=not train))
    if self.stem == "imagenet":
      x = nnx.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
    taps = {}
    for name, stage in zip(self.tap_names, self.stages):
      for block in stage:
        x = block(x, train)
      taps[name] = x.astype(jnp.float32)
    return jnp.mean(taps[self.tap_names[-1]], axis=(1, 2)), taps

  def conv_bn_pairs(self) -> list[tuple[str, tuple, tuple]]:
    """[(layer name, conv path, BatchNorm path)] in forward order, paths into the module's pure dicts: the stem
    ('stem'), then per block its convK -> bnK ('stage1.block0.conv1', ...) and its shortcut's conv -> BN."""
    pairs = [("stem", ("stem_conv",), ("stem_bn",))]
    for s, stage in enumerate(self.stages):
      for b, block in enumerate(stage):
        at, prefix = ("stages", s, b), f"stage{s + 1}.block{b}"
        convs = sorted((k for k in vars(block) if k.startswith("conv")), key=lambda k: int(k[4:]))
        pairs += [(f"{prefix}.{conv}", at + (conv,), at + (f"bn{conv[4:]}",)) for conv in convs]
        if block.shortcut is not None:
          pairs.append((f"{prefix}.shortcut", at + ("shortcut", 0), at + ("shortcut", 1)))
    return pairs
