"""The three threats of transfer learning (tcore.md section 3): the setting every downstream experiment shares.

- threat 1: a poisoned encoder (config.attack: BadEncoder/DRUPE fine-tuning, or CTRL/SSL-Backdoor/CorruptEncoder
  poisoning of the pre-training set) fine-tuned on clean downstream data;
- threat 2: the clean encoder fine-tuned on poisoned downstream data (config.poison);
- threat 3: both, with one trigger and one target: the encoder attack uses the data attack's test trigger.

`setting(run, mesh)` makes the threat; `undefended_rows` fine-tunes the clean pair and the victim: rows
`clean/<protocol>` and `poisoned/<protocol>`, each with acc and asr/asr_all of the threat's trigger.
Stages: pretrain (or config.clean_encoder), attack_poison (the poisoned pre-training set of CTRL, SSL-Backdoor,
CorruptEncoder: attack_poison/poisoned_pretrain.npz and samples.png), attack, poison_model (attacks with an
auxiliary model), poison (the poisoned set in poison/poisoned_train.npz and poison/samples.png),
finetune_<row>_<protocol>.
"""

import os
from collections.abc import Callable
from typing import NamedTuple

import jax
import numpy as np

from jaxpurify import (
  data,
  encoders,
  finetune,
  parallel,
  plots,
  stages,
  triggers,
  validation,
)
from jaxpurify.attacks import pretrain_poisoning
from jaxpurify.encoders import Encoder
from jaxpurify.errors import UserError, moved
from jaxpurify.poisoning import registry

POISONED_FILE = "poisoned_train.npz"
__getattr__ = moved(__name__, {**{name: f"jaxpurify.finetune.{name}" for name in (
    "finetune_training", "finetune_stage", "evaluate_classifier")}, "threat": "jaxpurify.experiments.threat.run"})


def poison_block(config):
  """config.poison with its seed set: config.poison.seed, or config.seed where that is unset. Under a smoke run's
  step cap (config.limits.max_steps) the Label-Consistent PGDs (adversarial training's and the poisoning's) also
  take at most that many iterations: the same shapes and code, minutes instead of hours on a CPU."""
  block = config.poison.copy_and_resolve_references()
  if block.seed is None:
    block.seed = config.seed
  cap = config.limits.max_steps
  if cap and "label_consistent" in block:
    for pgd in (block.label_consistent.adv_train, block.label_consistent.attack):
      pgd.steps = min(pgd.steps, cap)
  return block


def poison_model(run, config, split: data.ImageSplit, mesh):
  """The trained state of the attack's auxiliary model (stage `poison_model`), or None if it has none."""
  block = poison_block(config)
  if block.attack not in registry.AUXILIARY:
    return None
  module, settings = registry.AUXILIARY[block.attack], block[block.attack]
  state, step, batch_fn, num_steps = module.training(settings, split.images, split.labels, block.target, mesh,
                                                     block.seed)
  return stages.trained(run, "poison_model", state, num_steps, lambda: stages.train(
      run, "poison_model", state, step, batch_fn, settings.train, num_steps, mesh, block.seed))


def poison_data(run, config, split: data.ImageSplit, mesh):
  """-> (PoisonedSet, test trigger): the poisoned training set, made once (stage `poison`) and then loaded from
  poison/poisoned_train.npz, and the trigger that measures the attack."""
  block = poison_block(config)
  aux_state = poison_model(run, config, split, mesh)
  trigger = registry.test_trigger(block, split.images.shape[1], aux_state)
  path = os.path.join(run.stage_dir("poison"), POISONED_FILE)
  if run.done("poison"):
    return registry.load(path, split, block)[0], trigger
  poisoned = registry.poison(block, split.images, split.labels, mesh, aux_state)
  if jax.process_index() == 0:
    registry.save(path, poisoned, block)
    shown = np.concatenate([poisoned.poison[:8], poisoned.extra[:8]])[:8]
    triggered = np.asarray(jax.jit(trigger)(split.images[shown]))
    plots.plot_trigger_grid({"clean": split.images[shown], "training poison": poisoned.images[shown],
                             "test trigger": triggered},
                            os.path.join(run.workdir, "poison", "samples.png"),
                            f"{block.attack}: target {block.target}, {len(poisoned.poison)} poisoned"
                            + (f", {len(poisoned.extra)} {extra}" if (extra := registry.ATTACKS[block.attack].extra)
                               else ""))
  run.finish("poison", {"poisoned": len(poisoned.poison), "extra": len(poisoned.extra),
                        "examples": len(poisoned.labels), "poison_indices": poisoned.poison.tolist(),
                        "extra_indices": poisoned.extra.tolist()})
  return poisoned, trigger


class Setting(NamedTuple):
  """A threat, made: the clean encoder, the victim's encoder and training data, the test split and the backdoor.

  poison: the positions of the poisoned training samples (empty under threat 1), for the defenses' diagnostics.
  reserve: the defender's clean labelled images, held out of `train` before poisoning (config.baseline.clean_fraction;
  None without a baseline block).
  """
  clean: Encoder
  encoder: Encoder
  train: data.ImageSplit
  victim_images: np.ndarray
  victim_labels: np.ndarray
  poison: np.ndarray
  test: data.ImageSplit
  trigger: Callable
  target: int
  reserve: data.ImageSplit | None = None


def clean_reserve(labels: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
  """The defender's hold-out: round(fraction x class size) positions of each class, drawn with `seed`; labels [N]
  -> (kept, reserved) sorted int64 positions. UserError when a class would give the reserve nothing or everything."""
  rng, reserved = np.random.default_rng(seed), []
  for c in np.unique(labels):
    members = np.flatnonzero(labels == c)
    count = round(fraction * len(members))
    if not 0 < count < len(members):
      raise UserError(f"config.baseline.clean_fraction {fraction} leaves class {c} ({len(members)} training images) "
                      f"with {count} clean reserve images {'and none to train on' if count else ''}; use a fraction "
                      f"that gives every class at least one reserve image and leaves it at least one")
    reserved.append(rng.permutation(members)[:count])
  reserved = np.sort(np.concatenate(reserved))
  return np.setdiff1d(np.arange(len(labels)), reserved), reserved


def _subset(split: data.ImageSplit, positions: np.ndarray) -> data.ImageSplit:
  return data.ImageSplit(split.images[positions], split.labels[positions], split.num_classes, split.name, split.split)


def victim_and_reserve(config, train: data.ImageSplit) -> tuple[data.ImageSplit, data.ImageSplit | None]:
  """The downstream training split the victim trains on and the defender's reserve (None without config.baseline)."""
  if "baseline" not in config:
    return train, None
  kept, reserved = clean_reserve(train.labels, config.baseline.clean_fraction, config.seed)
  return _subset(train, kept), _subset(train, reserved)


def setting(run, mesh) -> Setting:
  """clean encoder -> [encoder attack] / [poisoned downstream set]: the stages every threat experiment shares."""
  config = run.config
  clean = stages.clean_encoder(run, config, mesh, config.clean_encoder, "config.clean_encoder")
  name = config.finetune.dataset
  train, reserve = victim_and_reserve(config, stages.load_data(config, name, "train"))
  test = stages.load_evaluation(config, name, "test")
  victim_images, victim_labels, poison = train.images, train.labels, np.zeros(0, np.int64)
  if "poison" in config:
    poisoned, trigger = poison_data(run, config, train, mesh)
    victim_images, victim_labels, poison, target = (poisoned.images, poisoned.labels, poisoned.poison,
                                                    config.poison.target)
  else:
    trigger, target = encoder_attack_trigger(config), config.attack.target
  encoder = clean
  if "attack" in config:
    encoder = attacked_encoder(run, config, clean, mesh, trigger if "poison" in config else None)
  return Setting(clean, encoder, train, victim_images, victim_labels, poison, test, trigger, target, reserve)


def encoder_attack_trigger(config):
  """The test trigger of config.attack (threat 1): its trigger block's, or a pre-training poisoning attack's."""
  if config.attack.get("mode") in pretrain_poisoning.KINDS:
    return pretrain_poisoning.test_trigger(config.attack, config.data.image_size, config.seed)
  return triggers.make_trigger(config.attack.trigger, config.data.image_size)


def attacked_encoder(run, config, clean: Encoder, mesh, trigger=None) -> Encoder:
  """config.attack's encoder (stage `attack`): BadEncoder/DRUPE fine-tuning of `clean`, or pre-training on the set a
  poisoning attack made (stage `attack_poison`); `trigger` (threat 3) replaces the attack's own."""
  if config.attack.get("mode") in pretrain_poisoning.KINDS:
    return pretrain_poisoning.poisoned_encoder(run, config, mesh, "attack_poison", "attack", trigger)
  return stages.attack_encoder(run, "attack", config, clean, mesh, trigger)


def undefended_rows(run, setting_: Setting, mesh) -> dict:
  """FT of the clean pair and of the threatened pair, per protocol: {'clean/<protocol>': {acc, asr, asr_all},
  'poisoned/<protocol>': ...}."""
  config, s = run.config, setting_
  rows = {}
  for protocol in config.finetune.protocols:
    rows[f"clean/{protocol}"] = finetune.finetune_stage(
        run, f"finetune_clean_{protocol}", config, protocol, s.clean, s.train.images, s.train.labels, s.test,
        s.trigger, s.target, mesh)
    rows[f"poisoned/{protocol}"] = finetune.finetune_stage(
        run, f"finetune_poisoned_{protocol}", config, protocol, s.encoder, s.victim_images, s.victim_labels, s.test,
        s.trigger, s.target, mesh)
  return rows


def check(config) -> None:
  """Fails fast on a threat config that cannot run: threat number, protocols, attack settings, target."""
  if config.threat not in (1, 2, 3):
    raise UserError(f"unknown threat {config.threat}; use 1 (poisoned encoder), 2 (poisoned data) or 3 (both)")
  for protocol in config.finetune.protocols:
    if protocol not in finetune.PROTOCOLS:
      raise UserError(f"unknown fine-tuning protocol {protocol!r}; set config.finetune.protocols to some "
                      f"of {', '.join(finetune.PROTOCOLS)}")
  if ("attack" in config) != (config.threat in (1, 3)) or ("poison" in config) != (config.threat in (2, 3)):
    needs = {1: "config.attack and no config.poison", 2: "config.poison and no config.attack",
             3: "both config.attack and config.poison"}[config.threat]
    raise UserError(f"threat {config.threat} needs {needs}; build the config with configs/threat.py")
  if config.clean_encoder:
    encoders.load_backbone(config.clean_encoder, config.model, parallel.make_mesh(config.mesh),
                           field="config.clean_encoder")
  train = victim_and_reserve(config, stages.load_data(config, config.finetune.dataset, "train"))[0]
  for protocol in config.finetune.protocols:
    validation.check_fits(config, f"finetune.{protocol}.train.batch_size", len(train.labels),
                          f"{train.name} training images")
  if "poison" in config:
    registry.check(poison_block(config), train.images.shape[1], train.labels)
    if "train" in config.poison.get(config.poison.attack, {}):
      validation.check_fits(config, f"poison.{config.poison.attack}.train.batch_size", len(train.labels),
                            f"{train.name} training images")
  if "attack" in config and "poison" in config and config.attack.target != config.poison.target:
    raise UserError(f"threat 3 uses one target class, but config.attack.target is {config.attack.target} "
                    f"and config.poison.target {config.poison.target}; set them equal")
