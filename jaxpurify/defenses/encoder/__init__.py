"""Encoder-side defenses (docs/baselines.md, "Encoder-side defenses"): methods that judge or clean a suspect
self-supervised encoder without labels, on the distillation defense's setting (`configs/baseline.py` with an
encoder attack; `jaxpurify.experiments.encoder_defense` runs them). One module per method, found by name
(config.baseline.defense).

A method module `jaxpurify/defenses/encoder/<name>.py` holds
  CLEAN_DATA  True when it reads the defender's clean unlabelled images (config.defense.clean_fraction of the
              pre-training set, the distillation defense's subset);
  check(block, config) -> None   (optional) UserError on a setting that cannot run, before any work;
and one or both of
  detect(run, stage, block, config, encoder, images, mesh) -> dict   a detector's verdict on `encoder` (run on the
              clean and on the suspect encoder): {'score': float, 'flagged': bool, ...JSON values}, kept in stage
              `stage` (run.done / run.finish) so a finished detection is not repeated;
  purify(run, block, config, suspect, images, mesh, backdoor) -> (Encoder, dict)   the cleaned encoder and its
              diagnostics (JSON values); trained parts are stages named '<name>_<part>'.
`block` is config.baseline.<name> (None for a method without one), `images` uint8 [N, H, W, 3] the defender's
subset, `backdoor` the attack's (dataset, trigger, target) for monitors only, never for choices.
"""

import importlib
import pkgutil
from types import ModuleType

from jaxpurify.errors import UserError


def names() -> list[str]:
  """The encoder-side methods there are: the public modules of this package."""
  return sorted(m.name for m in pkgutil.iter_modules(__path__) if not m.name.startswith("_"))


def module(name: str) -> ModuleType:
  """The module of method `name`; UserError naming the known methods if there is none."""
  if name not in names():
    raise UserError(f"unknown encoder defense {name!r}; set config.baseline.defense (or --defenses) to one of "
                    f"{', '.join(names())}")
  return importlib.import_module(f"{__name__}.{name}")
