"""PyTorch twins of jaxpurify's models (`jaxpurify/models`), NCHW: the ResNets of any first-stage width returning
the pooled feature and the stage outputs, SimCLR's projection head and BadEncoder's MLP classifier head. The same
layers and parameter counts as jaxpurify's; torchvision's initialisation."""

from torch import nn
from torch.nn import functional as F


def _conv(cin: int, cout: int, kernel: int, stride: int) -> nn.Conv2d:
  return nn.Conv2d(cin, cout, kernel, stride, kernel // 2, bias=False)


def _shortcut(cin: int, cout: int, stride: int) -> nn.Module:
  """1×1 conv + BN projection when the block changes shape, else the identity."""
  if stride == 1 and cin == cout:
    return nn.Identity()
  return nn.Sequential(_conv(cin, cout, 1, stride), nn.BatchNorm2d(cout))


class BasicBlock(nn.Module):
  expansion = 1

  def __init__(self, cin: int, width: int, stride: int):
    super().__init__()
    self.conv1, self.bn1 = _conv(cin, width, 3, stride), nn.BatchNorm2d(width)
    self.conv2, self.bn2 = _conv(width, width, 3, 1), nn.BatchNorm2d(width)
    self.shortcut = _shortcut(cin, width, stride)

  def forward(self, x):
    y = F.relu(self.bn1(self.conv1(x)))
    return F.relu(self.shortcut(x) + self.bn2(self.conv2(y)))


class Bottleneck(nn.Module):
  expansion = 4

  def __init__(self, cin: int, width: int, stride: int):
    super().__init__()
    self.conv1, self.bn1 = _conv(cin, width, 1, 1), nn.BatchNorm2d(width)
    self.conv2, self.bn2 = _conv(width, width, 3, stride), nn.BatchNorm2d(width)
    self.conv3, self.bn3 = _conv(width, width * 4, 1, 1), nn.BatchNorm2d(width * 4)
    self.shortcut = _shortcut(cin, width * 4, stride)

  def forward(self, x):
    y = F.relu(self.bn1(self.conv1(x)))
    y = F.relu(self.bn2(self.conv2(y)))
    return F.relu(self.shortcut(x) + self.bn3(self.conv3(y)))


STAGES = {"resnet10": (BasicBlock, (1, 1, 1, 1)), "resnet18": (BasicBlock, (2, 2, 2, 2)),
          "resnet34": (BasicBlock, (3, 4, 6, 3)), "resnet50": (Bottleneck, (3, 4, 6, 3))}


class ResNet(nn.Module):
  """jaxpurify's `config.model` (name, width): CIFAR stem (3×3 stride-1 conv, no max-pool), or torchvision's ImageNet
  stem for the `*_imagenet` names. x [B, 3, H, W] normalised -> (feature [B, D], {'layer1'..: [B, C_i, H_i, W_i]})."""

  def __init__(self, name: str, width: int):
    super().__init__()
    imagenet = name.endswith("_imagenet")
    block, sizes = STAGES[name.removesuffix("_imagenet")]
    kernel, stride = (7, 2) if imagenet else (3, 1)
    stem = [_conv(3, width, kernel, stride), nn.BatchNorm2d(width), nn.ReLU()]
    self.stem = nn.Sequential(*stem, *([nn.MaxPool2d(3, 2, 1)] if imagenet else []))
    cin, stages = width, []
    for i, count in enumerate(sizes):
      blocks = []
      for j in range(count):
        blocks.append(block(cin, width * 2**i, 2 if i > 0 and j == 0 else 1))
        cin = width * 2**i * block.expansion
      stages.append(nn.Sequential(*blocks))
    self.stages = nn.ModuleList(stages)
    self.feature_dim = cin
    self.tap_names = tuple(f"layer{i + 1}" for i in range(len(sizes)))
    for module in self.modules():
      if isinstance(module, nn.Conv2d):
        nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")

  def forward(self, x):
    x = self.stem(x)
    taps = {}
    for name, stage in zip(self.tap_names, self.stages):
      x = stage(x)
      taps[name] = x
    return x.mean(dim=(2, 3)), taps


class SSLModel(nn.Module):
  """Backbone + SimCLR's head Linear(D, hidden, no bias) → BN → ReLU → Linear(hidden, dim) (hidden 0: D).
  x -> (feature [B, D], projection [B, dim], taps)."""

  def __init__(self, model_config, head):
    super().__init__()
    self.backbone = ResNet(model_config.name, model_config.width)
    dim, hidden = self.backbone.feature_dim, head.hidden or self.backbone.feature_dim
    self.head = nn.Sequential(nn.Linear(dim, hidden, bias=False), nn.BatchNorm1d(hidden), nn.ReLU(),
                              nn.Linear(hidden, head.dim))

  def forward(self, x):
    feature, taps = self.backbone(x)
    return feature, self.head(feature), taps


class Classifier(nn.Module):
  """Backbone + BadEncoder's MLP head on the L2-normalised feature: Linear(h1) → ReLU → Dropout → Linear(h2) → ReLU
  → Linear(C). x -> logits [B, C]. head: hidden (h1, h2), dropout."""

  def __init__(self, model_config, num_classes: int, head):
    super().__init__()
    self.backbone = ResNet(model_config.name, model_config.width)
    (h1, h2), dim = head.hidden, self.backbone.feature_dim
    self.head = nn.Sequential(nn.Linear(dim, h1), nn.ReLU(), nn.Dropout(head.dropout), nn.Linear(h1, h2),
                              nn.ReLU(), nn.Linear(h2, num_classes))

  def forward(self, x):
    return self.head(F.normalize(self.backbone(x)[0], dim=-1))

