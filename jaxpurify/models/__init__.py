"""Encoders and heads. `build_encoder(name, width, rngs)` is the registry the configs name."""

from flax import nnx

from jaxpurify.errors import UserError
from jaxpurify.models.heads import ProjectionHead
from jaxpurify.models.resnet import ARCHS, ResNet


class SSLModel(nnx.Module):
  """Backbone plus projection head: `(x, train) -> (feature [B, D], projection [B, P], maps)`."""

  def __init__(self, backbone: ResNet, proj_hidden: int, proj_dim: int, *, rngs: nnx.Rngs):
    self.backbone = backbone
    self.head = ProjectionHead(backbone.feature_dim, proj_hidden or backbone.feature_dim, proj_dim, rngs=rngs)

  def __call__(self, x, train: bool = False):
    feature, maps = self.backbone(x, train)
    return feature, self.head(feature, train), maps


class BYOLModel(SSLModel):
  """BYOL's online network: SSLModel (backbone + projector `head`) plus a `predictor` [B, P] -> [B, P].

  `__call__` is SSLModel's; the predictor is applied separately, since BYOL's target network (an SSLModel
  with the same parameter paths) has none.
  """

  def __init__(self, backbone: ResNet, proj_hidden: int, proj_dim: int, predictor_hidden: int, *, rngs: nnx.Rngs):
    super().__init__(backbone, proj_hidden, proj_dim, rngs=rngs)
    self.predictor = ProjectionHead(proj_dim, predictor_hidden, proj_dim, rngs=rngs)


class LinearClassifier(nnx.Module):
  """Backbone + one linear layer: normalised images [B, H, W, 3] -> logits [B, num_classes] (the attacks'
  surrogate classifiers)."""

  def __init__(self, backbone: ResNet, num_classes: int, *, rngs: nnx.Rngs):
    self.backbone = backbone
    self.head = nnx.Linear(backbone.feature_dim, num_classes, rngs=rngs)

  def __call__(self, x, train: bool = False):
    feature, _ = self.backbone(x, train)
    return self.head(feature)


def build_linear_classifier(model_config, num_classes: int, rngs: nnx.Rngs) -> LinearClassifier:
  """model_config: name, width."""
  return LinearClassifier(build_encoder(model_config.name, model_config.width, rngs=rngs), num_classes, rngs=rngs)


def build_encoder(name: str, width: int, *, rngs: nnx.Rngs) -> ResNet:
  if name not in ARCHS:
    raise UserError(f"unknown model {name!r}; set config.model.name to one of {sorted(ARCHS)}")
  block, stages = ARCHS[name]
  return ResNet(block, stages, width, rngs=rngs)


def build_ssl_model(model_config, head, seed: int) -> SSLModel:
  """model_config: name, width. head: hidden (0 = feature dim), dim."""
  rngs = nnx.Rngs(seed)
  backbone = build_encoder(model_config.name, model_config.width, rngs=rngs)
  return SSLModel(backbone, head.hidden, head.dim, rngs=rngs)


def build_byol_model(model_config, head, predictor_hidden: int, seed: int) -> BYOLModel:
  """build_ssl_model's network (same initial backbone and head for the same seed) plus BYOL's predictor."""
  rngs = nnx.Rngs(seed)
  backbone = build_encoder(model_config.name, model_config.width, rngs=rngs)
  return BYOLModel(backbone, head.hidden, head.dim, predictor_hidden, rngs=rngs)


__all__ = ["ARCHS", "BYOLModel", "LinearClassifier", "build_linear_classifier", "ProjectionHead", "ResNet", "SSLModel", "build_byol_model", "build_encoder",
           "build_ssl_model"]
