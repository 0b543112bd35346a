"""Shared config pieces: the `:key=val,flag` argument language and the blocks several configs use.

Each experiment's config file builds its own config from these blocks and from the files it extends (by import:
`configs/drupe.py` is `configs/badencoder.py`'s builder with another mode). Loading a config imports no JAX.
"""

import ml_collections

from jaxpurify.data.catalog import CIFAR10_MEAN, CIFAR10_STD


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


def build(arg: str | None, experiment, **defaults) -> ml_collections.ConfigDict:
  """A config file's get_config: `arg` parsed over `defaults` plus the three size words every config takes, then
  experiment(**arguments, quick=...).

  quick: the run sized for a 2-core CPU (the embedded digits, a narrow encoder, short schedules).
  tiny: quick, shrunk further to test size (`tiny`): seconds of training, for the test suite.
  smoke: the full config at a few steps on mock data where data is not prepared (`smoke`), to prove a full path.
  """
  parsed = parse_arg(arg, **defaults, quick=False, tiny=False, smoke=False)
  if parsed.smoke and (parsed.quick or parsed.tiny):
    raise ValueError("smoke is the full config at a few steps; use it without quick or tiny")
  arguments = {key: parsed[key] for key in defaults}
  config = experiment(**arguments, quick=parsed.quick or parsed.tiny)
  config.limits = limits()
  config.data.mock_examples = 0
  if parsed.smoke:
    smoke(config)
  return tiny(config) if parsed.tiny else config


def limits() -> ml_collections.ConfigDict:
  """Caps for smoke runs, 0 = none: steps per training stage, examples per evaluated split."""
  return ml_collections.ConfigDict(dict(max_steps=0, max_eval_examples=0))


def smoke(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The full config at a few steps: the same model, batches, image sizes, classes, data sets and stages, with
  every training stage capped at 3 steps, every evaluated split at 256 examples, and data sets that are not
  prepared served by tfds mock data (5,000 examples per split, STL-10's train size, from the real feature specs,
  labels balanced: enough for the defender's 5% to fill a batch of 128 and for a clean-label attack's 10%)."""
  c.limits.update(max_steps=3, max_eval_examples=256)
  c.data.mock_examples = 5000
  return c


def tiny(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """A quick config shrunk to test size, every block it has: ResNet-10 at width 4 (a ViT, `encoder=vit_tiny`, stays
  one, at width 4; BYOL's heads 16 wide), 2
  pre-training epochs at batch 64, a 5-epoch MLP evaluation with the kNN monitor (a 5-epoch linear probe where a
  monitor asks for it), 1 attack epoch at batch 128, 1-2 epochs of each defense stage, 1 fine-tuning epoch, one
  confusion round and a few steps of each T-Core stage and each baseline defense, a few of the attacks' auxiliary
  models."""
  c.model.update(name=c.model.name if c.model.name.startswith("vit") else "resnet10", width=4)
  c.pretrain.head.dim = 8
  if "byol" in c.pretrain:
    c.pretrain.head.hidden = c.pretrain.byol.predictor_hidden = 16
  c.pretrain.train.update(epochs=2, batch_size=64, log_every=4, checkpoint_every=8)
  c.evaluate.monitors = ("knn",)
  c.evaluate.mlp.epochs = 5
  c.evaluate.linear.update(epochs=5, milestones=(3, 4))
  if "attack" in c and "train" in c.attack:
    c.attack.train.update(epochs=1, batch_size=128, log_every=5, checkpoint_every=10)
  if "defense" in c:
    c.defense.teacher.epochs, c.defense.student.warmup_epochs = 1, 1
    c.defense.ssl.head.dim = 8
    c.defense.ssl.train.update(epochs=2, log_every=2)
    c.defense.monitor.every_epochs = 1
  if "finetune" in c:
    c.finetune.ft_head.train.epochs = c.finetune.ft_all.train.epochs = 1
  if "poison" in c:
    c.poison.label_consistent.train.epochs = c.poison.issba.train.epochs = 1
    c.poison.label_consistent.attack.steps = 2
    c.poison.input_aware.train.update(mask_epochs=1, epochs=1)
  if "tcore" in c:
    e = c.tcore.expand
    e.update(ratios=e.ratios[:1], lambdas=e.lambdas[:1], lrs=e.lrs[:1], iters=(4,), pretrain_epochs=(1,))
    c.tcore.boot.update(schedule=(0.6,), steps_per_stage=2)
    c.tcore.filter.u_grid = (3.0,)
  if "baseline" in c and "strip" in c.baseline:  # the threat harness's methods
    b = c.baseline
    b.strip.blends = 4
    b.ct.update(ratios=b.ct.ratios[:1], lambdas=b.ct.lambdas[:1], lrs=b.ct.lrs[:1], iters=(4,), pretrain_epochs=(1,))
    b.asset.update(inner_steps=2, epochs=1)
    b.abl.update(isolation_epochs=1, unlearn_epochs=1)
    b.ft.epochs = 2
    b.anp.iters = 4
    b.rnp.update(unlearn_epochs=2, recover_epochs=2)
    b.fp.epochs = 2
    b.nad.update(teacher_epochs=1, epochs=1)
    b.ibau.rounds = 1
  if "baseline" in c and "mimic" in c.baseline:  # the encoder-side methods
    c.baseline.mimic.update(epochs=2, mi_epochs=2, mi_batch_size=32, mi_last_epochs=1)
  if "baseline" in c and "decree" in c.baseline:
    c.baseline.decree.epochs = 2
  if "baseline" in c and "ssl_cleanse" in c.baseline:
    c.baseline.ssl_cleanse.update(num_clusters=2, kmeans_restarts=1, trigger_epochs=1, knn_sample_num=16,
                                  head=dict(hidden=16, dim=8), predictor_hidden=16, train=dict(epochs=1, log_every=2))
  return c


def mesh():
  """Data parallelism over every device (a tuple, so `--config.mesh="(('data', 4),)"` overrides it)."""
  return (("data", -1),)


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


def vit_recipe(block: ml_collections.ConfigDict, quick: bool) -> ml_collections.ConfigDict:
  """A pre-training block (`pretraining`) with the ViT recipe in place of its optimiser: AdamW with decoupled
  weight decay 0.05 (DeiT) on weights only (no decay on biases, LayerNorm scales, position embeddings, class token),
  linear warm-up then cosine decay to 0. Full: MoCo v3's ViT learning rate 1.5e-4 per 256 images (scaled to the
  block's batch) and 40 warm-up epochs. Quick (ours, for the 25-epoch digits runs): lr 1e-3, 3 warm-up epochs."""
  lr = 1e-3 if quick else 1.5e-4 * block.train.batch_size / 256
  block.optim = optim("adamw", lr, 0.05, schedule="cosine", warmup_epochs=3 if quick else 40)
  return block


def data(name: str, quick: bool) -> ml_collections.ConfigDict:
  """The pre-training data set (quick: the embedded digits)."""
  return ml_collections.ConfigDict(dict(name="digits" if quick else name, split="train", data_dir="",
                                        image_size=32))


def model(quick: bool) -> ml_collections.ConfigDict:
  """CIFAR ResNet-18 (quick: width 8) with CIFAR-10 input normalisation. import_map: how an encoder given as a
  PyTorch file maps onto it ('auto', 'badencoder', 'torchvision', 'ctrl', 'STYLE:PREFIX'; docs/interop.md).
  dtype: the compute dtype of convolutions and matmuls ('auto': bfloat16 on GPU/TPU, float32 on CPU; 'float32',
  'bfloat16'); parameters, optimiser state, BatchNorm statistics and losses stay float32. vit: the options of
  name=vit_tiny | vit_small (patch size, the image size its position embeddings are made for, 'cls' or 'mean'
  pooling); a ViT's width is its channels per attention head (64 at full size: ViT-Tiny D = 192)."""
  return ml_collections.ConfigDict(dict(name="resnet18", width=8 if quick else 64, mean=CIFAR10_MEAN,
                                        std=CIFAR10_STD, import_map="auto", dtype="auto",
                                        vit=dict(patch=4, image_size=32, pool="cls")))


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


def trigger(kind: str) -> ml_collections.ConfigDict:
  """The `config.attack.trigger` block of `kind` with its defaults (jaxpurify.triggers.make_trigger).

  patch: BadEncoder's white 10×10 at (21, 21). patch_file: BadEncoder's file format, path to set. ctrl: CTRL's
  README command (`--channel 1 2 --trigger_position 15 31 --magnitude 100 --window_size 32`). The patch block also
  has `path`, so that `--config.attack.trigger.kind=patch_file --config.attack.trigger.path=FILE` switches to a file.
  """
  if kind == "patch":
    fields = dict(size=10, position=(21, 21), pattern="white", seed=0, path="")
  elif kind == "patch_file":
    fields = dict(path="")
  elif kind == "ctrl":
    fields = dict(magnitude=100.0, channels=(1, 2), positions=((15, 15), (31, 31)), window=32)
  else:
    raise ValueError(f"unknown trigger kind {kind!r}; use 'patch', 'patch_file' or 'ctrl'")
  return ml_collections.ConfigDict(dict(kind=kind, **fields))
