"""CTRL: the first images of the target class in the pre-training set get the frequency trigger, an encoder is
pre-trained on the poisoned set, and it and the clean encoder are evaluated. Stages: pretrain (unless
config.attack.clean_encoder), poison, pretrain_poisoned, evaluate."""

from jaxpurify import plan as cost
from jaxpurify import stages, triggers
from jaxpurify.attacks import ctrl as ctrl_attack
from jaxpurify.attacks import references
from jaxpurify.errors import UserError
from jaxpurify.experiments import encoder_attack, pretrain


def check(config) -> None:
  """The trigger, a labelled pre-training split holding the target class, the downstream set = that split."""
  attack = config.attack
  encoder_attack.check_downstream(config)
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


def run(run, mesh) -> dict:
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
                                  encoder_attack.backdoor(config))


bench_step = pretrain.bench_step  # CTRL's cost is the pre-training step on the poisoned set


def plan(config) -> list:
  """pretrain (unless a clean encoder is given), pretrain_poisoned, then the evaluation's features of both."""
  stages_ = [] if config.attack.clean_encoder else [pretrain.pretrain_stage(config)]
  return stages_ + [pretrain.pretrain_stage(config, "pretrain_poisoned"),
                    cost.evaluation_stage(config, rows=2, backdoor=config.attack.downstream)]
