"""PNG plots of a run's records (matplotlib, headless)."""

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top,wrong-import-position


def plot_defense_curve(records: list[dict], path: str, title: str) -> None:
  """records: [{'epoch', 'acc', 'asr', ...}] of the monitored student -> `path`: acc and asr (%) against epoch."""
  epochs = [r["epoch"] for r in records]
  fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
  for key, label in (("acc", "clean accuracy"), ("asr", "attack success rate (non-target)")):
    ax.plot(epochs, [100 * r[key] for r in records], marker="o", label=label)
  ax.set(xlabel="distillation epoch", ylabel="%", ylim=(0, 100), title=title)
  ax.grid(alpha=0.3)
  ax.legend()
  fig.tight_layout()
  fig.savefig(path)
  plt.close(fig)
