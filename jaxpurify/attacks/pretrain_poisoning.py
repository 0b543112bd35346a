"""The attacks that poison the pre-training set (CTRL, SSL-Backdoor, CorruptEncoder) as one encoder attack:
the poisoned set, saved once as an artefact, then an encoder pre-trained on it with config.pretrain.

config.attack: `mode` (one of KINDS), `target` (the class whose images are poisoned or referenced; in the threat
harness `pretrain_target`, with `target` the downstream class the asr counts), `trigger` (absent in threat 3: the
data attack's test trigger is applied instead of the attack's own) and the attack's fields (configs/ctrl.py,
configs/ssl_backdoor.py, configs/corruptencoder.py).

Artefacts of the poison stage: `<stage>/poisoned_pretrain.npz` (the poisoned images uint8 [P, H, W, 3], their
positions in the pre-training set and the attack's random choices) and `<stage>/samples.png`.
"""

import os

import jax
import numpy as np

from jaxpurify import data, plots, stages, triggers
from jaxpurify.attacks import corruptencoder, ctrl, patches, ssl_backdoor
from jaxpurify.encoders import Encoder
from jaxpurify.errors import UserError

KINDS = ("ctrl", "ssl_backdoor", "corruptencoder")
POISONED_FILE = "poisoned_pretrain.npz"
SHOWN = 8


def poisoned_class(attack) -> int:
  """The class of the pre-training set the attack poisons: attack.pretrain_target where set, else attack.target."""
  return attack.pretrain_target if "pretrain_target" in attack else attack.target


def test_trigger(attack, image_size: int, seed: int):
  """The trigger the asr columns stamp on downstream test images (uint8 batch -> uint8 batch, jittable): CTRL's
  frequency trigger; the patch at a random location within attack.test_location (SSL-Backdoor's validation
  rule, also used for CorruptEncoder), positions drawn from `seed`."""
  if attack.mode == "ctrl":
    return triggers.make_trigger(attack.trigger, image_size)
  patch = patches.trigger_patch(attack.trigger)
  return patches.random_paste(patch, patches.window(image_size, len(patch), *attack.test_location, "test_location"),
                              seed)


def poison(attack, split: data.ImageSplit, seed: int, trigger=None) -> tuple[np.ndarray, dict]:
  """-> (the pre-training images with the poison, uint8 [N', H, W, 3], N' = N or N + P for CorruptEncoder,
  {name: array} of what was done: `positions` int64 [P] of the poisoned images in the returned set, and the
  attack's random choices). `trigger` (a jittable uint8 map, threat 3) replaces the attack's own trigger."""
  images, labels, target = split.images, split.labels, poisoned_class(attack)
  if attack.mode == "ctrl":
    index = ctrl.poison_indices(labels, target, attack.poison_ratio)
    return ctrl.poison(images, index, trigger or triggers.make_trigger(attack.trigger, images.shape[1])), {
        "positions": index.astype(np.int64)}
  if attack.mode == "ssl_backdoor":
    index = ssl_backdoor.poison_indices(labels, target, attack.poison_rate, seed)
    if trigger is not None:
      return ctrl.poison(images, index, trigger), {"positions": index}
    patch = patches.trigger_patch(attack.trigger)
    bounds = patches.window(images.shape[1], len(patch), *attack.train_location, "train_location")
    poisoned, where = ssl_backdoor.poison(images, index, patch, bounds, seed)
    return poisoned, {"positions": index, "trigger_positions": where}
  if attack.mode == "corruptencoder":
    patch = None if trigger is not None else patches.trigger_patch(attack.trigger)
    added, plan = corruptencoder.poison(images, labels, target, attack, patch, seed)
    if trigger is not None and len(added):
      added = np.asarray(jax.jit(trigger)(added))
    positions = np.arange(len(images), len(images) + len(added), dtype=np.int64)
    return np.concatenate([images, added]), {"positions": positions, **plan._asdict()}
  raise UserError(f"unknown pre-training poisoning attack {attack.mode!r}; set config.attack.mode to one of "
                  f"{', '.join(KINDS)}")


def check(config) -> None:
  """Everything the poisoning needs, on the labelled pre-training split, without compiling: the target class and
  count, the trigger and its windows, CorruptEncoder's references and backgrounds."""
  attack = config.attack
  if attack.mode not in KINDS:
    raise UserError(f"unknown pre-training poisoning attack {attack.mode!r}; set config.attack.mode to one of "
                    f"{', '.join(KINDS)}")
  split = stages.load_data(config, config.data.name, config.data.split)
  target, field = poisoned_class(attack), "pretrain_target" if "pretrain_target" in attack else "target"
  if (split.labels < 0).all():
    raise UserError(f"{attack.mode} poisons target-class images, but {config.data.name} {config.data.split} has no "
                    "labels; pre-train on a labelled split (config.data.split)")
  if target < 0 and field == "pretrain_target":
    raise UserError(f"{config.data.name} has no class matching the downstream {attack.downstream}'s target "
                    f"{attack.target}, so {attack.mode} has no class to poison; use downstream=stl10 (truck) or set "
                    "config.attack.pretrain_target to a class of the pre-training set")
  if not 0 <= target < split.num_classes:
    raise UserError(f"config.attack.{field}={target} is not a class of the pre-training set {config.data.name} "
                    f"(0-{split.num_classes - 1}); set config.attack.{field} to the class to poison")
  size = config.data.image_size
  if "trigger" in attack:
    test_trigger(attack, size, config.seed)
  if attack.mode == "ssl_backdoor" and "trigger" in attack:
    patches.window(size, attack.trigger.size, *attack.train_location, "train_location")
  if attack.mode == "corruptencoder":
    patch = patches.trigger_patch(attack.trigger) if "trigger" in attack else None
    count = len(corruptencoder.poison(split.images, split.labels, target, attack, patch, config.seed)[0])
  elif attack.mode == "ssl_backdoor":
    count = len(ssl_backdoor.poison_indices(split.labels, target, attack.poison_rate, config.seed))
  else:
    count = len(ctrl.poison_indices(split.labels, target, attack.poison_ratio))
  if not count:
    raise UserError(f"{attack.mode} poisons no image of {config.data.name} {config.data.split} (class {target}); "
                    f"raise config.attack.{'poison_rate' if attack.mode == 'ssl_backdoor' else 'poison_ratio'} or "
                    f"choose another config.attack.{field}")


def poisoned_images(run, stage: str, config, trigger=None) -> np.ndarray:
  """The pre-training images with config.attack's poison (deterministic for config.seed); the first time, the
  stage `stage` writes its artefacts and records the poisoned positions."""
  split = stages.load_data(config, config.data.name, config.data.split)
  images, record = poison(config.attack, split, config.seed, trigger)
  positions = record["positions"]
  if run.done(stage) is None:
    if jax.process_index() == 0:
      directory = run.stage_dir(stage)
      np.savez_compressed(os.path.join(directory, POISONED_FILE), poisoned_images=images[positions],
                          config=np.asarray(config.attack.to_json()), **record)
      plot_samples(config, split, images, record, trigger, os.path.join(directory, "samples.png"))
    run.finish(stage, {"poisoned": len(positions), "examples": len(images), "poisoned_positions": positions.tolist()})
  return images


def plot_samples(config, split: data.ImageSplit, images: np.ndarray, record: dict, trigger, path: str) -> None:
  """samples.png: the first poisoned images before (for CorruptEncoder: the background) and after poisoning,
  and the clean ones under the test trigger."""
  attack, shown = config.attack, record["positions"][:SHOWN]
  if attack.mode == "corruptencoder":
    background = record["background"][:SHOWN]
    before = np.where((background >= 0)[:, None, None, None], split.images[np.maximum(background, 0)], 0)
  else:
    before = split.images[shown]
  test = trigger or test_trigger(attack, config.data.image_size, config.seed)
  rows = {"clean" if attack.mode != "corruptencoder" else "background": before, "training poison": images[shown],
          "test trigger": np.asarray(jax.jit(test)(before))}
  plots.plot_trigger_grid(rows, path, f"{attack.mode}: class {poisoned_class(attack)} of {config.data.name}, "
                          f"{len(record['positions'])} poisoned of {len(images)}")


def poisoned_encoder(run, config, mesh, poison_stage: str, pretrain_stage: str, trigger=None) -> Encoder:
  """config.pretrain on the poisoned pre-training set (stage `pretrain_stage`) -> the poisoned backbone."""
  return stages.pretrain_ssl(run, pretrain_stage, config, mesh,
                             images=poisoned_images(run, poison_stage, config, trigger))

