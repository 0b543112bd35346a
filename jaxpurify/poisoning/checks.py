"""Host-side checks of config values for the poisoning modules: one-line `UserError`s that name the field."""

import math

import numpy as np

from jaxpurify import parallel
from jaxpurify.errors import UserError
from jaxpurify.train.state import SCHEDULES


def number(value, name: str, low: float | None = None, high: float | None = None, open_low: bool = False) -> float:
  """A finite Python number in [low, high] (or (low, high] with open_low), else UserError naming the config field
  `name`."""
  if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
    raise UserError(f"{name} must be a number, got {value!r}; fix {name}")
  value = float(value)
  too_low = low is not None and (value <= low if open_low else value < low)
  if not math.isfinite(value) or too_low or (high is not None and value > high):
    bound = "above" if open_low else "at least"
    span = f"{bound} {low}" if high is None else f"in {'(' if open_low else '['}{low}, {high}]"
    raise UserError(f"{name} must be {span}, got {value}; fix {name}")
  return value


def integer(value, name: str, low: int) -> int:
  """An integer of at least `low`, else UserError naming the config field `name`."""
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
    raise UserError(f"{name} must be an integer of at least {low}, got {value!r}; fix {name}")
  return int(value)


def auxiliary_training(block, prefix: str) -> None:
  """The settings every auxiliary model shares: optim (name, schedule, lr), train (epochs, batch_size) and the
  poisoning batch (attack.batch_size), under `prefix` (e.g. 'config.poison.issba')."""
  if block.optim.name not in ("sgd", "adam"):
    raise UserError(f"unknown optimizer {block.optim.name!r}; set {prefix}.optim.name to 'adam' or 'sgd'")
  if block.optim.schedule not in SCHEDULES:
    raise UserError(f"unknown schedule {block.optim.schedule!r}; set {prefix}.optim.schedule to one of "
                    f"{', '.join(SCHEDULES)}")
  number(block.optim.lr, f"{prefix}.optim.lr", 0.0)
  integer(block.train.epochs, f"{prefix}.train.epochs", 1)
  parallel.check_global_batch(integer(block.train.batch_size, f"{prefix}.train.batch_size", 1),
                              f"{prefix}.train.batch_size")
  parallel.check_global_batch(integer(block.attack.batch_size, f"{prefix}.attack.batch_size", 1),
                              f"{prefix}.attack.batch_size")
