"""T-Core (docs/tcore.md; `jaxpurify.defenses.tcore`) against one threat: the threat's setting and undefended
rows, then seed sifting, confusion-training expansion, channel filtering and bootstrapping. Rows clean/<protocol>,
poisoned/<protocol>, defended/<protocol>; diagnostics against the true poison positions in results.json and
tcore.json.

`ablate` runs the full pipeline, then each component removed in turn (`python -m jaxpurify.ablate`).
"""

import json
import os

import numpy as np

from jaxpurify import encoders, experiments, finetune, parallel, stages, threats
from jaxpurify import plan as cost
from jaxpurify.data import catalog, synthetic
from jaxpurify.defenses import tcore
from jaxpurify.defenses.tcore import confusion
from jaxpurify.errors import UserError
from jaxpurify.experiments import threat
from jaxpurify.pipeline import Run, link_stages
from jaxpurify.train.state import create_state

ABLATION_NAME = "tcore-ablation"


def check(config) -> None:
  """The threat's checks, then T-Core's settings against the downstream training labels."""
  threat.check(config)
  train = stages.load_data(config, config.finetune.dataset, "train")
  tcore.check(config, train.labels, train.num_classes)


def run(run, mesh):
  """The threat's setting and undefended rows, then T-Core -> (rows with 'defended/<protocol>', diagnostics)."""
  setting = threats.setting(run, mesh)
  rows = threats.undefended_rows(run, setting, mesh)
  defended, diagnostics = tcore.defend(run, setting, mesh)
  return rows | defended, diagnostics


def bench_step(config, mesh):
  """T-Core's confusion-training step (round 1's lambda and lr, FT-all or head per config.tcore.expand) on an
  untrained encoder and synthetic suspect and seed images."""
  e = config.tcore.expand
  images = synthetic.images(synthetic.BENCH_BATCHES * e.batch_size, config.data.image_size)
  seeds = synthetic.images(synthetic.BENCH_BATCHES * e.seed_batch_size, config.data.image_size)
  encoder = parallel.put_replicated(encoders.build_backbone(config.model, config.seed), mesh)
  tx = confusion.confusion_optimizer(config, 0)
  graphdef, state = create_state(lambda: finetune.build_classifier(encoder, 10, config.finetune.head, config.seed),
                                 tx, mesh)
  step, batch_fn = confusion.confusion_training(
      config, 0, graphdef, tx, {"image": images, "label": synthetic.labels(len(images)),
                                "weight": np.ones(len(images), np.float32)},
      {"seed_image": seeds, "seed_pred": synthetic.labels(len(seeds))}, 10, mesh, config.seed)
  return (state, step, batch_fn, e.batch_size + e.seed_batch_size,
          f"{e.batch_size} suspect + {e.seed_batch_size} seed images, 1 augmented view each")


def plan(config) -> list:
  """The threat's stages, then the sifting's features, each confusion round's fine-tuning and confusion training,
  the bootstrapping stages per protocol and the defended classifiers' test forwards. The distilled set of round r
  is counted at ratios[r-1] of the training set (the whole set in round 0); the neighbour ranks are not counted."""
  t, name = config.tcore, config.finetune.dataset
  n = catalog.split_size(name, "train")
  out = threat.setting_plan(config) + threat.finetune_plan(config)[:-1]
  if "sift" not in t.skip:
    out.append(cost.forward_stage("tcore_sift (features)", n, config))
  if "expand" not in t.skip:
    e = t.expand
    for r in range(len(e.ratios)):
      distilled = n if r == 0 else int(n * e.ratios[r - 1])
      protocol = "ft_all" if e.trainable == "all" else "ft_head"
      out.append(cost.bench_stage(f"expand{r}_pretrain", e.pretrain_epochs[r] * (distilled // e.batch_size), config,
                                  "threat", {"finetune.protocols": (protocol,),
                                             f"finetune.{protocol}.train.batch_size": e.batch_size}))
      out.append(cost.bench_stage(f"expand{r}_confuse", e.iters[r], config, "tcore"))
  boot = 1 + (0 if "boot" in t.skip else len(t.boot.schedule))
  for protocol in config.finetune.protocols:
    out.append(cost.bench_stage(f"boot_{protocol} ({boot} stages)", boot * t.boot.steps_per_stage, config, "threat",
                                {"finetune.protocols": (protocol,)}))
  tests = 2 * 3 * len(config.finetune.protocols) * catalog.split_size(name, "test")  # clean + triggered, 3 rows
  return out + [cost.forward_stage("evaluate (classifiers)", tests, config)]


def shared_stages(base_dir: str, removed: str) -> list[str]:
  """The base run's stages a cell without `removed` reuses: everything upstream of the removed component."""
  names = sorted(os.listdir(base_dir)) if os.path.isdir(base_dir) else []
  upstream = {"sift": (), "expand": ("tcore_sift",), "filter": ("tcore_sift", "expand"),
              "boot": ("tcore_sift", "expand", "tcore_filter")}[removed]
  setting = ("pretrain", "attack", "poison", "poison_model", "finetune_")
  return [n for n in names if n.startswith(setting) or n.startswith(upstream)]


def run_cells(config, workdir: str) -> list[dict]:
  """The full pipeline and one cell per removed component; -> one row per cell."""
  if config.tcore.skip:
    raise UserError(f"the ablation removes each component from the full pipeline; leave config.tcore.skip empty "
                    f"(it is {tuple(config.tcore.skip)})")
  rows, base_dir = [], os.path.join(workdir, "full")
  cells = {}
  for removed in (None,) + tcore.COMPONENTS:
    cells[removed] = config.copy_and_resolve_references()
    if removed is not None:
      cells[removed].tcore.skip = (removed,)
    experiments.check(cells[removed])  # every cell validated before the first one runs
  for removed, cell in cells.items():
    cell_dir = base_dir
    if removed is not None:
      cell_dir = os.path.join(workdir, f"without_{removed}")
      Run(cell, cell_dir)
      link_stages(base_dir, cell_dir, shared_stages(base_dir, removed))
    print(f"\n=== {'full' if removed is None else 'without ' + removed} ({cell_dir})", flush=True)
    evaluations = experiments.run(cell, cell_dir)
    with open(os.path.join(cell_dir, "results.json"), encoding="utf-8") as f:
      diagnostics = json.load(f)["diagnostics"]
    for protocol in cell.finetune.protocols:
      defended, poisoned = evaluations[f"defended/{protocol}"], evaluations[f"poisoned/{protocol}"]
      expansion = diagnostics.get("expansion", {})
      rows.append({"removed": removed or "(none)", "protocol": protocol, "acc": defended["acc"],
                   "asr": defended["asr"], "asr_all": defended["asr_all"],
                   "clean_acc": evaluations[f"clean/{protocol}"]["acc"], "poisoned_acc": poisoned["acc"],
                   "poisoned_asr": poisoned["asr"], "seed_purity": diagnostics["seeds"]["purity"],
                   "precision": expansion.get("precision"), "recall": expansion.get("recall"),
                   "trusted": expansion.get("trusted", {}).get("count", diagnostics["seeds"]["count"]),
                   "trusted_purity": expansion.get("trusted", diagnostics["seeds"])["purity"],
                   "pruned": diagnostics.get("filter", {}).get("pruned_total", 0),
                   "final_trusted": diagnostics[f"bootstrap/{protocol}"][-1]})
  return rows


def table(rows: list[dict]) -> str:
  """Markdown: one line per (removed component, protocol); values in %."""
  pct = lambda v: "–" if v is None else f"{100 * v:.2f}"
  lines = ["| removed | protocol | acc | asr | asr_all | seed purity | exp. precision | exp. recall | trusted "
           "(purity) | channels pruned | final core (poisons) |", "|---" * 11 + "|"]
  for r in rows:
    final = r["final_trusted"]
    lines.append(f"| {r['removed']} | {r['protocol']} | {pct(r['acc'])} | {pct(r['asr'])} | {pct(r['asr_all'])} | "
                 f"{pct(r['seed_purity'])} | {pct(r['precision'])} | {pct(r['recall'])} | {r['trusted']} "
                 f"({pct(r['trusted_purity'])}) | {r['pruned']} | {final['count']} ({final['poisoned']}) |")
  first = rows[0]
  lines.append(f"\nClean fine-tuning: acc {pct(first['clean_acc'])}; undefended (poisoned): acc "
               f"{pct(first['poisoned_acc'])}, asr {pct(first['poisoned_asr'])}. The first row is the full pipeline.")
  return "\n".join(lines)


def ablate(config, workdir: str, grid: str) -> tuple[list[dict], str, str]:
  """The full pipeline and each component removed (`grid` has no meaning here) -> (rows, table, title)."""
  del grid
  rows = run_cells(config, workdir)
  return rows, table(rows), "T-Core: each component removed"
