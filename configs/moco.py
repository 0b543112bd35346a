"""MoCo v2 pre-training of a CIFAR ResNet-18, then evaluation of the frozen encoder.

Full (CIFAR-10, 800 epochs, batch 256, SGD 0.06 cosine, wd 5e-4, temperature 0.2, queue 4096, momentum 0.99):
  python main.py --config configs/moco.py
Quick (the embedded `digits` set, a narrow ResNet-18, Adam 1e-3, momentum 0.9, queue 1024; minutes on a
  2-core CPU):
  python main.py --config configs/moco.py:quick
A ViT-Tiny with the ViT recipe (AdamW, warm-up, cosine; configs/common.py vit_recipe):
  python main.py --config configs/moco.py:encoder=vit_tiny,quick
"""

import functools

from configs import common, simclr


def get_config(arg=None):
  return common.build(arg, functools.partial(simclr.experiment, "moco"), encoder="")
