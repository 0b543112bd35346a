"""Self-supervised pre-training (SimCLR, MoCo v2, BYOL; config.pretrain), then the frozen encoder evaluated
downstream (config.evaluate). Stages: pretrain, evaluate."""

from jaxpurify import plan as cost
from jaxpurify import stages
from jaxpurify.data import catalog, synthetic


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


def pretrain_stage(config, name: str = "pretrain", num_images: int | None = None) -> cost.PlanStage:
  """config.pretrain's training over the pre-training split (or `num_images` images), as a plan stage."""
  train = config.pretrain.train
  num_images = num_images or catalog.split_size(config.data.name, config.data.split)
  return cost.bench_stage(name, train.epochs * (num_images // train.batch_size), config, "pretrain")


def plan(config) -> list:
  """pretrain, then the evaluation's features of the clean encoder."""
  return [pretrain_stage(config), cost.evaluation_stage(config, rows=1)]
