"""SimCLR pre-training of a CIFAR ResNet-18 as BadEncoder does it, then evaluation of the frozen encoder.

Full (CIFAR-10, 1000 epochs, batch 256, Adam 1e-3, wd 1e-6, temperature 0.5):
  python main.py --config configs/simclr.py
Quick (the embedded `digits` set, a narrow ResNet-18, minutes on a 2-core CPU):
  python main.py --config configs/simclr.py:quick
"""

from configs import common


def get_config(arg=None):
  arg = common.parse_arg(arg, quick=False)
  return common.pretraining_experiment("simclr", arg.quick)
