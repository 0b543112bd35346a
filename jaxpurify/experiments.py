"""Experiments by name (config.experiment): each is a pipeline of stages in one workdir."""

import jax

from jaxpurify import parallel, stages
from jaxpurify.errors import UserError
from jaxpurify.pipeline import Run


def pretrain(run: Run) -> dict:
  """pretrain -> evaluate: the clean encoder's downstream accuracy."""
  config = run.config
  mesh = parallel.make_mesh(config.mesh)
  with jax.set_mesh(mesh):
    encoder = stages.pretrain_ssl(run, "pretrain", config, mesh)
    return stages.evaluate_encoders(run, "evaluate", {"clean": encoder}, config, mesh)


EXPERIMENTS = {"pretrain": pretrain}


def check_inputs(config) -> None:
  """Fails fast, before any compile, on unknown names and on data sets that are not prepared."""
  from jaxpurify import data  # pylint: disable=g-import-not-at-top
  from jaxpurify.models import ARCHS  # pylint: disable=g-import-not-at-top
  if config.model.name not in ARCHS:
    raise UserError(f"unknown model {config.model.name!r}; set config.model.name to one of {sorted(ARCHS)}")
  data_dir = config.data.data_dir or None
  data.ensure_available(config.data.name, config.data.split, data_dir=data_dir)
  for name in config.evaluate.datasets:
    for split in ("train", "test"):
      data.ensure_available(name, split, data_dir=data_dir)


def run(config, workdir: str) -> dict:
  """Runs (or resumes) the experiment; prints and returns its evaluations."""
  if config.experiment not in EXPERIMENTS:
    raise UserError(f"unknown experiment {config.experiment!r}; known: {', '.join(EXPERIMENTS)}")
  check_inputs(config)
  run_ = Run(config, workdir)
  evaluations = EXPERIMENTS[config.experiment](run_)
  table = run_.write_results(evaluations)
  if jax.process_index() == 0:
    print(f"\n{table}\n\nresults: {workdir}/results.json")
  return evaluations
