"""T-Core: trusted-core bootstrapping of a clean downstream model under the three threats.

  python main.py --config configs/tcore.py:threat=2,attack=badnets,quick
  python main.py --config configs/tcore.py:threat=1,attack=badencoder,quick
  python main.py --config configs/tcore.py:threat=3,attack=blended,encoder=badencoder,quick
Full (CIFAR-10 SimCLR encoder, downstream STL-10 / GTSRB / SVHN):
  python main.py --config configs/tcore.py:threat=2,attack=badnets,downstream=gtsrb \\
      --config.clean_encoder=runs/simclr

protocol = ft_all (default) | ft_head | both. Components are switched off with
--config.tcore.skip='("filter",)'; `python -m jaxpurify.ablate --config configs/tcore.py:...` removes each in turn.
"""

import ml_collections

from configs import common
from configs import threat as threat_config


def get_config(arg=None):
  return common.build(arg, experiment, threat=2, attack="badnets", encoder="badencoder", downstream="stl10",
                      protocol="ft_all")


def experiment(threat: int, attack: str, encoder: str, downstream: str, protocol: str,
               quick: bool) -> ml_collections.ConfigDict:
  """T-Core against one threat (threat_experiment's setting and undefended rows), fine-tuned with `protocol`
  (ft_all, ft_head or both).

  The four components are the paper's; their settings are jaxpurify's reconstruction (tcore.md section 5,
  docs/tcore.md). sift: five depths (layers=(): input and four taps, a ResNet's layer1..4, a ViT's blocks 3, 6, 9, 12;
  sift.default_layers), the sum of the nearest-same-label ranks, 20 seeds per class. expand: Confusion Training's
  CIFAR-10 rounds, lambdas and lrs (SGD, momentum 0.7), batch 32 + 32 seeds, FT-all; the per-round fine-tuning is 10
  epochs (CT trains from scratch for 40-100; this starts from a pre-trained encoder). filter: CLP's UCLC (no BN eps),
  the most pruning of u in {2, 2.5, 3, 4, 5} that keeps the trusted set's 1-NN accuracy within 1 point. boot: from the
  seeds, 3 growth stages to 60 / 80 / 95% of each class, admitting samples predicted as their label with confidence >=
  0.8, 1000 steps per stage with config.finetune's optimiser and batch. quick: two rounds (1/2, 1/5) of 150 confusion
  steps after 5 epochs each (Adam 1e-3), 200 steps per bootstrapping stage, u from 2.5 (docs/tcore.md).
  """
  protocols = {"ft_all": ("ft_all",), "ft_head": ("ft_head",), "both": ("ft_head", "ft_all")}
  if protocol not in protocols:
    raise ValueError(f"unknown protocol {protocol!r}; use one of {', '.join(protocols)}")
  c = threat_config.experiment(threat, attack, encoder, downstream, quick)
  c.experiment = "tcore"
  c.finetune.protocols = protocols[protocol]
  c.tcore = ml_collections.ConfigDict(dict(
      skip=(),
      sift=dict(layers=(), aggregate="sum", seeds_per_class=20, chunk_rows=1024),
      expand=dict(trainable="all", ratios=(1 / 2, 1 / 5, 1 / 25, 1 / 50, 1 / 100),
                  lambdas=(20.0, 20.0, 20.0, 30.0, 30.0), lrs=(1e-3, 1e-3, 1e-3, 1e-2, 1e-2),
                  iters=(6000, 6000, 6000, 6000, 2000),
                  pretrain_epochs=(10, 10, 10, 10, 10), pretrain_optim=common.optim("adam", 1e-4, 0.0),
                  momentum=0.7, weight_decay=1e-4, batch_size=32, seed_batch_size=32, min_per_class_fraction=1 / 50,
                  low_loss_fraction=0.4, per_class_cap=0.5, min_seed_fraction=0.5, log_every=100),
      filter=dict(rule="sweep", u=3.0, u_grid=(2.0, 2.5, 3.0, 4.0, 5.0), acc_tol=0.01, std_ddof=1, bn_eps=0.0),
      boot=dict(schedule=(0.6, 0.8, 0.95), conf_threshold=0.8, steps_per_stage=1000)))
  if quick:
    c.tcore.sift.chunk_rows = 256
    c.tcore.expand.update(ratios=(1 / 2, 1 / 5), lambdas=(20.0, 20.0), lrs=(1e-3, 1e-3), iters=(150, 150),
                          pretrain_epochs=(5, 5), pretrain_optim=common.optim("adam", 1e-3, 0.0), log_every=25)
    c.tcore.boot.steps_per_stage = 200
    c.tcore.filter.u_grid = (2.5, 3.0, 4.0, 5.0)  # u 2.0 prunes 16-24 of the width-8 encoder's channels
  return c
