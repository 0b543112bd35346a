"""SSL-Backdoor (and, through the same functions, CorruptEncoder: `experiments/corruptencoder.py`): the pre-training
set poisoned by config.attack (`jaxpurify.attacks.pretrain_poisoning`), an encoder pre-trained on it, and it and the
clean encoder evaluated with the attack's test trigger. Stages: pretrain (unless config.attack.clean_encoder), poison
(poison/poisoned_pretrain.npz, poison/samples.png), pretrain_poisoned, evaluate."""

from jaxpurify import encoders, parallel, stages
from jaxpurify import plan as cost
from jaxpurify.attacks import corruptencoder, pretrain_poisoning
from jaxpurify.data import catalog
from jaxpurify.errors import UserError
from jaxpurify.experiments import pretrain


def backdoor(config):
  """(downstream data set, test trigger, target): what the evaluation's asr columns measure."""
  attack = config.attack
  return attack.downstream, pretrain_poisoning.test_trigger(attack, config.data.image_size, config.seed), attack.target


def check(config) -> None:
  """The poisoning's settings on the pre-training split, the downstream set = that split and evaluated, the clean
  encoder (if given) loads."""
  attack = config.attack
  if attack.mode != config.experiment:
    raise UserError(f"config.attack.mode is {attack.mode!r} but the experiment is {config.experiment!r}; build the "
                    f"config with configs/{config.experiment}.py")
  if attack.downstream != config.data.name:
    raise UserError(f"{attack.mode}'s backdoor targets a class of the pre-training set; set config.attack.downstream "
                    f"to config.data.name ({config.data.name!r})")
  if attack.downstream not in config.evaluate.datasets:
    raise UserError(f"the attack's downstream set {attack.downstream!r} is not evaluated; add it to "
                    "config.evaluate.datasets")
  pretrain_poisoning.check(config)
  if attack.clean_encoder:
    encoders.load_backbone(attack.clean_encoder, config.model, parallel.make_mesh(config.mesh))


def run(run, mesh) -> dict:
  """clean encoder -> poison the pre-training set -> pre-train on it -> evaluate both encoders."""
  config = run.config
  clean = stages.clean_encoder(run, config, mesh, config.attack.clean_encoder)
  poisoned = pretrain_poisoning.poisoned_encoder(run, config, mesh, "poison", "pretrain_poisoned")
  return stages.evaluate_encoders(run, "evaluate", {"clean": clean, "poisoned": poisoned}, config, mesh,
                                  backdoor(config))


bench_step = pretrain.bench_step  # the attack's cost is the pre-training step on the poisoned set


def poisoned_set_size(config) -> int:
  """Images in the poisoned pre-training set: the split's, plus CorruptEncoder's added images."""
  count = catalog.split_size(config.data.name, config.data.split)
  if config.attack.mode == "corruptencoder":
    count += corruptencoder.num_poisoned(count, config.attack.poison_ratio)
  return count


def plan(config) -> list:
  """pretrain (unless a clean encoder is given), pretrain_poisoned, then the evaluation's features of both."""
  first = [] if config.attack.clean_encoder else [pretrain.pretrain_stage(config)]
  return first + [pretrain.pretrain_stage(config, "pretrain_poisoned", poisoned_set_size(config)),
                  cost.evaluation_stage(config, rows=2, backdoor=config.attack.downstream)]
