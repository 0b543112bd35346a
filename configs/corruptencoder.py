"""CorruptEncoder (Zhang et al., CVPR 2024): poisoned images added to the pre-training set, each a reference object
of the target class on one side of a background and the trigger on the other; MoCo v2 pre-training on it, and the
comparison with the encoder pre-trained on clean data.

Full (CIFAR-10, target 0 = airplane, 0.5% = 250 images added, MoCo v2 with the paper's recipe as
configs/ssl_backdoor.py):
  python main.py --config configs/corruptencoder.py
Quick (digits, target 0, 5% = 72 images added, the quick MoCo of configs/common.py):
  python main.py --config configs/corruptencoder.py:quick
"""

import ml_collections

from configs import common, simclr
from configs import ssl_backdoor as ssl_backdoor_config


def get_config(arg=None):
  return common.build(arg, experiment, target=0, method="moco")


def attack_block(target: int, downstream: str, quick: bool) -> ml_collections.ConfigDict:
  """CorruptEncoder's defaults (attacks.md 2.5): 650 images = 0.5% of the set, 3 references, area_ratio 2,
  object_marginal 0.05, trigger_marginal 0.25. Our stand-ins (no masks, no Places): the object is the bounding box of
  a reference's pixels with max channel >= object_threshold (0: the whole image; quick 64: the digit's strokes),
  backgrounds are images of the other classes. Trigger 6 px: the official 40 px of a 224-px test image is 5.7 px of
  32; on test images it goes at a random location within test_location (SSL-Backdoor's validation rule). quick:
  5% (72 digits; CTRL's quick raises its 1% to 5% the same way)."""
  c = ml_collections.ConfigDict(dict(mode="corruptencoder", clean_encoder="", downstream=downstream, target=target,
                                     poison_ratio=0.005, num_references=3, object_threshold=0, area_ratio=2.0,
                                     object_marginal=0.05, trigger_marginal=0.25, background="other_classes",
                                     test_location=(0.10, 0.90), trigger=ssl_backdoor_config.htba_trigger(6)))
  if quick:
    c.update(poison_ratio=0.05, object_threshold=64)
  return c


def experiment(target: int, method: str, quick: bool) -> ml_collections.ConfigDict:
  """CorruptEncoder on the pre-training set with target class `target`, pre-trained with `method`."""
  c = simclr.experiment(method, quick)
  c.experiment = "corruptencoder"
  ssl_backdoor_config.paper_recipe(c, method, quick)
  c.attack = attack_block(target, c.data.name, quick)
  c.evaluate.datasets = (c.data.name,)
  return c
