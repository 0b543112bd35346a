"""Process-0 JSONL metrics: one JSON object per logged step, with `step`."""

import json
import math
import os

import jax
import numpy as np


def to_python(metrics: dict) -> dict:
  return {k: (v.item() if isinstance(v, np.generic | np.ndarray) else v) for k, v in metrics.items()}


class MetricWriter:
  """Appends to `path`; on resume, drops the lines logged after the restored step (they will be redone)."""

  def __init__(self, path: str, resume_step: int = 0):
    self.path = path
    self.enabled = jax.process_index() == 0
    if self.enabled and os.path.exists(path):
      with open(path) as f:
        kept = [line for line in f if line.strip() and json.loads(line)["step"] <= resume_step]
      with open(path, "w") as f:
        f.writelines(kept)

  def write(self, step: int, metrics: dict) -> None:
    if self.enabled:
      with open(self.path, "a") as f:
        f.write(json.dumps({"step": step, **to_python(metrics)}) + "\n")


def read_metrics(path: str) -> list[dict]:
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def non_finite(metrics: dict) -> list[str]:
  return [k for k, v in metrics.items() if isinstance(v, float) and not math.isfinite(v)]
