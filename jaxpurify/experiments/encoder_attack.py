"""Encoder poisoning, BadEncoder or DRUPE (config.attack.mode): the clean encoder (pre-trained here, or
config.attack.clean_encoder) fine-tuned into a backdoored one, then both evaluated downstream.
Stages: pretrain (unless a clean encoder is given), attack, evaluate."""

import functools

from jaxpurify import data, encoders, parallel, stages, triggers, validation
from jaxpurify import plan as cost
from jaxpurify.attacks import encoder_finetune, references
from jaxpurify.data import catalog, synthetic
from jaxpurify.errors import UserError
from jaxpurify.experiments import pretrain
from jaxpurify.poisoning import registry


def backdoor(config):
  """(downstream data set, trigger, target) of config.attack: what the evaluation's asr columns measure."""
  attack = config.attack
  return attack.downstream, triggers.make_trigger(attack.trigger, config.data.image_size), attack.target


def check_downstream(config) -> None:
  """The attack's trigger builds, its downstream set is evaluated and its clean encoder (if given) loads."""
  attack = config.attack
  if "trigger" in attack:  # threat 3's encoder attack takes the data attack's trigger
    triggers.make_trigger(attack.trigger, config.data.image_size)
  if attack.downstream not in config.evaluate.datasets:
    raise UserError(f"the attack's downstream set {attack.downstream!r} is not evaluated; add it to "
                    "config.evaluate.datasets")
  if attack.get("clean_encoder"):
    encoders.load_backbone(attack.clean_encoder, config.model, parallel.make_mesh(config.mesh))


def check(config) -> None:
  """The mode, the shadow fraction, the downstream set and the references of config.attack."""
  attack = config.attack
  if attack.mode not in encoder_finetune.MODES:
    raise UserError(f"unknown encoder attack {attack.mode!r}; set config.attack.mode to one of "
                    f"{', '.join(encoder_finetune.MODES)}")
  if attack.batch_norm not in encoder_finetune.BATCH_NORM:
    raise UserError(f"unknown config.attack.batch_norm {attack.batch_norm!r}; use one of "
                    f"{', '.join(encoder_finetune.BATCH_NORM)}")
  if attack.reference_choice not in references.CHOICES:
    raise UserError(f"unknown config.attack.reference_choice {attack.reference_choice!r}; use one of "
                    f"{', '.join(references.CHOICES)}")
  check_downstream(config)
  count = data.num_examples(config.data.name, config.data.split, data_dir=config.data.data_dir or None,
                            mock=config.data.mock_examples)
  shadow = encoder_finetune.shadow_indices(count, attack.shadow_fraction, config.seed)
  validation.check_fits(config, "attack.train.batch_size", len(shadow), "shadow images")
  downstream = stages.load_data(config, attack.downstream, "train")
  references.choose(downstream, attack.target, attack.num_references, config.seed, attack.reference_file)


def run(run, mesh) -> dict:
  """clean encoder (pretrain or a checkpoint) -> BadEncoder/DRUPE fine-tuning -> evaluate both encoders."""
  config = run.config
  clean = stages.clean_encoder(run, config, mesh, config.attack.clean_encoder)
  poisoned = stages.attack_encoder(run, "attack", config, clean, mesh)
  return stages.evaluate_encoders(run, "evaluate", {"clean": clean, "poisoned": poisoned}, config, mesh,
                                  backdoor(config))


def bench_step(config, mesh):
  """The BadEncoder/DRUPE step on an untrained clean encoder and synthetic shadow images and references."""
  attack, size = config.attack, config.data.image_size
  clean = parallel.put_replicated(encoders.build_backbone(config.model, config.seed), mesh)
  shadow = synthetic.images(synthetic.BENCH_BATCHES * attack.train.batch_size, size)
  refs = synthetic.images(attack.num_references, size)
  state, step, _ = stages.attack_training(config, clean, len(shadow), mesh, _bench_trigger(config))
  batch_fn = stages.attack_batches(config, clean, shadow, refs, mesh)
  what = f"shadow, triggered and {attack.num_references} x augmented-reference images each"
  return state, step, batch_fn, attack.train.batch_size, what


def _bench_trigger(config):
  """The attack's trigger for the bench step: config.attack's, or under threat 3 the dataset attack's test trigger
  (a BadEncoder patch stands in for the attacks whose trigger is a trained model)."""
  if "trigger" in config.attack:
    return None
  if config.poison.attack in registry.AUXILIARY:
    return functools.partial(triggers.stamp, trigger=triggers.patch_trigger(config.data.image_size, 10, (21, 21),
                                                                             "white", 0))
  return registry.stateless_test_trigger(config.poison, config.data.image_size)


def attack_stage(config) -> cost.PlanStage:
  """BadEncoder/DRUPE fine-tuning over the shadow set, as a plan stage."""
  attack = config.attack
  shadow = encoder_finetune.shadow_indices(catalog.split_size(config.data.name, config.data.split),
                                           attack.shadow_fraction, config.seed)
  steps = attack.train.epochs * (len(shadow) // attack.train.batch_size)
  return cost.bench_stage("attack", steps, config, "encoder_attack")


def plan(config) -> list:
  """pretrain (unless a clean encoder is given), attack, then the evaluation's features of both encoders."""
  first = [] if config.attack.clean_encoder else [pretrain.pretrain_stage(config)]
  return first + [attack_stage(config), cost.evaluation_stage(config, rows=2, backdoor=config.attack.downstream)]
