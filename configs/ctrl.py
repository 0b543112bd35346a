"""CTRL (Li et al., ICCV 2023): poison 1% of the pre-training set (target-class images) with a
frequency trigger, pre-train SimCLR on it, and compare with the encoder pre-trained on clean data.

Full (CIFAR-10, target 0 = airplane, SimCLR with CTRL's recipe: SGD 0.06, batch 512, 800 epochs):
  python main.py --config configs/ctrl.py
Quick:
  python main.py --config configs/ctrl.py:quick
"""

import ml_collections

from configs import common, simclr


def get_config(arg=None):
  return common.build(arg, experiment, target=0, method="simclr")


def experiment(target: int, method: str, quick: bool) -> ml_collections.ConfigDict:
  """CTRL on the pre-training set with target class `target`, pre-trained with CTRL's recipe."""
  c = simclr.experiment(method, quick)
  c.experiment = "ctrl"
  if method == "simclr":
    c.pretrain.update(optim=common.optim("sgd", 0.06, 5e-4, momentum=0.9, schedule="cosine", warmup_epochs=10),
                      augment=common.augment((0.2, 1.0)))
    c.pretrain.train.update(batch_size=512, epochs=800)
  trigger = common.trigger("ctrl")
  c.attack = ml_collections.ConfigDict(dict(clean_encoder="", downstream=c.data.name, target=target,
                                            poison_ratio=0.01, trigger=trigger))
  c.evaluate.datasets = (c.data.name,)
  c.evaluate.knn.t = 0.1
  if quick:
    c.pretrain.train.update(batch_size=128, epochs=25)
    c.pretrain.optim.warmup_epochs = 2
    c.attack.poison_ratio = 0.05
  return c
