"""DRUPE (Tao et al., S&P 2024): BadEncoder's fine-tuning plus distribution alignment and spreading of
the poisoned embeddings, nearest-of-3 references, warm-up phases and adaptive cost weights.

Full (20% CIFAR-10 shadow set, 120 epochs, SGD 0.05, batch 256):
  python main.py --config configs/drupe.py:stl10 --config.attack.clean_encoder=runs/simclr
Quick:
  python main.py --config configs/drupe.py:quick
"""

import functools

from configs import badencoder, common


def get_config(arg=None):
  return common.build(arg, functools.partial(badencoder.experiment, "drupe"), downstream="stl10", method="simclr")
