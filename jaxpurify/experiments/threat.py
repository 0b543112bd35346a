"""The three threats of transfer learning (tcore.md section 3; `jaxpurify.threats`): the threat's setting, then
FT-head and FT-all of the clean and the threatened pair. Rows `clean/<protocol>`, `poisoned/<protocol>`."""

from jaxpurify import encoders, finetune, parallel, threats
from jaxpurify import plan as cost
from jaxpurify.attacks import pretrain_poisoning
from jaxpurify.data import catalog, synthetic
from jaxpurify.errors import UserError
from jaxpurify.experiments import encoder_attack, pretrain, ssl_backdoor


def check(config) -> None:
  """The threat's settings, and its encoder attack's (threats 1 and 3)."""
  threats.check(config)
  if "attack" in config and config.attack.mode in pretrain_poisoning.KINDS:
    if config.attack.downstream != config.finetune.dataset:
      raise UserError(f"config.attack.downstream is {config.attack.downstream!r} but the victim fine-tunes on "
                      f"{config.finetune.dataset!r}; set config.attack.downstream to config.finetune.dataset")
    pretrain_poisoning.check(config)
  elif "attack" in config:
    encoder_attack.check(config)


def run(run, mesh) -> dict:
  """The threat's setting, then FT-head and FT-all of the clean and the threatened pair -> {'clean/ft_head':
  {acc, asr, asr_all}, 'poisoned/ft_head': ..., ...}."""
  return threats.undefended_rows(run, threats.setting(run, mesh), mesh)


def bench_step(config, mesh):
  """The downstream fine-tuning step of config.finetune.protocols[-1] (FT-all by default) on an untrained encoder
  and synthetic labelled images."""
  protocol = config.finetune.protocols[-1]
  batch_size = config.finetune[protocol].train.batch_size
  images = synthetic.images(synthetic.BENCH_BATCHES * batch_size, config.data.image_size)
  encoder = parallel.put_replicated(encoders.build_backbone(config.model, config.seed), mesh)
  _, state, step, dataset, _ = finetune.finetune_training(config, protocol, encoder, images,
                                                          synthetic.labels(len(images)), 10, mesh)
  return state, step, dataset.batch, batch_size, f"{protocol}: 1 augmented labelled view each"


def plan(config) -> list:
  """pretrain (unless config.clean_encoder), the encoder attack (threats 1 and 3), fine-tuning of the clean and
  the threatened pair per protocol, and the classifiers' forwards over the test split and its triggered copy.
  The dataset attacks' auxiliary models are not counted."""
  return setting_plan(config) + finetune_plan(config)


def setting_plan(config) -> list:
  first = [] if config.clean_encoder else [pretrain.pretrain_stage(config)]
  if "attack" not in config:
    return first
  if config.attack.mode in pretrain_poisoning.KINDS:
    return first + [pretrain.pretrain_stage(config, "attack", ssl_backdoor.poisoned_set_size(config))]
  return first + [encoder_attack.attack_stage(config)]


def finetune_plan(config) -> list:
  """Fine-tuning of the clean and the threatened pair per protocol, and their test forwards."""
  name = config.finetune.dataset
  out = []
  for protocol in config.finetune.protocols:
    train = config.finetune[protocol].train
    steps = train.epochs * (catalog.split_size(name, "train") // train.batch_size)
    out += [cost.bench_stage(f"finetune_{row}_{protocol}", steps, config, "threat",
                             {"finetune.protocols": (protocol,)})
            for row in ("clean", "poisoned")]
  tests = 2 * 2 * len(config.finetune.protocols) * catalog.split_size(name, "test")  # clean + triggered, 2 rows
  return out + [cost.forward_stage("evaluate (classifiers)", tests, config)]
