"""The dataset attacks by name and their config blocks (`config.poison`); imports no JAX, so configs load fast.

The attacks' code is in `registry` (poisoning, test triggers) and the auxiliary-model modules; the defaults and their
sources are in each module's docstring and attacks.md section 4.
"""

import dataclasses

import ml_collections

from jaxpurify.data.catalog import CIFAR10_MEAN, CIFAR10_STD

INPUT_AWARE_MEAN = (0.4914, 0.4822, 0.4465)  # Input-aware's reference CIFAR-10 normalisation
INPUT_AWARE_STD = (0.247, 0.243, 0.261)


@dataclasses.dataclass(frozen=True)
class Attack:
  clean_label: bool
  extra: str = ""  # "cross" / "cover": positions that get a trigger but keep their labels


ATTACKS = {
    "badnets": Attack(False), "blended": Attack(False), "trojan": Attack(False), "wanet": Attack(False, "cross"),
    "adaptive_blend": Attack(False, "cover"), "sig": Attack(True), "label_consistent": Attack(True),
    "issba": Attack(False), "input_aware": Attack(False, "cross"),
}
DIRTY_LABEL = tuple(name for name, attack in ATTACKS.items() if not attack.clean_label)
CLEAN_LABEL = tuple(name for name, attack in ATTACKS.items() if attack.clean_label)


def default_config(attack: str, quick: bool) -> ml_collections.ConfigDict:
  """config.poison: the attack's name, who is poisoned and how many (BackdoorBench: all-to-one, rate 0.1,
  attacks.md 4.1), and every attack's own settings (attacks.md 4.2).

  quick (digits): clean-label attacks poison every target-class image (convention 'class', rate 1), which is
  what BackdoorBench's rate 0.1 of the whole set means on a balanced 10-class set; auxiliary models are small.
  seed (positions and the poisoning's randomness): unset follows config.seed, so a seed sweep redraws them.
  """
  if attack not in ATTACKS:
    raise ValueError(f"unknown dataset attack {attack!r}; use one of {', '.join(ATTACKS)}")
  clean_label = ATTACKS[attack].clean_label
  c = ml_collections.ConfigDict(dict(
      attack=attack, target=0, rate=0.1, convention="class" if clean_label and quick else "dataset",
      exclude_target=False, seed=ml_collections.config_dict.placeholder(int),
      badnets=dict(size=3, value=255),
      blended=dict(alpha=0.2, pattern_seed=0),
      trojan=dict(patch_size=8, patch_seed=0),
      wanet=dict(k=4, s=0.5, grid_rescale=1.0, cross_ratio=2.0, grid_seed=0),
      adaptive_blend=dict(alpha=0.15, test_alpha=0.2, pieces=16, masked_fraction=0.5, cover_ratio=1.0,
                          pattern_seed=0),
      sig=dict(delta=40.0, frequency=6.0),
      input_aware=input_aware_config(quick), issba=issba_config(quick),
      label_consistent=label_consistent_config(quick)))
  if clean_label and quick:
    c.rate = 1.0
  if quick:
    # On the blurred 8×8 digits the reference warp (s 0.5, about half a pixel) and its noise-mode cross samples
    # teach FT-all nothing in 15 epochs (asr 1.5); s 4 without cross samples reaches 93.8 (docs/dataset-attacks.md).
    c.wanet.update(s=4.0, cross_ratio=0.0)
  c.input_aware.cross_ratio = 1.0  # the reference's cross count equals the backdoor count
  return c


def label_consistent_config(quick: bool) -> ml_collections.ConfigDict:
  """config.poison.label_consistent: the robust classifier, its PGD adversarial training, the poisoning PGD and the
  trigger (module docstring for the references). quick (digits, ~2 min on 2 CPU cores): width 8, batch 64, 4-step
  PGD-AT for 5 epochs, no flips, 20-step poisoning PGD."""
  return ml_collections.ConfigDict(dict(
      model=dict(name="resnet18", width=8 if quick else 64, mean=CIFAR10_MEAN, std=CIFAR10_STD, dtype="auto"),
      num_classes=10,
      adv_train=dict(eps=8 / 255, step_size=(2.5 if quick else 2) / 255, steps=4 if quick else 7, random_start=True),
      augment=dict(padding=4, flip_prob=0.0 if quick else 0.5),
      optim=dict(name="sgd", lr=0.1, weight_decay=5e-4, momentum=0.9, schedule="cosine", warmup_epochs=0),
      train=dict(batch_size=64 if quick else 128, epochs=5 if quick else 100, log_every=10 if quick else 50,
                 checkpoint_every=50 if quick else 2000, keep_checkpoints=2),
      attack=dict(eps=8 / 255, step_size=1.5 / 255, steps=20 if quick else 100, random_start=False, batch_size=256,
                  quantize="round"),
      trigger=dict(amplitude=1.0, test_amplitude=1.0)))


def issba_config(quick: bool) -> ml_collections.ConfigDict:
  """config.poison.issba: secret, encoder/decoder widths, loss schedule, optimiser and training (module docstring
  for the references). quick: 20-bit secret, narrow nets, Adam 1e-3, 12 epochs (digits: 264 steps, about 1 min on 2
  CPU cores)."""
  return ml_collections.ConfigDict(dict(
      secret_length=20 if quick else 100, secret_seed=0, dtype="auto",
      encoder=dict(widths=(8, 16, 32, 32, 32) if quick else (32, 32, 64, 128, 256)),
      decoder=dict(widths=(8, 8, 16, 16, 16, 32, 32) if quick else (32, 32, 64, 64, 64, 128, 128),
                   strides=(2, 1, 2, 1, 2, 2, 2), hidden=64 if quick else 512),
      loss=dict(bce_weight=1.0, l2_weight=10.0, l2_await=0 if quick else 1000, l2_ramp=100 if quick else 3000,
                l2_start_accuracy=0.9),
      optim=dict(name="adam", lr=1e-3 if quick else 1e-4, weight_decay=0.0, momentum=0.0, schedule="constant",
                 warmup_epochs=0),
      train=dict(batch_size=64, epochs=12 if quick else 20, log_every=10 if quick else 100,
                 checkpoint_every=100 if quick else 2000, keep_checkpoints=2),
      attack=dict(batch_size=256)))


def input_aware_config(quick: bool) -> ml_collections.ConfigDict:
  """config.poison.input_aware (module docstring for the references). quick: G/M widths 8 → 16 → 32, classifier
  width 8, 2 mask epochs + 5 joint epochs, no flips (digits: about 2 minutes on 2 CPU cores)."""
  return ml_collections.ConfigDict(dict(
      model=dict(name="resnet18", width=8 if quick else 64, mean=INPUT_AWARE_MEAN, std=INPUT_AWARE_STD,
                 dtype="auto"),
      num_classes=10,
      widths=(8, 16, 32) if quick else (32, 64, 128),
      pratio=0.1,  # backdoor rows per training batch (and as many cross rows)
      cross_ratio=1.0,  # cross samples per poisoned sample in the poisoned set the harness writes
      lambda_div=1.0, lambda_norm=100.0, mask_density=0.032, epsilon=1e-7,
      augment=dict(padding=5, flip_prob=0.0 if quick else 0.5),
      optim=dict(
          classifier=dict(name="sgd", lr=0.01, momentum=0.9, weight_decay=5e-4, betas=(0.9, 0.999),
                          milestones=(100, 200, 300, 400), gamma=0.1),
          generator=dict(name="adam", lr=0.01, momentum=0.0, weight_decay=0.0, betas=(0.5, 0.9),
                         milestones=(200, 300, 400, 500), gamma=0.1),
          mask=dict(name="adam", lr=0.01, momentum=0.0, weight_decay=0.0, betas=(0.5, 0.9), milestones=(10, 20),
                    gamma=0.1)),
      train=dict(batch_size=128, mask_epochs=2 if quick else 25, epochs=5 if quick else 100,
                 log_every=10 if quick else 50, checkpoint_every=50 if quick else 2000, keep_checkpoints=2),
      poison_batch_size=256))
