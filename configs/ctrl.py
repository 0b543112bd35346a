"""CTRL (Li et al., ICCV 2023): poison 1% of the pre-training set (target-class images) with a
frequency trigger, pre-train SimCLR on it, and compare with the encoder pre-trained on clean data.

Full (CIFAR-10, target 0 = airplane, SimCLR with CTRL's recipe: SGD 0.06, batch 512, 800 epochs):
  python main.py --config configs/ctrl.py
Quick:
  python main.py --config configs/ctrl.py:quick
"""

from configs import common


def get_config(arg=None):
  arg = common.parse_arg(arg, target=0, method="simclr", quick=False)
  return common.ctrl_experiment(arg.target, arg.method, arg.quick)
