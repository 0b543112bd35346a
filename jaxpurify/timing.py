"""Where a run's time goes: each stage's compile, training and evaluation seconds, gathered while
`experiments.run` lasts, then printed and written to WORKDIR/time.json at its end."""

import time

_stages: dict[str, dict[str, float]] = {}
_start = time.perf_counter()


def start() -> None:
  """Forgets earlier runs' stages and starts the run's clock."""
  global _start
  _stages.clear()
  _start = time.perf_counter()


def record(stage: str, **seconds: float) -> None:
  """Adds `seconds` (compile_s, train_s, evaluate_s) to `stage`'s entry."""
  entry = _stages.setdefault(stage, {})
  for name, value in seconds.items():
    entry[name] = entry.get(name, 0.0) + value


def summary() -> tuple[dict, str]:
  """-> ({'stages': [{'stage', seconds...}], 'other_s', 'total_s'}, one line): the stages this process ran since
  `start`, in the order they ran; other_s is what no stage counted (data, models, checkpoints)."""
  total = time.perf_counter() - _start
  counted = sum(sum(entry.values()) for entry in _stages.values())
  parts = []
  for stage, entry in _stages.items():
    if "train_s" in entry:
      parts.append(f"{stage} {entry.get('compile_s', 0.0):.1f} + {entry['train_s']:.1f} s")
    else:
      parts.append(f"{stage} {sum(entry.values()):.1f} s")
  line = (f"time (compile + train per stage): {', '.join(parts) or 'nothing ran'}; other {total - counted:.1f} s; "
          f"total {total:.1f} s")
  return {"stages": [{"stage": k, **v} for k, v in _stages.items()], "other_s": total - counted, "total_s": total}, line
