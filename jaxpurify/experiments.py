"""Experiments by name (config.experiment): each is a pipeline of stages in one workdir."""

import os

import jax

from jaxpurify import data, encoders, parallel, plots, stages, threats, triggers
from jaxpurify.attacks import ctrl as ctrl_attack
from jaxpurify.attacks import references
from jaxpurify.defenses import distill, tcore
from jaxpurify.defenses import stages as defense_stages
from jaxpurify.errors import UserError
from jaxpurify.evaluation import PROTOCOLS
from jaxpurify.models import ARCHS
from jaxpurify.pipeline import Run
from jaxpurify.ssl import METHODS
from jaxpurify.train.metrics import read_metrics


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
  clean = stages.clean_encoder(run, config, mesh, config.attack.clean_encoder)
  poisoned = stages.attack_encoder(run, "attack", config, clean, mesh)
  return stages.evaluate_encoders(run, "evaluate", {"clean": clean, "poisoned": poisoned}, config, mesh,
                                  _backdoor(config))


def ctrl(run: Run, mesh) -> dict:
  """clean encoder -> CTRL-poison the pre-training set -> pre-train on it -> evaluate both encoders."""
  config, attack = run.config, run.config.attack
  clean = stages.clean_encoder(run, config, mesh, config.attack.clean_encoder)
  split = stages.load_data(config, config.data.name, config.data.split)
  index = ctrl_attack.poison_indices(split.labels, attack.target, attack.poison_ratio)
  if not run.done("poison"):
    run.finish("poison", {"poisoned_positions": index.tolist(), "examples": len(split.images)})
  images = ctrl_attack.poison(split.images, index, triggers.make_trigger(attack.trigger, config.data.image_size))
  poisoned = stages.pretrain_ssl(run, "pretrain_poisoned", config, mesh, images=images)
  return stages.evaluate_encoders(run, "evaluate", {"clean": clean, "poisoned": poisoned}, config, mesh,
                                  _backdoor(config))


def distillation_defense(run: Run, mesh) -> dict:
  """suspect encoder (clean -> BadEncoder/DRUPE, or a checkpoint) -> teacher -> student -> distillation ->
  evaluate clean, poisoned, teacher and defended; plots the monitored student in distill.png."""
  config, defense = run.config, run.config.defense
  rows = {}
  if defense.suspect_encoder:
    suspect = encoders.load_backbone(defense.suspect_encoder, config.model, mesh, encoders.FINAL_STAGES,
                                     "config.defense.suspect_encoder")
  else:
    rows["clean"] = stages.clean_encoder(run, config, mesh, config.attack.clean_encoder)
    suspect = stages.attack_encoder(run, "attack", config, rows["clean"], mesh)
  rows["poisoned"] = suspect
  split = stages.load_data(config, config.data.name, config.data.split)
  images = defense_stages.defender_images(config, split.images)
  teacher = defense_stages.teacher_encoder(run, config, suspect, images, mesh)
  if teacher is not suspect:
    rows["teacher"] = teacher
  student = defense_stages.initial_student(run, config, suspect, images, mesh)
  rows["defended"] = defense_stages.distill_student(run, "distill", config, teacher, student, images, mesh,
                                                    _backdoor(config))
  evaluations = stages.evaluate_encoders(run, "evaluate", rows, config, mesh, _backdoor(config))
  records = os.path.join(run.workdir, "distill", "monitor.jsonl")
  if jax.process_index() == 0 and os.path.exists(records):
    plots.plot_defense_curve(read_metrics(records), os.path.join(run.workdir, "distill.png"),
                             f"{defense.loss.name} distillation, {config.attack.mode} on {config.attack.downstream} "
                             f"({config.defense.monitor.protocol} monitor)")
  return evaluations


EXPERIMENTS = {"pretrain": pretrain, "badencoder": encoder_attack, "drupe": encoder_attack, "ctrl": ctrl,
               "distill": distillation_defense, "threat": threats.threat, "tcore": tcore.tcore}


def check_inputs(config) -> None:
  """Fails fast, before any compile or training, on bad names, missing data and inconsistent attacks."""
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
  if config.experiment in ("threat", "tcore"):
    threats.check(config)
  if config.experiment == "tcore":
    train = stages.load_data(config, config.finetune.dataset, "train")
    tcore.check(config, train.labels, train.num_classes)
  if "defense" in config:
    _check_defense(config)


def _check_attack(config) -> None:
  attack = config.attack
  if "trigger" in attack:  # threat 3's encoder attack takes the data attack's trigger
    triggers.make_trigger(attack.trigger, config.data.image_size)
  if attack.downstream not in config.evaluate.datasets:
    raise UserError(f"the attack's downstream set {attack.downstream!r} is not evaluated; add it to "
                    "config.evaluate.datasets")
  if attack.get("clean_encoder"):
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


def _stage_channels(model_config) -> list[int]:
  block, stage_sizes = ARCHS[model_config.name]
  return [model_config.width * 2**i * block.expansion for i in range(len(stage_sizes))]


def _check_defense(config) -> None:
  defense, mesh = config.defense, parallel.make_mesh(config.mesh)
  if not 0 < defense.clean_fraction <= 1:
    raise UserError(f"clean fraction {defense.clean_fraction} is not in (0, 1]; set config.defense.clean_fraction")
  if defense.subset not in ("first", "random"):
    raise UserError(f"unknown defender subset {defense.subset!r}; set config.defense.subset to 'first' or 'random'")
  count = int(len(stages.load_data(config, config.data.name, config.data.split).images) * defense.clean_fraction)
  if count < defense.ssl.train.batch_size:
    raise UserError(f"the defender's subset holds {count} images, fewer than one batch of "
                    f"{defense.ssl.train.batch_size}; raise config.defense.clean_fraction or lower "
                    "config.defense.ssl.train.batch_size")
  if defense.loss.name not in distill.SWITCHES:
    raise UserError(f"unknown distillation loss {defense.loss.name!r}; set config.defense.loss.name to one of "
                    f"{', '.join(distill.SWITCHES)}")
  if defense.loss.layer_weights is not None and len(defense.loss.layer_weights) != distill.NUM_LAYERS:
    raise UserError(f"config.defense.loss.layer_weights has {len(defense.loss.layer_weights)} weights; the encoder "
                    f"has {distill.NUM_LAYERS} stages (layer1..layer4): give {distill.NUM_LAYERS}")
  if defense.teacher.kind not in defense_stages.TEACHERS:
    raise UserError(f"unknown teacher {defense.teacher.kind!r}; set config.defense.teacher.kind to one of "
                    f"{', '.join(defense_stages.TEACHERS)}")
  if defense.student.init not in defense_stages.STUDENTS:
    raise UserError(f"unknown student {defense.student.init!r}; set config.defense.student.init to one of "
                    f"{', '.join(defense_stages.STUDENTS)}")
  student = defense_stages.student_model(config)
  teacher = defense_stages.teacher_model(config)
  for what, model in (("student", student), ("teacher", teacher)):
    if model.name not in ARCHS:
      raise UserError(f"unknown {what} model {model.name!r}; set config.defense.{what}.model.name to one of "
                      f"{sorted(ARCHS)}")
  if distill.SWITCHES[defense.loss.name].same_channels and _stage_channels(student) != _stage_channels(teacher):
    raise UserError(f"loss {defense.loss.name!r} compares maps channel by channel, but the student "
                    f"({student.name}, width {student.width}) and the teacher ({teacher.name}, width {teacher.width}) "
                    "differ in channels; use loss 'at' or 'sp', or the same architecture")
  if distill.loss_weights(defense.loss)[1] and _stage_channels(student)[-1] != _stage_channels(teacher)[-1]:
    raise UserError(f"the clone term (config.defense.loss.clone_weight) compares final features, but the student's "
                    f"have {_stage_channels(student)[-1]} dimensions and the teacher's {_stage_channels(teacher)[-1]}; "
                    "set the clone weight to 0 or use students of the teacher's feature size")
  if defense.monitor.every_epochs and defense.monitor.protocol not in PROTOCOLS:
    raise UserError(f"unknown monitor protocol {defense.monitor.protocol!r}; set config.defense.monitor.protocol to "
                    f"one of {', '.join(PROTOCOLS)}")
  if defense.student.init == "poisoned_copy" and not defense.student.checkpoint and (
      (student.name, student.width) != (config.model.name, config.model.width)):
    raise UserError("student 'poisoned_copy' starts from the suspect encoder, so config.defense.student.model must "
                    "be the suspect's architecture (config.model)")
  if (defense.teacher.model.name or defense.teacher.model.width) and not defense.teacher.checkpoint:
    raise UserError("config.defense.teacher.model describes a teacher checkpoint; without "
                    "config.defense.teacher.checkpoint the teacher is the suspect encoder (config.model)")
  if defense.suspect_encoder:
    encoders.load_backbone(defense.suspect_encoder, config.model, mesh, encoders.FINAL_STAGES,
                           "config.defense.suspect_encoder")
  if defense.teacher.checkpoint:
    encoders.load_backbone(defense.teacher.checkpoint, teacher, mesh, encoders.FINAL_STAGES,
                           "config.defense.teacher.checkpoint")
  if defense.student.checkpoint:
    encoders.load_backbone(defense.student.checkpoint, student, mesh, encoders.FINAL_STAGES,
                           "config.defense.student.checkpoint")


def run(config, workdir: str) -> dict:
  """Runs (or resumes) the experiment; prints and returns its evaluations (an experiment may also return
  diagnostics, which go to results.json and results.md beside them)."""
  if config.experiment not in EXPERIMENTS:
    raise UserError(f"unknown experiment {config.experiment!r}; known: {', '.join(EXPERIMENTS)}")
  check_inputs(config)
  run_ = Run(config, workdir)
  mesh = parallel.make_mesh(config.mesh)
  with jax.set_mesh(mesh):
    result = EXPERIMENTS[config.experiment](run_, mesh)
  evaluations, diagnostics = result if isinstance(result, tuple) else (result, None)
  table = run_.write_results(evaluations, diagnostics)
  if jax.process_index() == 0:
    print(f"\n{table}\n\nresults: {workdir}/results.json")
  return evaluations
