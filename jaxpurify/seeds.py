"""Seeds as an axis: one resumable run (or ablation) per seed in WORKDIR/seed<N>/, and every metric reported as
mean ± std (n) with its extremes and per-seed values.

`python -m jaxpurify.ablate --config ... --seeds 0,1,2` (or `--seeds 3`, meaning 0, 1, 2) runs this; rows of the
same label (the string fields of a row: a cell, a protocol, an evaluation row) are pooled across seeds.
"""

import math
import os

import numpy as np

from jaxpurify.errors import UserError

# Metrics shown in the table, in this order, when a row has them; results.json-style fractions shown in %.
SHOWN = ("acc", "asr", "asr_all", "acc_knn", "acc_linear", "delta_acc", "delta_asr", "seed_purity", "precision",
         "recall")


def parse(text: str) -> tuple[int, ...]:
  """'0,1,2' -> (0, 1, 2); '3' -> (0, 1, 2): a count means the first seeds."""
  try:
    values = tuple(int(part) for part in text.split(",") if part.strip())
  except ValueError:
    raise UserError(f"--seeds {text!r}: give a count (--seeds 3) or a list (--seeds 0,1,2)") from None
  if len(values) == 1 and "," not in text:
    values = tuple(range(values[0]))
  if not values or len(set(values)) != len(values) or min(values) < 0:
    raise UserError(f"--seeds {text!r}: give a count of at least 1 (--seeds 3) or distinct seeds >= 0 (--seeds 0,1,2; "
                    "one seed: --seeds 0,)")
  return values


SEED_FIELD = "{seed}"


def seed_config(config, seed: int):
  """A copy of `config` with config.seed = `seed` and "{seed}" in any string field replaced by it, so that each
  seed can reuse its own earlier stages (--config.attack.clean_encoder=runs/simclr-seeds/seed{seed})."""
  cell = config.copy_and_resolve_references()
  cell.seed = seed

  def fill(block):
    for key, value in block.items():
      if isinstance(value, str) and SEED_FIELD in value:
        block[key] = value.replace(SEED_FIELD, str(seed))
      elif hasattr(value, "items"):
        fill(value)

  fill(cell)
  return cell


def seed_workdir(workdir: str, seed: int) -> str:
  return os.path.join(workdir, f"seed{seed}")


def evaluation_rows(evaluations: dict) -> list[dict]:
  """A run's evaluations {row: {metric: value}} -> rows {'row': name, metric: value, ...}."""
  return [{"row": name, **metrics} for name, metrics in evaluations.items()]


def _label(row: dict) -> tuple:
  return tuple((k, v) for k, v in row.items() if isinstance(v, str))


def _numeric(value) -> bool:
  return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def pool(rows_per_seed: dict[int, list[dict]]) -> list[dict]:
  """{seed: rows} -> one row per label: its string fields, then per metric {mean, std, n, min, max, values}
  (std with n - 1 degrees of freedom, 0 for one seed; values by seed)."""
  pooled = {}
  for seed, rows in rows_per_seed.items():
    for row in rows:
      entry = pooled.setdefault(_label(row), {})
      for key, value in row.items():
        if _numeric(value):
          entry.setdefault(key, {})[seed] = float(value)
  out = []
  for label, metrics in pooled.items():
    row = dict(label)
    for key, by_seed in metrics.items():
      values = np.array(list(by_seed.values()))
      row[key] = {"mean": float(values.mean()), "std": float(values.std(ddof=1)) if len(values) > 1 else 0.0,
                  "n": len(values), "min": float(values.min()), "max": float(values.max()),
                  "values": {str(s): v for s, v in by_seed.items()}}
    out.append(row)
  return out


def table(pooled: list[dict], seeds: tuple[int, ...]) -> str:
  """Markdown: one line per (label, shown metric): mean ± std (n), min, max and each seed's value, in %."""
  pct = lambda v: f"{100 * v:.2f}"
  lines = ["| row | metric | mean ± std (n) | min | max | " + " | ".join(f"seed {s}" for s in seeds) + " |",
           "|---" * (5 + len(seeds)) + "|"]
  for row in pooled:
    label = " / ".join(str(v) for v in row.values() if isinstance(v, str))
    for key in SHOWN:
      if isinstance(row.get(key), dict):
        m = row[key]
        per_seed = [pct(m["values"][str(s)]) if str(s) in m["values"] else "–" for s in seeds]
        lines.append(f"| {label} | {key} | {pct(m['mean'])} ± {pct(m['std'])} ({m['n']}) | {pct(m['min'])} | "
                     f"{pct(m['max'])} | " + " | ".join(per_seed) + " |")
  return "\n".join(lines)
