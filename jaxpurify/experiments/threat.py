"""The three threats of transfer learning (tcore.md section 3; `jaxpurify.threats`): the threat's setting, then
FT-head and FT-all of the clean and the threatened pair. Rows `clean/<protocol>`, `poisoned/<protocol>`."""

from jaxpurify import encoders, finetune, parallel, threats
from jaxpurify.data import synthetic
from jaxpurify.experiments import encoder_attack


def check(config) -> None:
  """The threat's settings, and its encoder attack's (threats 1 and 3)."""
  threats.check(config)
  if "attack" in config:
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
