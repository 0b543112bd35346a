"""Encoders and the models built around them.

Every encoder (backbone) maps normalised images [B, H, W, 3] to `(pooled [B, D], taps)`: `taps` holds
intermediate features by name, in forward order (its `tap_names`). Code outside `models/` reads taps by name and
asks the encoder for anything architecture-specific (`conv_bn_pairs` for the channel defenses).
`ENCODERS[name](width, rngs)` is the registry the configs name (config.model.name, config.model.width):
CIFAR ResNets `resnet10`..`resnet50`, torchvision's ImageNet-stem `resnet18_imagenet`..`resnet50_imagenet`, and the
ViTs `vit_tiny`, `vit_small` (width: channels per attention head; config.model.vit: patch, image_size, pool).
config.model.dtype (DTYPES) sets the compute dtype of the convolutions and matmuls (`compute_dtype`); the heads built
around a backbone compute in the backbone's `dtype`.
"""

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from jaxpurify.errors import UserError, moved
from jaxpurify.models.heads import MLPHead, ProjectionHead
from jaxpurify.models.resnet import RESNETS, ResNet
from jaxpurify.models.vit import POOLS, VITS, ViT

ENCODERS = {name: functools.partial(ResNet, block, stage_sizes) for name, (block, stage_sizes) in RESNETS.items()}
# torchvision's ResNets, ImageNet stem (for 224-pixel inputs and imported torchvision weights)
ENCODERS.update({f"{name}_imagenet": functools.partial(ResNet, *RESNETS[name], stem="imagenet")
                 for name in ("resnet18", "resnet34", "resnet50")})
ENCODERS.update({name: functools.partial(ViT, depth, heads) for name, (depth, heads) in VITS.items()})
__getattr__ = moved(__name__, {"ARCHS": "jaxpurify.models.ENCODERS (name -> builder)"})
DTYPES = ("auto", "float32", "bfloat16")


def compute_dtype(setting: str):
  """config.model.dtype -> the dtype convolutions and matmuls compute in: 'auto' is bfloat16 on GPU and TPU and
  float32 on CPU (whose XLA kernels gain nothing from bfloat16)."""
  if setting not in DTYPES:
    raise UserError(f"unknown model dtype {setting!r}; set config.model.dtype to one of {DTYPES}")
  if setting == "auto":
    setting = "float32" if jax.default_backend() == "cpu" else "bfloat16"
  return jnp.dtype(setting)


class SSLModel(nnx.Module):
  """Backbone plus projection head: `(x, train) -> (feature [B, D], projection [B, P], taps)`."""

  def __init__(self, backbone: nnx.Module, proj_hidden: int, proj_dim: int, *, rngs: nnx.Rngs):
    self.backbone = backbone
    self.head = ProjectionHead(backbone.feature_dim, proj_hidden or backbone.feature_dim, proj_dim,
                               dtype=backbone.dtype, rngs=rngs)

  def __call__(self, x, train: bool = False):
    feature, taps = self.backbone(x, train)
    return feature, self.head(feature, train), taps


class BYOLModel(SSLModel):
  """BYOL's online network: SSLModel (backbone + projector `head`) plus a `predictor` [B, P] -> [B, P].

  `__call__` is SSLModel's; the predictor is applied separately, since BYOL's target network (an SSLModel
  with the same parameter paths) has none.
  """

  def __init__(self, backbone: nnx.Module, proj_hidden: int, proj_dim: int, predictor_hidden: int, *,
               rngs: nnx.Rngs):
    super().__init__(backbone, proj_hidden, proj_dim, rngs=rngs)
    self.predictor = ProjectionHead(proj_dim, predictor_hidden, proj_dim, dtype=backbone.dtype, rngs=rngs)


class LinearClassifier(nnx.Module):
  """Backbone + one linear layer: normalised images [B, H, W, 3] -> logits [B, num_classes] (the attacks'
  surrogate classifiers)."""

  def __init__(self, backbone: nnx.Module, num_classes: int, *, rngs: nnx.Rngs):
    self.backbone = backbone
    self.head = nnx.Linear(backbone.feature_dim, num_classes, dtype=backbone.dtype, rngs=rngs)

  def __call__(self, x, train: bool = False):
    feature, _ = self.backbone(x, train)
    return self.head(feature).astype(jnp.float32)


def check_name(name: str, field: str = "config.model.name", what: str = "model") -> None:
  """UserError naming the known encoders unless `name` is one."""
  if name not in ENCODERS:
    raise UserError(f"unknown {what} {name!r}; set {field} to one of {sorted(ENCODERS)}")


def is_vit(name: str) -> bool:
  return name in VITS


def vit_options(model_config) -> dict:
  """config.model.vit (patch, image_size, pool) as ViT keyword arguments: {} for a ResNet; a model block without
  a `vit` block gets the defaults (patch 4 on 32x32 images, class-token pooling)."""
  if not is_vit(model_config.name):
    return {}
  options = dict(patch=4, image_size=32, pool="cls")
  options.update(model_config.get("vit") or {})
  if options["pool"] not in POOLS:
    raise UserError(f"unknown ViT pooling {options['pool']!r}; set config.model.vit.pool to one of {POOLS}")
  if options["patch"] < 1 or options["image_size"] % options["patch"]:
    raise UserError(f"config.model.vit.image_size {options['image_size']} is not a multiple of config.model.vit.patch "
                    f"{options['patch']}; choose a patch size that divides the image size")
  return options


def build_encoder(name: str, width: int, *, dtype=jnp.float32, rngs: nnx.Rngs, **vit) -> nnx.Module:
  """The encoder `name` of `width`, computing in `dtype`; `vit`: a ViT's patch, image_size and pool."""
  check_name(name)
  return ENCODERS[name](width, dtype=dtype, rngs=rngs, **vit)


def configured_encoder(model_config, rngs: nnx.Rngs) -> nnx.Module:
  """The encoder model_config names (name, width, dtype, and a ViT's `vit` block)."""
  return build_encoder(model_config.name, model_config.width, dtype=compute_dtype(model_config.dtype), rngs=rngs,
                       **vit_options(model_config))


def describe(model_config, image_size: int) -> tuple[int, dict[str, tuple[int, ...]]]:
  """(feature dim D, {tap name: shape of one image's tap}) of config's encoder on image_size² inputs; traces
  shapes only, allocates no weights."""
  check_name(model_config.name)
  model = nnx.eval_shape(lambda: build_encoder(model_config.name, model_config.width, rngs=nnx.Rngs(0),
                                               **vit_options(model_config)))
  graphdef, state = nnx.split(model)
  feature, taps = jax.eval_shape(lambda s, x: nnx.merge(graphdef, s)(x), state,
                                 jax.ShapeDtypeStruct((1, image_size, image_size, 3), jnp.float32))
  return feature.shape[-1], {name: taps[name].shape[1:] for name in model.tap_names}


def build_linear_classifier(model_config, num_classes: int, rngs: nnx.Rngs) -> LinearClassifier:
  """model_config: name, width, dtype."""
  return LinearClassifier(configured_encoder(model_config, rngs), num_classes, rngs=rngs)


def build_ssl_model(model_config, head, seed: int) -> SSLModel:
  """model_config: name, width, dtype. head: hidden (0 = feature dim), dim."""
  rngs = nnx.Rngs(seed)
  backbone = configured_encoder(model_config, rngs)
  return SSLModel(backbone, head.hidden, head.dim, rngs=rngs)


def build_byol_model(model_config, head, predictor_hidden: int, seed: int) -> BYOLModel:
  """build_ssl_model's network (same initial backbone and head for the same seed) plus BYOL's predictor."""
  rngs = nnx.Rngs(seed)
  backbone = configured_encoder(model_config, rngs)
  return BYOLModel(backbone, head.hidden, head.dim, predictor_hidden, rngs=rngs)


__all__ = ["BYOLModel", "DTYPES", "ENCODERS", "LinearClassifier", "MLPHead", "ProjectionHead", "ResNet", "SSLModel",
           "build_byol_model", "build_encoder", "build_linear_classifier", "build_ssl_model", "check_name",
           "compute_dtype", "configured_encoder", "describe", "is_vit", "ViT", "vit_options"]
