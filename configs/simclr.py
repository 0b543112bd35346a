"""SimCLR pre-training of a CIFAR ResNet-18 as BadEncoder does it, then evaluation of the frozen encoder.

Full (CIFAR-10, 1000 epochs, batch 256, Adam 1e-3, wd 1e-6, temperature 0.5):
  python main.py --config configs/simclr.py
Quick (the embedded `digits` set, a narrow ResNet-18, minutes on a 2-core CPU):
  python main.py --config configs/simclr.py:quick
"""

import ml_collections

from configs import common


def get_config(arg=None):
  arg = common.parse_arg(arg, quick=False)
  c = ml_collections.ConfigDict()
  c.experiment = "simclr"
  c.seed = 100
  c.mesh = common.mesh()

  c.data = dict(name="cifar10", split="train", data_dir="", image_size=32)
  c.model = dict(name="resnet18", width=64, proj_hidden=0, proj_dim=128,
                 mean=common.CIFAR10_MEAN, std=common.CIFAR10_STD)
  c.simclr = dict(temperature=0.5)
  c.augment = dict(crop_scale=(0.08, 1.0), crop_ratio=(3 / 4, 4 / 3), flip_prob=0.5,
                   jitter=(0.4, 0.4, 0.4, 0.1), jitter_prob=0.8, gray_prob=0.2)
  c.optim = dict(name="adam", lr=1e-3, weight_decay=1e-6, momentum=0.0)
  c.train = dict(batch_size=256, epochs=1000, log_every=50, checkpoint_every=2000, keep_checkpoints=2)
  c.evaluate = dict(datasets=("cifar10", "stl10", "gtsrb", "svhn_cropped"), protocol="mlp",
                    monitors=("knn", "linear"), batch_size=512,
                    mlp=common.mlp_eval(), linear=common.linear_eval(), knn=common.knn_eval())

  if arg.quick:
    c.data.name = "digits"
    c.model.width = 8
    c.train.update(batch_size=128, epochs=25, log_every=10, checkpoint_every=50)
    c.evaluate.update(datasets=("digits",), batch_size=256)
    c.evaluate.mlp.epochs = 100
    c.evaluate.mlp.lr = 1e-3
  return c
