"""A PyTorch reference for `python -m jaxpurify.bench --compare torch`: the official PyTorch pipelines' hot loops,
re-implemented here (no official code copied) at the config's model, width, batch and image size.

Each experiment with a reference (REFERENCES) gets the eager PyTorch step its official code runs, fed by a
`DataLoader` with WORKERS worker processes that apply torchvision's per-image transforms: SimCLR pre-training,
BadEncoder's fine-tuning, the distillation defense's AT step and FT-all. Importing this package imports no torch;
`check` says in one line what is missing, `measure` times the steady state end to end.
"""

import os
from collections.abc import Callable
from typing import NamedTuple

from jaxpurify.errors import UserError

INSTALL = "pip install -r benchmarks/requirements.txt --index-url https://download.pytorch.org/whl/cpu"


class Reference(NamedTuple):
  """The reference of one experiment: what it runs, and the config field (with the value) that must select it."""
  what: str
  field: str
  value: str
  selected: Callable  # config -> the field's value


REFERENCES = {
    "pretrain": Reference("SimCLR pre-training", "config.pretrain.method", "simclr", lambda c: c.pretrain.method),
    "encoder_attack": Reference("BadEncoder fine-tuning", "config.attack.mode", "badencoder",
                                lambda c: c.attack.mode),
    "distill": Reference("distillation (NT-Xent + attention transfer)", "config.defense.loss.name", "at",
                         lambda c: c.defense.loss.name),
    "threat": Reference("FT-all fine-tuning", "config.finetune.protocols[-1]", "ft_all",
                        lambda c: c.finetune.protocols[-1]),
}


def reference(config) -> Reference:
  """config.experiment's reference; UserError (one line) where it has none or the config selects another step."""
  known = ", ".join(f"{name} ({r.what})" for name, r in REFERENCES.items())
  if config.experiment not in REFERENCES:
    raise UserError(f"--compare torch: experiment {config.experiment!r} has no PyTorch reference (there is one for "
                    f"{known}); drop --compare")
  ref = REFERENCES[config.experiment]
  if (value := ref.selected(config)) != ref.value:
    raise UserError(f"--compare torch: the PyTorch reference of experiment {config.experiment!r} is {ref.what}, "
                    f"with {ref.field}={ref.value!r}, but the config has {value!r}; set it or drop --compare")
  return ref


def _import_torch() -> None:
  """Imports torch and torchvision, idle OpenMP threads set to sleep rather than spin (OMP_WAIT_POLICY=PASSIVE,
  unless set; read when torch loads): the DataLoader workers share the CPU with the step's threads, and with the
  default policy the steps ran 4-8x slower and erratic on a busy 2-core machine (benchmarks/README.md)."""
  os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
  import torch  # noqa: F401  pylint: disable=g-import-not-at-top,unused-import
  import torchvision  # noqa: F401  pylint: disable=g-import-not-at-top,unused-import


def check(config) -> Reference:
  """reference(config), once torch and torchvision import; UserError naming the install command otherwise."""
  ref = reference(config)
  try:
    _import_torch()
  except (ImportError, OSError, RuntimeError) as err:  # RuntimeError: torchvision built for another torch
    reason = (str(err).splitlines() or [type(err).__name__])[0]
    raise UserError(f"--compare torch needs PyTorch and torchvision, which do not import here ({reason}); install "
                    f"them with: {INSTALL}") from None
  return ref


def measure(config, steps: int, warmup: int) -> dict:
  """Times config's reference pipeline (`timing.measure`); check(config) first."""
  from benchmarks.torch_reference import timing  # pylint: disable=g-import-not-at-top  (imports torch)
  return timing.measure(config, check(config), steps, warmup)
