"""SimCLR pre-training of a CIFAR ResNet-18 as BadEncoder does it, then evaluation of the frozen encoder.

Full (CIFAR-10, 1000 epochs, batch 256, Adam 1e-3, wd 1e-6, temperature 0.5):
  python main.py --config configs/simclr.py
Quick (the embedded `digits` set, a narrow ResNet-18, minutes on a 2-core CPU):
  python main.py --config configs/simclr.py:quick
"""

import functools

import ml_collections

from configs import common


def get_config(arg=None):
  return common.build(arg, functools.partial(experiment, "simclr"))


def experiment(method: str, quick: bool) -> ml_collections.ConfigDict:
  """Pre-train with `method` on CIFAR-10 (quick: digits), then evaluate the frozen encoder downstream."""
  c = ml_collections.ConfigDict()
  c.experiment = "pretrain"
  c.seed = 100
  c.mesh = common.mesh()
  c.data = common.data("cifar10", quick)
  c.model = common.model(quick)
  c.pretrain = common.pretraining(method, quick)
  c.evaluate = common.evaluate(("cifar10", "stl10", "gtsrb", "svhn_cropped"), quick)
  return c
