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


def plot_trigger_grid(rows: dict, path: str, title: str) -> None:
  """rows: {name: uint8 images [K, H, W, 3]} (the same K samples in each) -> `path`: one row of images per name."""
  names = list(rows)
  count = max(len(rows[n]) for n in names)
  fig, axes = plt.subplots(len(names), max(count, 1), figsize=(1.3 * max(count, 1), 1.4 * len(names) + 0.4),
                           dpi=120, squeeze=False)
  for r, name in enumerate(names):
    for c in range(axes.shape[1]):
      ax = axes[r, c]
      ax.set_xticks([])
      ax.set_yticks([])
      if c < len(rows[name]):
        ax.imshow(rows[name][c], interpolation="nearest")
      else:
        ax.axis("off")
    axes[r, 0].set_ylabel(name, fontsize=8)
  fig.suptitle(title, fontsize=9)
  fig.tight_layout()
  fig.savefig(path)
  plt.close(fig)
