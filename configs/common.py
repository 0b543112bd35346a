"""Shared config pieces: the `:key=val,flag` argument language and blocks used by several configs."""

import ml_collections

from jaxpurify import triggers
from jaxpurify.data import catalog
from jaxpurify.poisoning import attacks

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2023, 0.1994, 0.2010)


def parse_arg(arg: str | None, **defaults) -> ml_collections.ConfigDict:
  """'quick,dataset=svhn_cropped' -> ConfigDict over `defaults`, values converted to the default's type.

  A bare word that names a boolean key sets it to True; any other bare value fills the first key
  (unless that key is a boolean). Unknown keys and unconvertible values raise ValueError.
  """
  out = ml_collections.ConfigDict(defaults)
  first = next(iter(defaults), None)
  for item in filter(None, (arg or "").split(",")):
    key, eq, value = item.partition("=")
    if not eq:
      if isinstance(defaults.get(key), bool):
        key, value = key, "True"
      elif first is not None and not isinstance(defaults[first], bool):
        key, value = first, item
    if key not in defaults:
      raise ValueError(f"unknown config argument {key!r}; known: {', '.join(defaults)}")
    kind = type(defaults[key])
    if kind is bool:
      if value.lower() not in ("true", "false", "1", "0"):
        raise ValueError(f"config argument {key}={value!r} is not a boolean")
      out[key] = value.lower() in ("true", "1")
    else:
      try:
        out[key] = kind(value)
      except ValueError:
        raise ValueError(f"config argument {key}={value!r} is not a {kind.__name__}") from None
  return out


def mesh():
  """Data parallelism over every device; add e.g. ('fsdp', n) here later."""
  return [("data", -1)]


def augment(crop_scale=(0.08, 1.0)):
  """SimCLR's augmentation as BadEncoder uses it (attacks.md section 3.1)."""
  return ml_collections.ConfigDict(dict(crop_scale=crop_scale, crop_ratio=(3 / 4, 4 / 3), flip_prob=0.5,
                                        jitter=(0.4, 0.4, 0.4, 0.1), jitter_prob=0.8, gray_prob=0.2))


def train(batch_size, epochs, log_every=50, checkpoint_every=2000):
  return ml_collections.ConfigDict(dict(batch_size=batch_size, epochs=epochs, log_every=log_every,
                                        checkpoint_every=checkpoint_every, keep_checkpoints=2))


def optim(name, lr, weight_decay, momentum=0.0, schedule="constant", warmup_epochs=0):
  return ml_collections.ConfigDict(dict(name=name, lr=lr, weight_decay=weight_decay, momentum=momentum,
                                        schedule=schedule, warmup_epochs=warmup_epochs))


def pretraining(method: str, quick: bool) -> ml_collections.ConfigDict:
  """Self-supervised pre-training block: method, its loss settings, head, augment, optim, train.

  simclr: BadEncoder's recipe (attacks.md 3.1). moco: MoCo v2 with the queue cut to 4096 for CIFAR-sized
  sets and momentum 0.99 (team choice, attacks.md 3.2). byol: CTRL's CIFAR recipe (attacks.md 3.2).
  quick: 25 epochs of the digits at batch 128, all three with Adam 1e-3 (SimCLR's optimiser).
  """
  if method == "simclr":
    block = dict(method="simclr", simclr=dict(temperature=0.5), head=dict(hidden=0, dim=128),
                 augment=augment(), optim=optim("adam", 1e-3, 1e-6), train=train(256, 1000))
  elif method == "moco":
    block = dict(method="moco", moco=dict(temperature=0.2, queue_size=4096, momentum=0.99),
                 head=dict(hidden=0, dim=128), augment=augment((0.2, 1.0)),
                 optim=optim("sgd", 0.06, 5e-4, momentum=0.9, schedule="cosine"), train=train(256, 800))
  elif method == "byol":
    block = dict(method="byol", byol=dict(ema=0.996, predictor_hidden=2048), head=dict(hidden=2048, dim=256),
                 augment=augment((0.2, 1.0)),
                 optim=optim("sgd", 0.06, 5e-4, momentum=0.9, schedule="cosine"), train=train(256, 800))
  else:
    raise ValueError(f"unknown pre-training method {method!r}; use simclr, moco or byol")
  block = ml_collections.ConfigDict(block)
  if quick:
    block.train.update(batch_size=128, epochs=25, log_every=10, checkpoint_every=50)
    if method in ("moco", "byol"):
      # SGD at 0.06, set for 800 epochs, leaves the encoder near its initialisation in 275 steps (MLP acc on
      # digits: MoCo 85.8, BYOL 78.6 = a random encoder's); SimCLR's Adam trains in that budget. BYOL keeps its
      # full-size heads: with 256 -> 64 heads it partially collapsed (MLP acc 81.4 with Adam, 91.4 with these).
      block.optim = optim("adam", 1e-3, 1e-6)
    if method == "moco":
      # Momentum 0.9: the key encoder's time constant is 10 steps instead of 100 of the run's 275 (MLP acc 91.1
      # against 90.3, kNN 76.7 against 70.0).
      block.moco.update(queue_size=1024, momentum=0.9)
  return block


def pretraining_experiment(method: str, quick: bool) -> ml_collections.ConfigDict:
  """Pre-train with `method` on CIFAR-10 (quick: digits), then evaluate the frozen encoder downstream."""
  c = ml_collections.ConfigDict()
  c.experiment = "pretrain"
  c.seed = 100
  c.mesh = mesh()
  c.data = data("cifar10", quick)
  c.model = model(quick)
  c.pretrain = pretraining(method, quick)
  c.evaluate = evaluate(("cifar10", "stl10", "gtsrb", "svhn_cropped"), quick)
  return c


# Downstream task -> (target class, what BadEncoder's reference shows) (attacks.md section 2.1).
TARGETS = {"stl10": 9, "gtsrb": 12, "svhn_cropped": 1, "digits": 1}


def encoder_attack_experiment(mode: str, downstream: str, method: str, quick: bool) -> ml_collections.ConfigDict:
  """BadEncoder or DRUPE against the encoder pre-trained with `method`, for one downstream task."""
  if downstream not in TARGETS:
    raise ValueError(f"unknown downstream task {downstream!r}; use one of {', '.join(TARGETS)}")
  c = pretraining_experiment(method, quick)
  c.experiment = mode
  downstream = "digits" if quick else downstream
  drupe = mode == "drupe"
  c.attack = ml_collections.ConfigDict(dict(
      mode=mode, clean_encoder="", downstream=downstream, target=TARGETS[downstream],
      num_references=3 if drupe else 1, reference_file="",
      shadow_fraction=0.2 if drupe else 1.0,
      trigger=triggers.default_config("patch"), lambda1=1.0, lambda2=1.0,
      augment=dict(flip_prob=0.5, jitter=(0.4, 0.4, 0.4, 0.1), jitter_prob=0.8, gray_prob=0.2),
      optim=optim("sgd", 0.05 if drupe else 1e-3, 5e-4, momentum=0.9),
      train=train(256, 120 if drupe else 200, log_every=20, checkpoint_every=500)))
  if drupe:
    c.drupe = dict(cost=0.1, cost_1=0.001, num_projections=50, sim_b2b_offdiag=False)
  c.evaluate.datasets = (downstream,)
  if quick:
    # All 1,437 digits as shadow set. DRUPE at batch 64 (22 steps per epoch): at batch 128 its 220 steps left
    # the backdoor at asr 88.9; and with the utility term weighted 4 (λ2): at 1 it cost 9 points of accuracy
    # on the width-8 encoder (README, "Attacks").
    c.attack.train.update(batch_size=64 if drupe else 128, epochs=20 if drupe else 15, log_every=10,
                          checkpoint_every=50)
    c.attack.shadow_fraction = 1.0
    if drupe:
      c.attack.lambda2 = 4.0
    else:
      c.attack.optim.lr = 0.01
  return c


def distill_experiment(mode: str, downstream: str, teacher: str, student: str, loss: str,
                       quick: bool) -> ml_collections.ConfigDict:
  """The distillation defense against a BadEncoder/DRUPE (`mode`) encoder backdoored for `downstream`.

  The defense's SSL recipe is the official code's (distillation.md section 8): SimCLR (τ 0.5), Adam 1e-3 with
  coupled weight decay 1e-6, batch 128, 500 epochs, no schedule, on the first 5% of the pre-training set.
  Team choices (unknown in the paper): teacher fine-tuning 100 epochs at the same lr, student warm-up 500 epochs;
  the student is monitored with the linear probe every 50 epochs (the kNN monitor misses BadEncoder's backdoor
  on digits: asr 0 on the poisoned encoder). quick: 20% of digits (287 images) at batch 64; teacher 10, warm-up
  30, distillation 30 epochs, monitored every 5.
  """
  c = encoder_attack_experiment(mode, downstream, "simclr", quick)
  c.experiment = "distill"
  ssl = pretraining("simclr", quick=False)
  ssl.train.update(batch_size=128, epochs=500, log_every=20, checkpoint_every=1000)
  c.defense = ml_collections.ConfigDict(dict(
      suspect_encoder="", clean_fraction=0.05, subset="first",
      teacher=dict(kind=teacher, checkpoint="", model=dict(name="", width=0), epochs=100, lr=1e-3),
      student=dict(init=student, checkpoint="", model=dict(name="", width=0), warmup_epochs=500),
      loss=dict(name=loss, layer_weights=ml_collections.config_dict.placeholder(tuple),
                clone_weight=ml_collections.config_dict.placeholder(float)),
      ssl=ssl, monitor=dict(every_epochs=50, protocol="linear")))
  if quick:
    c.defense.clean_fraction = 0.2
    c.defense.ssl.train.update(batch_size=64, epochs=30, log_every=10, checkpoint_every=100)
    c.defense.teacher.epochs, c.defense.student.warmup_epochs = 10, 30
    c.defense.monitor.every_epochs = 5
  return c


def ctrl_experiment(target: int, method: str, quick: bool) -> ml_collections.ConfigDict:
  """CTRL on the pre-training set with target class `target`, pre-trained with CTRL's recipe."""
  c = pretraining_experiment(method, quick)
  c.experiment = "ctrl"
  if method == "simclr":
    c.pretrain.update(optim=optim("sgd", 0.06, 5e-4, momentum=0.9, schedule="cosine", warmup_epochs=10),
                      augment=augment((0.2, 1.0)))
    c.pretrain.train.update(batch_size=512, epochs=800)
  trigger = triggers.default_config("ctrl")
  c.attack = ml_collections.ConfigDict(dict(clean_encoder="", downstream=c.data.name, target=target,
                                            poison_ratio=0.01, trigger=trigger))
  c.evaluate.datasets = (c.data.name,)
  c.evaluate.knn.t = 0.1
  if quick:
    c.pretrain.train.update(batch_size=128, epochs=25)
    c.pretrain.optim.warmup_epochs = 2
    c.attack.poison_ratio = 0.05
  return c


ENCODER_ATTACKS = ("badencoder", "drupe")


def threat_experiment(threat: int, attack: str, encoder: str, downstream: str,
                      quick: bool) -> ml_collections.ConfigDict:
  """One threat of transfer learning (tcore.md section 3) on `downstream`: the clean SimCLR encoder (pre-trained
  here or config.clean_encoder), `attack` (threat 1: an encoder attack; 2 and 3: a dataset attack, with the
  encoder attack `encoder` in threat 3), then FT-head and FT-all of the clean and the threatened pair.

  Target: BadEncoder's class of the downstream set (TARGETS) for every attack, so threat 3's two attackers agree.
  Fine-tuning (T-Core's are unknown; team choices): head = BadEncoder's 3-layer MLP; random crop (padding 4) and
  flip; FT-head Adam 1e-3, FT-all Adam 1e-4 with cosine decay, both 50 epochs at batch 128. quick (digits): 20 /
  15 epochs at batch 64, FT-all at 1e-3, no flip (digits are not mirror-symmetric).
  """
  if threat not in (1, 2, 3):
    raise ValueError(f"unknown threat {threat}; use 1 (poisoned encoder), 2 (poisoned data) or 3 (both)")
  encoder_attack = attack if threat == 1 else encoder
  if threat == 1 and attack not in ENCODER_ATTACKS:
    raise ValueError(f"threat 1 poisons the encoder: attack must be one of {', '.join(ENCODER_ATTACKS)}, got "
                     f"{attack!r}")
  if threat in (2, 3) and attack not in attacks.ATTACKS:
    raise ValueError(f"threat {threat} poisons the downstream data: attack must be one of "
                     f"{', '.join(attacks.ATTACKS)}, got {attack!r}")
  if threat == 3 and encoder not in ENCODER_ATTACKS:
    raise ValueError(f"unknown encoder attack {encoder!r}; use one of {', '.join(ENCODER_ATTACKS)}")
  c = encoder_attack_experiment(encoder_attack, downstream, "simclr", quick)
  c.experiment = "threat"
  c.threat = threat
  c.clean_encoder = ""
  del c.attack["clean_encoder"]
  dataset = c.attack.downstream
  if threat == 2:
    del c["attack"]
  if threat in (2, 3):
    c.poison = attacks.default_config(attack, quick)
    c.poison.target = TARGETS[dataset]
    classes = catalog.num_classes(dataset)
    c.poison.label_consistent.num_classes = c.poison.input_aware.num_classes = classes  # surrogate classifiers
  if threat == 3:
    del c.attack["trigger"]  # the data attack's test trigger
  c.finetune = ml_collections.ConfigDict(dict(
      dataset=dataset, protocols=("ft_head", "ft_all"), head=dict(hidden=(512, 256), dropout=0.5),
      augment=dict(padding=4, flip_prob=0.5),
      ft_head=dict(optim=optim("adam", 1e-3, 0.0), train=train(128, 50, checkpoint_every=1000)),
      ft_all=dict(optim=optim("adam", 1e-4, 0.0, schedule="cosine"), train=train(128, 50, checkpoint_every=1000))))
  if quick:
    c.finetune.augment.flip_prob = 0.0
    c.finetune.ft_all.optim.lr = 1e-3  # 330 steps: SGD 0.01 and Adam 1e-4 left FT-all undertrained (README)
    c.finetune.ft_head.train.update(batch_size=64, epochs=20, log_every=20, checkpoint_every=200)
    c.finetune.ft_all.train.update(batch_size=64, epochs=15, log_every=20, checkpoint_every=200)
  return c


def data(name: str, quick: bool) -> ml_collections.ConfigDict:
  """The pre-training data set (quick: the embedded digits)."""
  return ml_collections.ConfigDict(dict(name="digits" if quick else name, split="train", data_dir="",
                                        image_size=32))


def model(quick: bool) -> ml_collections.ConfigDict:
  """CIFAR ResNet-18 (quick: width 8) with CIFAR-10 input normalisation."""
  return ml_collections.ConfigDict(dict(name="resnet18", width=8 if quick else 64, mean=CIFAR10_MEAN,
                                        std=CIFAR10_STD))


def evaluate(datasets, quick: bool) -> ml_collections.ConfigDict:
  """Frozen-encoder evaluation: the MLP protocol gives `acc`; kNN and linear probe are monitors."""
  c = ml_collections.ConfigDict(dict(datasets=datasets, protocol="mlp", monitors=("knn", "linear"),
                                     batch_size=512, mlp=mlp_eval(), linear=linear_eval(), knn=knn_eval()))
  if quick:
    c.update(datasets=("digits",), batch_size=256)
    c.mlp.update(epochs=100, lr=1e-3)
  return c


def mlp_eval():
  """BadEncoder's downstream MLP protocol (shared/spec/attacks.md section 6.1)."""
  return ml_collections.ConfigDict(dict(epochs=500, lr=1e-4, batch_size=64, hidden=(512, 256), dropout=0.5))


def linear_eval():
  """Linear probe on standardised features (SSL-Backdoor / CorruptEncoder protocol)."""
  return ml_collections.ConfigDict(dict(epochs=40, lr=0.01, batch_size=256, milestones=(15, 30)))


def knn_eval():
  """Weighted kNN monitor (BadEncoder: k 200, t 0.5)."""
  return ml_collections.ConfigDict(dict(k=200, t=0.5))


def tcore_experiment(threat: int, attack: str, encoder: str, downstream: str, protocol: str,
                     quick: bool) -> ml_collections.ConfigDict:
  """T-Core against one threat (threat_experiment's setting and undefended rows), fine-tuned with `protocol`
  (ft_all, ft_head or both).

  The four components are the paper's; their settings are jaxpurify's reconstruction (tcore.md section 5,
  README "T-Core"). sift: five depths (input, stage1..4), the sum of the nearest-same-label ranks, 20 seeds
  per class. expand: Confusion Training's CIFAR-10 rounds, lambdas and lrs (SGD, momentum 0.7), batch 32 + 32
  seeds, FT-all; the per-round fine-tuning is 10 epochs (CT trains from scratch for 40-100; this starts from a
  pre-trained encoder). filter: CLP's UCLC (no BN eps), the most pruning of u in {2, 2.5, 3, 4, 5} that keeps
  the trusted set's 1-NN accuracy within 1 point. boot: from the seeds, 3 growth stages to 60 / 80 / 95% of each
  class, admitting samples predicted as their label with confidence >= 0.8, 1000 steps per stage with
  config.finetune's optimiser and batch. quick: two rounds (1/2, 1/5) of 150 confusion steps after 5 epochs
  each (Adam 1e-3), 200 steps per bootstrapping stage.
  """
  protocols = {"ft_all": ("ft_all",), "ft_head": ("ft_head",), "both": ("ft_head", "ft_all")}
  if protocol not in protocols:
    raise ValueError(f"unknown protocol {protocol!r}; use one of {', '.join(protocols)}")
  c = threat_experiment(threat, attack, encoder, downstream, quick)
  c.experiment = "tcore"
  c.finetune.protocols = protocols[protocol]
  depths = ("input", "stage1", "stage2", "stage3", "stage4")
  c.tcore = ml_collections.ConfigDict(dict(
      skip=(),
      sift=dict(layers=depths, aggregate="sum", seeds_per_class=20, chunk_rows=1024),
      expand=dict(trainable="all", ratios=(1 / 2, 1 / 5, 1 / 25, 1 / 50, 1 / 100),
                  lambdas=(20.0, 20.0, 20.0, 30.0, 30.0), lrs=(1e-3, 1e-3, 1e-3, 1e-2, 1e-2),
                  iters=(6000, 6000, 6000, 6000, 2000),
                  pretrain_epochs=(10, 10, 10, 10, 10), pretrain_optim=optim("adam", 1e-4, 0.0),
                  momentum=0.7, weight_decay=1e-4, batch_size=32, seed_batch_size=32, min_per_class_fraction=1 / 50,
                  low_loss_fraction=0.4, per_class_cap=0.5, min_seed_fraction=0.5, log_every=100),
      filter=dict(rule="sweep", u=3.0, u_grid=(2.0, 2.5, 3.0, 4.0, 5.0), acc_tol=0.01, std_ddof=1, bn_eps=0.0),
      boot=dict(schedule=(0.6, 0.8, 0.95), conf_threshold=0.8, steps_per_stage=1000)))
  if quick:
    c.tcore.sift.chunk_rows = 256
    c.tcore.expand.update(ratios=(1 / 2, 1 / 5), lambdas=(20.0, 20.0), lrs=(1e-3, 1e-3), iters=(150, 150),
                          pretrain_epochs=(5, 5), pretrain_optim=optim("adam", 1e-3, 0.0), log_every=25)
    c.tcore.boot.steps_per_stage = 200
  return c
