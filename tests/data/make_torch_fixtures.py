"""Writes the PyTorch fixtures of tests/unit/interop_test.py: narrow re-creations of the encoders people hold,
saved by torch itself, and the features those models compute in eval mode on a fixed input batch.

Needs torch and safetensors (never jaxpurify's requirements); from the repository root, in a separate venv:
  python3 -m venv /tmp/torchenv && /tmp/torchenv/bin/pip install torch safetensors numpy
  /tmp/torchenv/bin/python tests/data/make_torch_fixtures.py

Files (tests/data/):
  badencoder_resnet18_w8.pth        BadEncoder/DRUPE's SimCLR (models/simclr_model.py) at width 8, saved as their
                                    scripts do: {'epoch', 'state_dict', 'optimizer'}; keys f.f.* and g.*
  torchvision_resnet18_w8.pth       torchvision's ResNet-18 (ImageNet stem, fc) at width 8, a bare state_dict
  torchvision_resnet50_w4.safetensors  torchvision's ResNet-50 at width 4, written by safetensors.torch.save_file
  prefix_resnet10_w4_legacy.pt      a CIFAR ResNet-10 at width 4 under `backbone.` beside a `head.` Linear, in
                                    torch's legacy (non-zip) format
  ctrl_simclr_resnet18_w4.pth.tar   CTRL's SimCLRModel (meet-cjli/CTRL methods/SimCLR/simclr.py) at width 4, saved
                                    as its trainer does (methods/base.py): {'epoch', 'state_dict', 'optimizer'} with
                                    an SGD whose param_groups a scheduler has touched; keys backbone.* and proj_head.*
  ctrl_byol_resnet18_w2.pth.tar     CTRL's BYOL (methods/BYOL/byol.py) at width 2, projector/predictor 2048/256
                                    narrowed to 16/8, after one SGD step (momentum buffers); keys backbone.*,
                                    backbone_k.*, projector_q/k.*, predictor.*, encoder_q/k.0/1.* (the same modules
                                    again); its features are the online encoder's, `<stem>_target/...` the target's
  torch_features.npz                per file: `<stem>/x` [B, H, W, 3] normalised NHWC input, `<stem>/pooled` [B, D]
                                    and `<stem>/layer4` [B, h, w, C] (NHWC) of the model in eval mode
The models here are torchvision's (conv1, bn1, relu, maxpool, layer1..4, avgpool, fc; BasicBlock/Bottleneck with
conv<k>/bn<k>/downsample) with the first stage `width` channels wide instead of 64. The test suite imports them for
its export -> PyTorch round trip.
"""

import os

import numpy as np
import torch
from torch import nn

HERE = os.path.dirname(os.path.abspath(__file__))


class BasicBlock(nn.Module):
  expansion = 1

  def __init__(self, cin, width, stride):
    super().__init__()
    self.conv1 = nn.Conv2d(cin, width, 3, stride, 1, bias=False)
    self.bn1 = nn.BatchNorm2d(width)
    self.relu = nn.ReLU(inplace=True)
    self.conv2 = nn.Conv2d(width, width, 3, 1, 1, bias=False)
    self.bn2 = nn.BatchNorm2d(width)
    self.downsample = _downsample(cin, width, stride)

  def forward(self, x):
    out = self.bn2(self.conv2(self.relu(self.bn1(self.conv1(x)))))
    return self.relu(out + (x if self.downsample is None else self.downsample(x)))


class Bottleneck(nn.Module):
  expansion = 4

  def __init__(self, cin, width, stride):
    super().__init__()
    self.conv1 = nn.Conv2d(cin, width, 1, bias=False)
    self.bn1 = nn.BatchNorm2d(width)
    self.conv2 = nn.Conv2d(width, width, 3, stride, 1, bias=False)
    self.bn2 = nn.BatchNorm2d(width)
    self.conv3 = nn.Conv2d(width, width * 4, 1, bias=False)
    self.bn3 = nn.BatchNorm2d(width * 4)
    self.relu = nn.ReLU(inplace=True)
    self.downsample = _downsample(cin, width * 4, stride)

  def forward(self, x):
    out = self.relu(self.bn1(self.conv1(x)))
    out = self.relu(self.bn2(self.conv2(out)))
    out = self.bn3(self.conv3(out))
    return self.relu(out + (x if self.downsample is None else self.downsample(x)))


def _downsample(cin, cout, stride):
  if stride == 1 and cin == cout:
    return None
  return nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))


ARCHS = {"resnet10": (BasicBlock, (1, 1, 1, 1)), "resnet18": (BasicBlock, (2, 2, 2, 2)),
         "resnet34": (BasicBlock, (3, 4, 6, 3)), "resnet50": (Bottleneck, (3, 4, 6, 3))}


class ResNet(nn.Module):
  """torchvision.models.resnet.ResNet with `width` for 64; `cifar`: a 3×3 stride-1 conv1 and no maxpool."""

  def __init__(self, arch, width, num_classes=10, cifar=False):
    super().__init__()
    block, sizes = ARCHS[arch]
    self.conv1 = (nn.Conv2d(3, width, 3, 1, 1, bias=False) if cifar else nn.Conv2d(3, width, 7, 2, 3, bias=False))
    self.bn1 = nn.BatchNorm2d(width)
    self.relu = nn.ReLU(inplace=True)
    self.maxpool = nn.Identity() if cifar else nn.MaxPool2d(3, 2, 1)
    cin = width
    for i, n in enumerate(sizes):
      blocks = []
      for j in range(n):
        blocks.append(block(cin, width * 2**i, 2 if (i > 0 and j == 0) else 1))
        cin = width * 2**i * block.expansion
      setattr(self, f"layer{i + 1}", nn.Sequential(*blocks))
    self.avgpool = nn.AdaptiveAvgPool2d(1)
    self.fc = nn.Linear(cin, num_classes)
    self.feature_dim = cin

  def features(self, x):
    """x [B, 3, H, W] -> (pooled [B, D], layer4 [B, C, h, w])."""
    x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
    x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
    return torch.flatten(self.avgpool(x), 1), x


class CtrlBlock(nn.Module):
  """CTRL's networks/resnet_cifar.py BasicBlock: conv1, bn1, conv2, bn2 and `shortcut`, an nn.Sequential that is
  empty (no keys) for the identity."""

  def __init__(self, cin, width, stride):
    super().__init__()
    self.conv1 = nn.Conv2d(cin, width, 3, stride, 1, bias=False)
    self.bn1 = nn.BatchNorm2d(width)
    self.conv2 = nn.Conv2d(width, width, 3, 1, 1, bias=False)
    self.bn2 = nn.BatchNorm2d(width)
    self.shortcut = _downsample(cin, width, stride) or nn.Sequential()

  def forward(self, x):
    out = self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x)))))
    return torch.relu(out + self.shortcut(x))


class CtrlResNet(nn.Module):
  """CTRL's networks/resnet_cifar.py ResNet-18 (full_model=False, so no fc) with `width` for 64: conv1 3×3 stride 1,
  bn1, relu1, no maxpool, layer1..layer4, avgpool."""

  def __init__(self, width):
    super().__init__()
    self.conv1 = nn.Conv2d(3, width, 3, 1, 1, bias=False)
    self.bn1 = nn.BatchNorm2d(width)
    self.relu1 = nn.ReLU(inplace=True)
    cin = width
    for i in range(4):
      setattr(self, f"layer{i + 1}", nn.Sequential(CtrlBlock(cin, width * 2**i, 1 if i == 0 else 2),
                                                   CtrlBlock(width * 2**i, width * 2**i, 1)))
      cin = width * 2**i
    self.avgpool = nn.AdaptiveAvgPool2d(1)

  def features(self, x):
    """x [B, 3, H, W] -> (pooled [B, D], layer4 [B, C, h, w])."""
    x = self.layer4(self.layer3(self.layer2(self.layer1(self.relu1(self.bn1(self.conv1(x)))))))
    return torch.flatten(self.avgpool(x), 1), x

  def forward(self, x):
    return self.features(x)[0]


class CtrlSimCLR(nn.Module):
  """CTRL's SimCLRModel for CIFAR: `backbone` (CLModel), `proj_head` Linear(D, D), ReLU, Linear(D, 128)."""

  def __init__(self, width):
    super().__init__()
    self.backbone = CtrlResNet(width)
    dim = width * 8
    self.proj_head = nn.Sequential(nn.Linear(dim, dim), nn.ReLU(inplace=True), nn.Linear(dim, 128))


class CtrlBYOL(nn.Module):
  """CTRL's BYOL, modules registered in its order: backbone, backbone_k, projector_q, projector_k, predictor, then
  encoder_q = (backbone, projector_q) and encoder_k = (backbone_k, projector_k), which state_dict() lists again."""

  def __init__(self, width, hidden, out):
    super().__init__()
    self.backbone, self.backbone_k = CtrlResNet(width), CtrlResNet(width)
    mlp = lambda cin: nn.Sequential(nn.Linear(cin, hidden), nn.BatchNorm1d(hidden), nn.ReLU(inplace=True),
                                    nn.Linear(hidden, out))
    self.projector_q, self.projector_k, self.predictor = mlp(width * 8), mlp(width * 8), mlp(out)
    self.encoder_q = nn.Sequential(self.backbone, self.projector_q)
    self.encoder_k = nn.Sequential(self.backbone_k, self.projector_k)


class SimCLRBase(nn.Module):
  """BadEncoder's models/simclr_model.py SimCLRBase: the ResNet's children without fc and maxpool, in order,
  conv1 replaced by a 3×3 stride-1 conv."""

  def __init__(self, arch, width):
    super().__init__()
    self.f = []
    for name, module in ResNet(arch, width).named_children():
      if name == "conv1":
        module = nn.Conv2d(3, width, kernel_size=3, stride=1, padding=1, bias=False)
      if not isinstance(module, (nn.Linear, nn.MaxPool2d)):
        self.f.append(module)
    self.f = nn.Sequential(*self.f)

  def forward(self, x):
    return torch.flatten(self.f(x), start_dim=1)


class SimCLR(nn.Module):
  """BadEncoder's SimCLR: backbone `f`, projection head `g` (Linear no bias, BN, ReLU, Linear to 128)."""

  def __init__(self, arch="resnet18", width=64, feature_dim=128):
    super().__init__()
    self.f = SimCLRBase(arch, width)
    dim = width * 8
    self.g = nn.Sequential(nn.Linear(dim, dim, bias=False), nn.BatchNorm1d(dim), nn.ReLU(inplace=True),
                           nn.Linear(dim, feature_dim, bias=True))

  def features(self, x):
    """x [B, 3, H, W] -> (pooled [B, D], layer4 [B, C, h, w]); f.f[6] is layer4, f.f[7] the average pool."""
    x = self.f.f[:7](x)
    return torch.flatten(self.f.f[7](x), 1), x


def randomize_batchnorm(model, generator):
  """Non-trivial BatchNorm affine parameters and running statistics, so eval-mode features test them."""
  for module in model.modules():
    if isinstance(module, (nn.BatchNorm1d, nn.BatchNorm2d)):
      n = module.num_features
      module.weight.data = torch.rand(n, generator=generator) + 0.5
      module.bias.data = torch.randn(n, generator=generator) * 0.1
      module.running_mean = torch.randn(n, generator=generator) * 0.1
      module.running_var = torch.rand(n, generator=generator) + 0.5
      module.num_batches_tracked.fill_(7)


def features(model, x_nhwc):
  """Eval-mode (pooled [B, D], layer4 NHWC) of `model` on NHWC numpy input."""
  model.eval()
  with torch.no_grad():
    pooled, layer4 = model.features(torch.from_numpy(x_nhwc).permute(0, 3, 1, 2).contiguous())
  return pooled.numpy(), layer4.permute(0, 2, 3, 1).numpy()


def main():
  from safetensors.torch import save_file  # pylint: disable=g-import-not-at-top
  torch.manual_seed(0)
  generator, rng, arrays = torch.Generator().manual_seed(0), np.random.default_rng(0), {}

  def record(stem, model, size):
    x = rng.standard_normal((4, size, size, 3)).astype(np.float32)
    arrays[f"{stem}/x"] = x
    arrays[f"{stem}/pooled"], arrays[f"{stem}/layer4"] = features(model, x)

  simclr = SimCLR("resnet18", 8)
  randomize_batchnorm(simclr, generator)
  torch.save({"epoch": 200, "state_dict": simclr.state_dict(),
              "optimizer": torch.optim.Adam(simclr.parameters(), lr=1e-3, weight_decay=1e-6).state_dict()},
             os.path.join(HERE, "badencoder_resnet18_w8.pth"))
  record("badencoder_resnet18_w8", simclr, 32)

  resnet18 = ResNet("resnet18", 8)
  randomize_batchnorm(resnet18, generator)
  torch.save(resnet18.state_dict(), os.path.join(HERE, "torchvision_resnet18_w8.pth"))
  record("torchvision_resnet18_w8", resnet18, 64)

  resnet50 = ResNet("resnet50", 4)
  randomize_batchnorm(resnet50, generator)
  save_file(resnet50.state_dict(), os.path.join(HERE, "torchvision_resnet50_w4.safetensors"))
  record("torchvision_resnet50_w4", resnet50, 64)

  wrapped = nn.Module()
  wrapped.backbone, wrapped.head = ResNet("resnet10", 4, cifar=True), nn.Linear(32, 10)
  del wrapped.backbone.fc
  randomize_batchnorm(wrapped, generator)
  torch.save(wrapped.state_dict(), os.path.join(HERE, "prefix_resnet10_w4_legacy.pt"),
             _use_new_zipfile_serialization=False)
  record("prefix_resnet10_w4_legacy", wrapped.backbone, 32)

  ctrl = CtrlSimCLR(4)
  randomize_batchnorm(ctrl, generator)
  sgd = torch.optim.SGD(ctrl.parameters(), lr=0.06, momentum=0.9, weight_decay=5e-4)
  torch.optim.lr_scheduler.CosineAnnealingLR(sgd, 800)  # adds 'initial_lr' to the param_groups, as CTRL's does
  torch.save({"epoch": 800, "state_dict": ctrl.state_dict(), "optimizer": sgd.state_dict()},
             os.path.join(HERE, "ctrl_simclr_resnet18_w4.pth.tar"))
  record("ctrl_simclr_resnet18_w4", ctrl.backbone, 32)

  byol = CtrlBYOL(2, 16, 8)
  sgd = torch.optim.SGD(byol.parameters(), lr=0.06, momentum=0.9, weight_decay=5e-4)
  byol.train()
  x = torch.randn(4, 3, 32, 32, generator=generator)
  loss = -nn.functional.cosine_similarity(byol.predictor(byol.encoder_q(x)), byol.encoder_k(x).detach()).mean()
  loss.backward()
  sgd.step()
  randomize_batchnorm(byol, generator)
  torch.save({"epoch": 1, "state_dict": byol.state_dict(), "optimizer": sgd.state_dict()},
             os.path.join(HERE, "ctrl_byol_resnet18_w2.pth.tar"))
  record("ctrl_byol_resnet18_w2", byol.backbone, 32)
  record("ctrl_byol_resnet18_w2_target", byol.backbone_k, 32)

  np.savez_compressed(os.path.join(HERE, "torch_features.npz"), **arrays)


if __name__ == "__main__":
  main()
