"""Baseline defenses (docs/baselines.md), one module per method, found by name (config.baseline.defense).

A method module `jaxpurify/defenses/baselines/<name>.py` holds
  KIND        'filter' (removes samples; the harness fine-tunes on the rest with the undefended row's protocol) or
              'training' (trains its own classifier, on the poisoned set or, repairing the undefended one, on the
              reserve);
  CLEAN_DATA  True when it reads the defender's reserved clean set (Inputs.reserve_*);
  check(block, config, victim_counts, reserve_counts) -> None   (optional) UserError on a setting that cannot
              run, before any work (the counts: int [C] images per class of the victim set and of the reserve);
and, for a filter,   suspects(inputs, block, run) -> sorted int64 indices into the victim set to remove;
for a training one,  train(inputs, block, run) -> (graphdef, state, diagnostics) of its final classifier
                     (diagnostics 'isolated': the positions it set apart, reported as removed; the others, JSON
                     values such as a pruning method's channels pruned per layer, as 'repair/<protocol>').
`block` is config.baseline.<name>. Trained parts are stages of the run named '<name>_<part>_<protocol>'.
"""

import importlib
import pkgutil
from types import ModuleType

from jaxpurify.errors import UserError

HELPERS = ("inputs",)  # modules of this package that are not methods (private ones start with "_": _repair holds
# what the model-repair methods share)


def names() -> list[str]:
  """The baseline methods there are: the modules of this package that are not helpers."""
  return sorted(m.name for m in pkgutil.iter_modules(__path__)
                if not m.name.startswith("_") and m.name not in HELPERS)


def module(name: str) -> ModuleType:
  """The module of method `name`; UserError naming the known methods (and tcore) if there is none."""
  if name not in names():
    raise UserError(f"unknown defense {name!r}; set config.baseline.defense (or --defenses) to one of "
                    f"{', '.join(names() + ['tcore'])}")
  return importlib.import_module(f"{__name__}.{name}")
