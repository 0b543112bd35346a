"""Self-supervised pre-training (SimCLR, MoCo v2, BYOL; config.pretrain), then the frozen encoder evaluated
downstream (config.evaluate). Stages: pretrain, evaluate."""

from jaxpurify import stages
from jaxpurify.data import synthetic


def check(config) -> None:
  """Nothing beyond the common checks (a known method and encoder, the data prepared)."""
  del config


def run(run, mesh) -> dict:
  """pretrain -> evaluate: the clean encoder's downstream accuracy."""
  return stages.evaluate_encoders(run, "evaluate", {"clean": stages.pretrain_ssl(run, "pretrain", run.config, mesh)},
                                  run.config, mesh)


def bench_step(config, mesh):
  """The pre-training step of config.pretrain on synthetic images."""
  batch_size = config.pretrain.train.batch_size
  images = synthetic.images(synthetic.BENCH_BATCHES * batch_size, config.data.image_size)
  _, state, step, dataset, _ = stages.ssl_training(config, images, mesh)
  return state, step, dataset.batch, batch_size, "2 augmented views each"
