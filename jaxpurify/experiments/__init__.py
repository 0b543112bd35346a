"""Experiments: one module per experiment, found by name (config.experiment), never listed anywhere.

A module `jaxpurify/experiments/<name>.py` provides
  check(config)           every check of the config and its inputs, before anything is compiled (UserError);
  run(run, mesh)          the pipeline of stages in the run's workdir -> evaluations {row: {metric: value}}, or
                          (evaluations, diagnostics);
  bench_step(config, mesh)  -> (state, jitted step, batch_fn(step), global batch, what a batch holds), the step
                          `python -m jaxpurify.bench` times;
and optionally `ablate(config, workdir, grid) -> (rows, table, title)` with `ABLATION_NAME`, which
`python -m jaxpurify.ablate` runs. Adding an experiment is that module, a config file and its tests.
"""

import importlib
import pkgutil
from types import ModuleType

import jax

from jaxpurify import data, interop, parallel, timing, validation
from jaxpurify.errors import UserError
from jaxpurify.evaluation import PROTOCOLS
from jaxpurify.models import check_name
from jaxpurify.pipeline import claimed
from jaxpurify.ssl import METHODS


def names() -> list[str]:
  """The experiments there are: the modules of this package."""
  return sorted(m.name for m in pkgutil.iter_modules(__path__) if not m.name.startswith("_"))


def module(name: str) -> ModuleType:
  """The module of experiment `name`; UserError naming the known experiments if there is none."""
  if name not in names():
    raise UserError(f"unknown experiment {name!r}; set config.experiment to one of {', '.join(names())}")
  return importlib.import_module(f"{__name__}.{name}")


def check_common(config) -> None:
  """What every experiment needs: every number in its range, the mesh, a known encoder and import map, pre-training
  method and evaluation protocols, its data sets prepared, and a pre-training batch no larger than the data."""
  validation.check(config)
  parallel.make_mesh(config.mesh)
  check_name(config.model.name)
  interop.keymaps.parse(config.model.import_map)
  if config.pretrain.method not in METHODS:
    raise UserError(f"unknown pre-training method {config.pretrain.method!r}; set config.pretrain.method to one "
                    f"of {', '.join(METHODS)}")
  for key, protocols in (("evaluate.protocol", (config.evaluate.protocol,)),
                         ("evaluate.monitors", config.evaluate.monitors)):
    if unknown := [p for p in protocols if p not in PROTOCOLS]:
      raise UserError(f"unknown evaluation protocol {unknown[0]!r}; set config.{key} to "
                      f"{'one' if key.endswith('protocol') else 'some'} of {', '.join(PROTOCOLS)}")
  where = dict(data_dir=config.data.data_dir or None, mock=config.data.mock_examples)
  data.ensure_available(config.data.name, config.data.split, **where)
  for name in config.evaluate.datasets:
    for split in ("train", "test"):
      data.ensure_available(name, split, **where)
  validation.check_fits(config, "pretrain.train.batch_size", data.num_examples(config.data.name, config.data.split,
                                                                               **where),
                        f"{config.data.name} {config.data.split} images")


def check(config) -> ModuleType:
  """Fails fast, before any compile or training, on a config that cannot run; -> the experiment's module."""
  experiment = module(config.experiment)
  check_common(config)
  experiment.check(config)
  return experiment


def run(config, workdir: str) -> dict:
  """Runs (or resumes) the experiment in `workdir`; prints and returns its evaluations (an experiment may also
  return diagnostics, which go to results.json and results.md beside them) and where the time went (time.json:
  each stage's compile, training and evaluation seconds in this process; left as it was when no stage ran)."""
  timing.start()
  experiment = check(config)
  mesh = parallel.make_mesh(config.mesh)
  with claimed(config, workdir) as run_, jax.set_mesh(mesh):
    result = experiment.run(run_, mesh)
    evaluations, diagnostics = result if isinstance(result, tuple) else (result, None)
    table = run_.write_results(evaluations, diagnostics)
    times, time_line = timing.summary()
    if times["stages"]:
      run_.write_json("time.json", times)
  if jax.process_index() == 0:
    print(f"\n{table}\n\n{time_line}\nresults: {workdir}/results.json")
  return evaluations
