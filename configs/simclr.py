"""SimCLR pre-training of a CIFAR ResNet-18 as BadEncoder does it, then evaluation of the frozen encoder.

Full (CIFAR-10, 1000 epochs, batch 256, Adam 1e-3, wd 1e-6, temperature 0.5):
  python main.py --config configs/simclr.py
Quick (the embedded `digits` set, a narrow ResNet-18, minutes on a 2-core CPU):
  python main.py --config configs/simclr.py:quick
A ViT with its recipe (AdamW, warm-up, cosine decay; `common.vit_recipe`), here and in configs/moco.py, byol.py:
  python main.py --config configs/simclr.py:encoder=vit_tiny,quick
(`--config.model.name=vit_tiny` alone swaps the encoder and keeps the method's optimiser.)
"""

import functools

import ml_collections

from configs import common


def get_config(arg=None):
  return common.build(arg, functools.partial(experiment, "simclr"), encoder="")


def experiment(method: str, quick: bool, encoder: str = "") -> ml_collections.ConfigDict:
  """Pre-train with `method` on CIFAR-10 (quick: digits), then evaluate the frozen encoder downstream.

  encoder: the config's own (ResNet-18) when empty; else config.model.name, and a ViT (`vit_*`) pre-trains
  with common.vit_recipe."""
  c = ml_collections.ConfigDict()
  c.experiment = "pretrain"
  c.seed = 100
  c.mesh = common.mesh()
  c.data = common.data("cifar10", quick)
  c.model = common.model(quick)
  c.pretrain = common.pretraining(method, quick)
  c.evaluate = common.evaluate(("cifar10", "stl10", "gtsrb", "svhn_cropped"), quick)
  if encoder and not encoder.startswith(("resnet", "vit_")):
    raise ValueError(f"unknown config argument {encoder!r}; the bare value is encoder=NAME, a model name (resnet18, "
                     "vit_tiny, vit_small, ...), and the flags are quick, tiny, smoke")
  if encoder:
    c.model.name = encoder
  if encoder.startswith("vit"):
    common.vit_recipe(c.pretrain, quick)
  return c
