"""BadEncoder (Jia et al., S&P 2022): backdoor a clean SimCLR encoder for one downstream task.

The argument names the downstream task (and so the target class and its reference): stl10 (truck, 9),
gtsrb (priority road, 12) or svhn_cropped (one, 1). The clean encoder is pre-trained in the same workdir
unless --config.attack.clean_encoder names a finished pre-training run (e.g. runs/simclr).

Full (CIFAR-10 shadow set, 200 epochs, SGD 1e-3, batch 256; then the MLP evaluation):
  python main.py --config configs/badencoder.py:stl10 --config.attack.clean_encoder=runs/simclr
Quick (digits, a narrow ResNet-18, minutes on a 2-core CPU):
  python main.py --config configs/badencoder.py:quick
"""

import functools

import ml_collections

from configs import common, simclr

# Downstream task -> (target class, what BadEncoder's reference shows) (attacks.md section 2.1).
TARGETS = {"stl10": 9, "gtsrb": 12, "svhn_cropped": 1, "digits": 1}


def get_config(arg=None):
  return common.build(arg, functools.partial(experiment, "badencoder"), downstream="stl10", method="simclr")


def experiment(mode: str, downstream: str, method: str, quick: bool) -> ml_collections.ConfigDict:
  """BadEncoder or DRUPE against the encoder pre-trained with `method`, for one downstream task."""
  if downstream not in TARGETS:
    raise ValueError(f"unknown downstream task {downstream!r}; use one of {', '.join(TARGETS)}")
  c = simclr.experiment(method, quick)
  c.experiment = "encoder_attack"
  downstream = "digits" if quick else downstream
  drupe = mode == "drupe"
  c.attack = ml_collections.ConfigDict(dict(
      mode=mode, clean_encoder="", downstream=downstream, target=TARGETS[downstream],
      num_references=3 if drupe else 1, reference_file="", reference_choice="random",
      shadow_fraction=0.2 if drupe else 1.0, batch_norm="frozen",
      trigger=common.trigger("patch"), lambda1=1.0, lambda2=1.0,
      augment=dict(flip_prob=0.5, jitter=(0.4, 0.4, 0.4, 0.1), jitter_prob=0.8, gray_prob=0.2),
      optim=common.optim("sgd", 0.05 if drupe else 1e-3, 5e-4, momentum=0.9),
      train=common.train(256, 120 if drupe else 200, log_every=20, checkpoint_every=500)))
  if drupe:
    c.drupe = dict(cost=0.1, cost_1=0.001, num_projections=50, sim_b2b_offdiag=False, l3_ceiling=0.5)
  c.evaluate.datasets = (downstream,)
  if quick:
    # All 1,437 digits as shadow set. BadEncoder at batch 16, 12 epochs (1,068 steps): the number of steps is what
    # implants the backdoor (165 steps at batch 128 did in 2 seeds of 5, 660 at batch 64 in 4, 1,100 at batch 64 in
    # 5); at batch 16 the same steps cost a third of batch 64's time (docs/encoder-attacks.md).
    # DRUPE: at batch 128 its 220 steps left the backdoor at asr 88.9; the utility term weighted 4 (λ2): at 1 it
    # cost 9 points of accuracy on the width-8 encoder. Clean statistics: the frozen ones gave asr 25-95 over seeds
    # 0-4 at up to 11.7 points of accuracy. One reference, the target image the clean encoder finds most typical:
    # three references are pushed apart out of the target class of the 64-dimensional features (asr 82.9 +- 12.7,
    # 55-62 with three typical ones); one typical reference gave 100.00 in every seed of 0-4 (docs/encoder-attacks.md).
    c.attack.train.update(batch_size=64 if drupe else 16, epochs=20 if drupe else 12, log_every=10,
                          checkpoint_every=50 if drupe else 250)
    c.attack.shadow_fraction = 1.0
    if drupe:
      c.attack.update(lambda2=4.0, batch_norm="clean", num_references=1, reference_choice="typical")
    else:
      c.attack.optim.lr = 0.01
  return c
