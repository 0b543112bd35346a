"""Vision Transformers for small images in Flax NNX (Dosovitskiy et al.; timm's `VisionTransformer` layout).

`ViT(x, train)` maps normalised images [B, H, W, 3] to the pooled feature [B, D] and its taps: the output of each
block by name, `block1`..`block<depth>`, its patch tokens laid back on the patch grid, NHWC [B, H/p, W/p, D] (the
class token is left out), so the map losses and the sifting that read a ResNet's stage maps read a ViT's blocks the
same way. Pre-norm blocks (x + MHSA(LN(x)), x + MLP(LN(x)), GELU, LayerNorm eps 1e-6), a class token and learned
position embeddings for `(image_size / patch)²` patches; the pooled feature is the final LayerNorm of the class token
(`pool="cls"`) or of the patch tokens' mean (`pool="mean"`).

`width` is the channel count of one attention head (64 in the reference ViTs), so that `config.model.width` means
what it means for the ResNets (64 at full size, 8 in the quick configs): ViT-Tiny is 3 heads (D = 3 * width = 192),
ViT-Small 6 (D = 384), both 12 blocks deep with MLPs 4 * D wide.

`mlp_units()` names every block's MLP hidden layer and the LayerNorm before it, for the channel-Lipschitz
defenses (`uclc_dense`). There is no BatchNorm: the model has no nnx.BatchStat state, and `train` changes nothing.

Mixed precision: with `dtype=jnp.bfloat16` the patch embedding and every matmul compute in bfloat16 on float32
parameters; the residual stream, LayerNorms, attention softmax, taps and pooled feature stay float32.
"""

import jax
import jax.numpy as jnp
from flax import nnx

LN_EPSILON = 1e-6
POOLS = ("cls", "mean")
trunc_normal = nnx.initializers.truncated_normal(0.02)  # timm's trunc_normal_(std=.02)
dense_init = nnx.initializers.xavier_uniform()  # timm's init for every Linear of a ViT


def _dense(cin: int, cout: int, dtype, rngs: nnx.Rngs) -> nnx.Linear:
  return nnx.Linear(cin, cout, kernel_init=dense_init, bias_init=nnx.initializers.zeros, dtype=dtype, rngs=rngs)


class Attention(nnx.Module):
  """Multi-head self-attention: tokens [B, N, D] float32 -> [B, N, D] float32; softmax in float32."""

  def __init__(self, dim: int, heads: int, dtype, *, rngs: nnx.Rngs):
    self.heads, self.dtype = heads, dtype
    self.qkv = _dense(dim, 3 * dim, dtype, rngs)
    self.proj = _dense(dim, dim, dtype, rngs)

  def weights(self, x):
    """The attention weights [B, heads, N, N] (float32, rows sum to 1) and values [B, heads, N, D / heads]."""
    b, n, d = x.shape
    q, k, v = jnp.moveaxis(self.qkv(x.astype(self.dtype)).reshape(b, n, 3, self.heads, d // self.heads), 2, 0)
    logits = jnp.einsum("bqhc,bkhc->bhqk", q, k).astype(jnp.float32) * (d // self.heads) ** -0.5
    return jax.nn.softmax(logits, axis=-1), jnp.moveaxis(v, 2, 1)

  def __call__(self, x):
    b, n, d = x.shape
    attention, v = self.weights(x)
    out = jnp.einsum("bhqk,bhkc->bqhc", attention.astype(self.dtype), v).reshape(b, n, d)
    return self.proj(out).astype(jnp.float32)


class Block(nnx.Module):
  """Pre-norm transformer block: x + MHSA(LN1(x)), then + MLP(LN2(x)) with fc1 (D -> mlp_ratio * D), GELU, fc2."""

  def __init__(self, dim: int, heads: int, mlp_ratio: int, dtype, *, rngs: nnx.Rngs):
    self.dtype = dtype
    self.norm1 = nnx.LayerNorm(dim, epsilon=LN_EPSILON, rngs=rngs)
    self.attn = Attention(dim, heads, dtype, rngs=rngs)
    self.norm2 = nnx.LayerNorm(dim, epsilon=LN_EPSILON, rngs=rngs)
    self.fc1 = _dense(dim, mlp_ratio * dim, dtype, rngs)
    self.fc2 = _dense(mlp_ratio * dim, dim, dtype, rngs)

  def __call__(self, x):
    """x: [B, N, D] float32 -> [B, N, D] float32."""
    x = x + self.attn(self.norm1(x))
    hidden = jax.nn.gelu(self.fc1(self.norm2(x).astype(self.dtype)), approximate=False)
    return x + self.fc2(hidden).astype(jnp.float32)


VITS = {  # name: (depth, heads)
    "vit_tiny": (12, 3),
    "vit_small": (12, 6),
}


class ViT(nnx.Module):
  """A ViT of `depth` blocks and `heads` heads of `width` channels each (D = heads * width) on `image_size`²
  images cut into `patch`² patches; `dtype` the compute dtype of its matmuls (parameters are float32)."""

  def __init__(self, depth: int, heads: int, width: int = 64, *, patch: int = 4, image_size: int = 32,
               pool: str = "cls", mlp_ratio: int = 4, dtype=jnp.float32, rngs: nnx.Rngs):
    if pool not in POOLS:
      raise ValueError(f"unknown ViT pooling {pool!r}; use one of {POOLS}")
    if image_size % patch:
      raise ValueError(f"image size {image_size} is not a multiple of the patch size {patch}")
    dim = heads * width
    self.patch, self.grid, self.pool, self.dtype = patch, image_size // patch, pool, dtype
    self.patch_embed = nnx.Conv(3, dim, (patch, patch), strides=patch, padding="VALID", kernel_init=dense_init,
                                dtype=dtype, rngs=rngs)
    self.cls_token = nnx.Param(trunc_normal(rngs.params(), (1, 1, dim)))
    self.pos_embed = nnx.Param(trunc_normal(rngs.params(), (1, self.grid ** 2 + 1, dim)))
    self.blocks = nnx.List([Block(dim, heads, mlp_ratio, dtype, rngs=rngs) for _ in range(depth)])
    self.norm = nnx.LayerNorm(dim, epsilon=LN_EPSILON, rngs=rngs)
    self.feature_dim = dim
    self.tap_names = tuple(f"block{i + 1}" for i in range(depth))

  def __call__(self, x, train: bool = False):
    """x: [B, H, W, 3] normalised -> (feature [B, D], {'block<i>': patch tokens [B, H/p, W/p, D]}), float32."""
    b, h, w, _ = x.shape
    if (h // self.patch, w // self.patch) != (self.grid, self.grid) or h % self.patch or w % self.patch:
      raise ValueError(f"this ViT takes {self.grid * self.patch}x{self.grid * self.patch} images (patch "
                       f"{self.patch}), got {h}x{w}; set config.model.image_size")
    tokens = self.patch_embed(x.astype(self.dtype)).astype(jnp.float32).reshape(b, self.grid ** 2, -1)
    cls = jnp.zeros_like(tokens[:, :1]) + self.cls_token[...]  # broadcast over the batch, keeping its sharding
    x = jnp.concatenate([cls, tokens], axis=1) + self.pos_embed[...]
    taps = {}
    for name, block in zip(self.tap_names, self.blocks):
      x = block(x)
      taps[name] = x[:, 1:].reshape(b, self.grid, self.grid, -1)
    pooled = x[:, 0] if self.pool == "cls" else jnp.mean(x[:, 1:], axis=1)
    return self.norm(pooled), taps

  def mlp_units(self) -> list[tuple[str, tuple, tuple]]:
    """[(layer name, fc1 path, LayerNorm path)] in forward order: each block's MLP hidden layer ('block1.mlp', ...),
    whose output features are the prunable units, and the LayerNorm whose scale multiplies its inputs."""
    return [(f"block{i + 1}.mlp", ("blocks", i, "fc1"), ("blocks", i, "norm2")) for i in range(len(self.blocks))]
