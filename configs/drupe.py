"""DRUPE (Tao et al., S&P 2024): BadEncoder's fine-tuning plus distribution alignment and spreading of
the poisoned embeddings, nearest-of-3 references, warm-up phases and adaptive cost weights.

Full (20% CIFAR-10 shadow set, 120 epochs, SGD 0.05, batch 256):
  python main.py --config configs/drupe.py:stl10 --config.attack.clean_encoder=runs/simclr
Quick:
  python main.py --config configs/drupe.py:quick
"""

from configs import common


def get_config(arg=None):
  arg = common.parse_arg(arg, downstream="stl10", method="simclr", quick=False)
  return common.encoder_attack_experiment("drupe", arg.downstream, arg.method, arg.quick)
