"""The three threats of transfer learning (tcore.md section 3) as one experiment, and its stages.

- threat 1: a poisoned encoder (BadEncoder/DRUPE, config.attack) fine-tuned on clean downstream data;
- threat 2: the clean encoder fine-tuned on poisoned downstream data (config.poison);
- threat 3: both, with one trigger and one target: the encoder attack uses the data attack's test trigger.

Rows `clean/<protocol>` (the clean encoder fine-tuned on clean data) and `poisoned/<protocol>` (the undefended
victim under the threat), each with acc and asr/asr_all of the threat's trigger, for FT-head and FT-all.
Stages: pretrain (or config.clean_encoder), attack, poison_model (attacks with an auxiliary model), poison (the
poisoned set in poison/poisoned_train.npz and poison/samples.png), finetune_<row>_<protocol>.
"""

import os

import jax
import numpy as np

from jaxpurify import data, encoders, finetune, parallel, plots, stages, triggers
from jaxpurify.data.device import DeviceDataset
from jaxpurify.encoders import Encoder
from jaxpurify.errors import UserError
from jaxpurify.evaluation.metrics import backdoor_metrics
from jaxpurify.poisoning import attacks
from jaxpurify.train import checkpoint
from jaxpurify.train.state import create_state, make_optimizer

POISONED_FILE = "poisoned_train.npz"


def poison_model(run, config, split: data.ImageSplit, mesh):
  """The trained state of the attack's auxiliary model (stage `poison_model`), or None if it has none."""
  block = config.poison
  if block.attack not in attacks.AUXILIARY:
    return None
  module, settings = attacks.AUXILIARY[block.attack], block[block.attack]
  state, step, batch_fn, num_steps = module.training(settings, split.images, split.labels, block.target, mesh,
                                                     block.seed)
  if run.done("poison_model"):
    return checkpoint.load_latest(f"{run.stage_dir('poison_model')}/ckpt", state)
  state = stages.train(run, "poison_model", state, step, batch_fn, settings.train, num_steps, mesh, block.seed)
  run.finish("poison_model", {"steps": num_steps})
  return state


def poison_data(run, config, split: data.ImageSplit, mesh):
  """-> (PoisonedSet, test trigger): the poisoned training set, made once (stage `poison`) and then loaded from
  poison/poisoned_train.npz, and the trigger that measures the attack."""
  block = config.poison
  aux_state = poison_model(run, config, split, mesh)
  trigger = attacks.test_trigger(block, split.images.shape[1], aux_state)
  path = os.path.join(run.stage_dir("poison"), POISONED_FILE)
  if run.done("poison"):
    return attacks.load(path)[0], trigger
  poisoned = attacks.poison(block, split.images, split.labels, mesh, aux_state)
  if jax.process_index() == 0:
    attacks.save(path, poisoned, block)
    shown = np.concatenate([poisoned.poison[:8], poisoned.extra[:8]])[:8]
    triggered = np.asarray(jax.jit(trigger)(split.images[shown]))
    plots.plot_trigger_grid({"clean": split.images[shown], "training poison": poisoned.images[shown],
                             "test trigger": triggered},
                            os.path.join(run.workdir, "poison", "samples.png"),
                            f"{block.attack}: target {block.target}, {len(poisoned.poison)} poisoned"
                            + (f", {len(poisoned.extra)} {extra}" if (extra := attacks.ATTACKS[block.attack].extra)
                               else ""))
  run.finish("poison", {"poisoned": len(poisoned.poison), "extra": len(poisoned.extra),
                        "examples": len(poisoned.labels), "poison_indices": poisoned.poison.tolist(),
                        "extra_indices": poisoned.extra.tolist()})
  return poisoned, trigger


def finetune_training(config, protocol: str, encoder: Encoder, images: np.ndarray, labels: np.ndarray,
                      num_classes: int, mesh):
  """-> (graphdef, state at step 0, jitted donating step, DeviceDataset, number of steps) of `protocol` on
  uint8 images [N, H, W, 3] with labels [N], starting from `encoder`."""
  ft, block = config.finetune, config.finetune[protocol]
  dataset = DeviceDataset({"image": images, "label": labels.astype(np.int32)}, mesh, block.train.batch_size,
                          config.seed)
  num_steps = block.train.epochs * dataset.steps_per_epoch
  trainable = finetune.head_only if protocol == "ft_head" else None
  tx = make_optimizer(block.optim, num_steps, dataset.steps_per_epoch, trainable=trainable)
  graphdef, state = create_state(lambda: finetune.build_classifier(encoder, num_classes, ft.head, config.seed),
                                 tx, mesh)
  step = jax.jit(finetune.make_step(graphdef, tx, protocol, ft.augment, config.model.mean, config.model.std),
                 donate_argnums=0)
  return graphdef, state, step, dataset, num_steps


def finetune_stage(run, stage: str, config, protocol: str, encoder: Encoder, images, labels,
                   test: data.ImageSplit, trigger, target: int, mesh) -> dict:
  """Fine-tunes `encoder` on (images, labels) with `protocol`, then -> {acc, asr, asr_all} on `test`."""
  if (record := run.done(stage)) is not None:
    return record["evaluation"]
  graphdef, state, step, dataset, num_steps = finetune_training(config, protocol, encoder, images, labels,
                                                                test.num_classes, mesh)
  state = stages.train(run, stage, state, step, dataset.batch, config.finetune[protocol].train, num_steps, mesh,
                       config.seed)
  batch = config.evaluate.batch_size
  mean, std = config.model.mean, config.model.std
  clean = finetune.predict(finetune.predict_fn(graphdef, state, mean, std), test.images, batch, mesh)
  triggered = finetune.predict(finetune.predict_fn(graphdef, state, mean, std, trigger), test.images, batch, mesh)
  evaluation = backdoor_metrics(clean, test.labels, triggered, target)
  run.finish(stage, {"steps": num_steps, "evaluation": evaluation})
  return evaluation


def threat(run, mesh) -> dict:
  """clean encoder -> [encoder attack] / [poisoned downstream set] -> FT-head and FT-all of the clean and the
  threatened pair -> {'clean/ft_head': {acc, asr, asr_all}, 'poisoned/ft_head': ..., ...}."""
  config = run.config
  clean = stages.clean_encoder(run, config, mesh, config.clean_encoder, "config.clean_encoder")
  name = config.finetune.dataset
  train, test = stages.load_data(config, name, "train"), stages.load_data(config, name, "test")
  victim_images, victim_labels = train.images, train.labels
  if "poison" in config:
    poisoned, trigger = poison_data(run, config, train, mesh)
    victim_images, victim_labels, target = poisoned.images, poisoned.labels, config.poison.target
  else:
    trigger, target = triggers.make_trigger(config.attack.trigger, config.data.image_size), config.attack.target
  encoder = clean
  if "attack" in config:
    encoder = stages.attack_encoder(run, "attack", config, clean, mesh, trigger if "poison" in config else None)
  rows = {}
  for protocol in config.finetune.protocols:
    rows[f"clean/{protocol}"] = finetune_stage(run, f"finetune_clean_{protocol}", config, protocol, clean,
                                               train.images, train.labels, test, trigger, target, mesh)
    rows[f"poisoned/{protocol}"] = finetune_stage(run, f"finetune_poisoned_{protocol}", config, protocol, encoder,
                                                  victim_images, victim_labels, test, trigger, target, mesh)
  return rows


def check(config) -> None:
  """Fails fast on a threat config that cannot run: threat number, protocols, attack settings, target."""
  if config.threat not in (1, 2, 3):
    raise UserError(f"unknown threat {config.threat}; use 1 (poisoned encoder), 2 (poisoned data) or 3 "
                            "(both)")
  for protocol in config.finetune.protocols:
    if protocol not in finetune.PROTOCOLS:
      raise UserError(f"unknown fine-tuning protocol {protocol!r}; set config.finetune.protocols to some "
                              f"of {', '.join(finetune.PROTOCOLS)}")
    parallel.check_global_batch(config.finetune[protocol].train.batch_size,
                                f"config.finetune.{protocol}.train.batch_size")
  if ("attack" in config) != (config.threat in (1, 3)) or ("poison" in config) != (config.threat in (2, 3)):
    raise UserError(f"threat {config.threat} needs " + {1: "config.attack and no config.poison",
                                                                 2: "config.poison and no config.attack",
                                                                 3: "both config.attack and config.poison"}[
                                config.threat] + "; build the config with configs/threat.py")
  if config.clean_encoder:
    encoders.load_backbone(config.clean_encoder, config.model, parallel.make_mesh(config.mesh),
                           field="config.clean_encoder")
  train = stages.load_data(config, config.finetune.dataset, "train")
  if "poison" in config:
    attacks.check(config.poison, train.images.shape[1], train.labels)
  if "attack" in config and "poison" in config and config.attack.target != config.poison.target:
    raise UserError(f"threat 3 uses one target class, but config.attack.target is {config.attack.target} "
                            f"and config.poison.target {config.poison.target}; set them equal")
