"""BYOL pre-training of a CIFAR ResNet-18 with CTRL's recipe, then evaluation of the frozen encoder.

Full (CIFAR-10, 800 epochs, batch 256, SGD 0.06 cosine, wd 5e-4, projector and predictor 2048 -> 256, EMA 0.996):
  python main.py --config configs/byol.py
Quick (the embedded `digits` set, a narrow ResNet-18, Adam 1e-3, full-size heads; minutes on a 2-core CPU):
  python main.py --config configs/byol.py:quick
A ViT-Tiny with the ViT recipe (AdamW, warm-up, cosine; configs/common.py vit_recipe):
  python main.py --config configs/byol.py:encoder=vit_tiny,quick
"""

import functools

from configs import common, simclr


def get_config(arg=None):
  return common.build(arg, functools.partial(simclr.experiment, "byol"), encoder="")
