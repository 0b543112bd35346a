"""SSL-Backdoor (Saha et al., CVPR 2022): an image patch pasted into the target class's images of the pre-training
set, MoCo v2 (or BYOL) pre-training on it, and the comparison with the encoder pre-trained on clean data.

Full (CIFAR-10, target 0 = airplane, MoCo v2 with SSL-Backdoor's recipe: SGD 0.06 cosine, batch 256, 200 epochs,
temperature 0.2, momentum 0.999, queue 4096 for CIFAR-sized sets):
  python main.py --config configs/ssl_backdoor.py
  python main.py --config configs/ssl_backdoor.py:method=byol
Quick (digits, target 0, the quick MoCo of configs/common.py):
  python main.py --config configs/ssl_backdoor.py:quick
The real HTBA trigger: --config.attack.trigger.path=trigger_10.png (resized to attack.trigger.size).
"""

import ml_collections

from configs import common, simclr


def get_config(arg=None):
  return common.build(arg, experiment, target=0, method="moco")


def htba_trigger(size: int) -> ml_collections.ConfigDict:
  """The patch trigger of SSL-Backdoor and CorruptEncoder: an image file at `path` (HTBA's trigger_10.png) resized
  to size×size, or with no path our stand-in, uniform random colours per pixel from `seed`."""
  return ml_collections.ConfigDict(dict(path="", size=size, seed=0))


def attack_block(target: int, downstream: str) -> ml_collections.ConfigDict:
  """SSL-Backdoor's poisoning (attacks.md 2.4): the code's rate 1.0 of the target class (the paper: 0.5); the patch
  within [0.25, 0.75] of the image for training, [0.10, 0.90] on the poisoned test images. Trigger 7 px: the
  official 50 px of a 224-px image is 7.1 px of 32."""
  return ml_collections.ConfigDict(dict(mode="ssl_backdoor", clean_encoder="", downstream=downstream, target=target,
                                        poison_rate=1.0, train_location=(0.25, 0.75), test_location=(0.10, 0.90),
                                        trigger=htba_trigger(7)))


def paper_recipe(c: ml_collections.ConfigDict, method: str, quick: bool) -> None:
  """SSL-Backdoor's README recipes (attacks.md 3.2) for the full run: MoCo v2 SGD 0.06 cosine, wd 1e-4, batch 256,
  200 epochs, temperature 0.2, momentum 0.999 (queue 4096: configs/common.py's CIFAR choice); BYOL Adam 2e-3,
  200 epochs. quick keeps configs/common.py's quick recipe (as CTRL's quick does)."""
  if quick:
    return
  c.pretrain.train.update(batch_size=256, epochs=200)
  if method == "moco":
    c.pretrain.optim.weight_decay = 1e-4
    c.pretrain.moco.momentum = 0.999
  elif method == "byol":
    c.pretrain.optim = common.optim("adam", 2e-3, 0.0)


def experiment(target: int, method: str, quick: bool) -> ml_collections.ConfigDict:
  """SSL-Backdoor on the pre-training set with target class `target`, pre-trained with `method`."""
  c = simclr.experiment(method, quick)
  c.experiment = "ssl_backdoor"
  paper_recipe(c, method, quick)
  c.attack = attack_block(target, c.data.name)
  c.evaluate.datasets = (c.data.name,)
  return c
