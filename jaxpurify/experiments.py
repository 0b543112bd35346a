"""Experiments by name (config.experiment): each is a pipeline of stages in one workdir."""

import jax

from jaxpurify import data, encoders, parallel, stages, triggers
from jaxpurify.attacks import ctrl as ctrl_attack
from jaxpurify.attacks import references
from jaxpurify.errors import UserError
from jaxpurify.pipeline import Run


def pretrain(run: Run, mesh) -> dict:
  """pretrain -> evaluate: the clean encoder's downstream accuracy."""
  return stages.evaluate_encoders(run, "evaluate", {"clean": stages.pretrain_ssl(run, "pretrain", run.config, mesh)},
                                  run.config, mesh)


def _backdoor(config):
  """(downstream data set, trigger, target) for the evaluation's asr columns."""
  attack = config.attack
  return attack.downstream, triggers.make_trigger(attack.trigger, config.data.image_size), attack.target


def encoder_attack(run: Run, mesh) -> dict:
  """clean encoder (pretrain or a checkpoint) -> BadEncoder/DRUPE fine-tuning -> evaluate both encoders."""
  config = run.config
  clean = stages.clean_encoder(run, config, mesh)
  poisoned = stages.attack_encoder(run, "attack", config, clean, mesh)
  return stages.evaluate_encoders(run, "evaluate", {"clean": clean, "poisoned": poisoned}, config, mesh,
                                  _backdoor(config))


def ctrl(run: Run, mesh) -> dict:
  """clean encoder -> CTRL-poison the pre-training set -> pre-train on it -> evaluate both encoders."""
  config, attack = run.config, run.config.attack
  clean = stages.clean_encoder(run, config, mesh)
  split = stages.load_data(config, config.data.name, config.data.split)
  index = ctrl_attack.poison_indices(split.labels, attack.target, attack.poison_ratio)
  if not run.done("poison"):
    run.finish("poison", {"poisoned_positions": index.tolist(), "examples": len(split.images)})
  images = ctrl_attack.poison(split.images, index, triggers.make_trigger(attack.trigger, config.data.image_size))
  poisoned = stages.pretrain_ssl(run, "pretrain_poisoned", config, mesh, images=images)
  return stages.evaluate_encoders(run, "evaluate", {"clean": clean, "poisoned": poisoned}, config, mesh,
                                  _backdoor(config))


EXPERIMENTS = {"pretrain": pretrain, "badencoder": encoder_attack, "drupe": encoder_attack, "ctrl": ctrl}


def check_inputs(config) -> None:
  """Fails fast, before any compile or training, on bad names, missing data and inconsistent attacks."""
  from jaxpurify.models import ARCHS  # pylint: disable=g-import-not-at-top
  from jaxpurify.ssl import METHODS  # pylint: disable=g-import-not-at-top
  if config.model.name not in ARCHS:
    raise UserError(f"unknown model {config.model.name!r}; set config.model.name to one of {sorted(ARCHS)}")
  if config.pretrain.method not in METHODS:
    raise UserError(f"unknown pre-training method {config.pretrain.method!r}; set config.pretrain.method to one "
                    f"of {', '.join(METHODS)}")
  data_dir = config.data.data_dir or None
  data.ensure_available(config.data.name, config.data.split, data_dir=data_dir)
  for name in config.evaluate.datasets:
    for split in ("train", "test"):
      data.ensure_available(name, split, data_dir=data_dir)
  if "attack" in config:
    _check_attack(config)


def _check_attack(config) -> None:
  attack = config.attack
  triggers.make_trigger(attack.trigger, config.data.image_size)
  if attack.downstream not in config.evaluate.datasets:
    raise UserError(f"the attack's downstream set {attack.downstream!r} is not evaluated; add it to "
                    "config.evaluate.datasets")
  if attack.clean_encoder:
    encoders.load_backbone(attack.clean_encoder, config.model, parallel.make_mesh(config.mesh))
  if config.experiment == "ctrl":
    labels = stages.load_data(config, config.data.name, config.data.split).labels
    if (labels < 0).all():
      raise UserError(f"CTRL poisons target-class images, but {config.data.name} {config.data.split} has no labels; "
                      "pre-train on a labelled split (config.data.split)")
    if attack.downstream != config.data.name:
      raise UserError("CTRL's backdoor targets a class of the pre-training set; set config.attack.downstream to "
                      f"config.data.name ({config.data.name!r})")
    references.check_target(attack.target, stages.load_data(config, attack.downstream, "test"))
    if not len(ctrl_attack.poison_indices(labels, attack.target, attack.poison_ratio)):
      raise UserError(f"{config.data.name} {config.data.split} has no image of target class {attack.target} to "
                      "poison; choose another config.attack.target")
    return
  if not 0 < attack.shadow_fraction <= 1:
    raise UserError(f"shadow fraction {attack.shadow_fraction} is not in (0, 1]; set config.attack.shadow_fraction")
  downstream = stages.load_data(config, attack.downstream, "train")
  references.choose(downstream, attack.target, attack.num_references, config.seed, attack.reference_file)


def run(config, workdir: str) -> dict:
  """Runs (or resumes) the experiment; prints and returns its evaluations."""
  if config.experiment not in EXPERIMENTS:
    raise UserError(f"unknown experiment {config.experiment!r}; known: {', '.join(EXPERIMENTS)}")
  check_inputs(config)
  run_ = Run(config, workdir)
  mesh = parallel.make_mesh(config.mesh)
  with jax.set_mesh(mesh):
    evaluations = EXPERIMENTS[config.experiment](run_, mesh)
  table = run_.write_results(evaluations)
  if jax.process_index() == 0:
    print(f"\n{table}\n\nresults: {workdir}/results.json")
  return evaluations
