"""Ablations of the two defenses, one combined table each.

  python -m jaxpurify.ablate --config configs/distill.py:quick [--workdir runs/ablation-quick]
                             [--grid oat|full] [--config.a.b=V ...]
  python -m jaxpurify.ablate --config configs/tcore.py:threat=2,attack=badnets,quick [--workdir DIR]

T-Core: the full pipeline, then each of its four components removed in turn (config.tcore.skip; a removed
component is replaced by its naive stand-in, see defenses/tcore.py). The stages a cell shares with the full
run (the threat's setting, the undefended rows, the T-Core stages before the removed one) are linked.

Distillation: the comparison grid of teachers x students x losses.
The base cell is the config as given (default: fine-tuned teacher, warm-up student, AT). `oat` (the default)
varies one factor at a time around it: 4 teachers, 3 students, 8 losses (the six switches of the official
code plus textbook SP and AT + clone, the README's "ATD"); `full` runs the whole product. Every cell is a run
of its own in WORKDIR/<cell>/, resumable like any run; the stages a cell shares with the base cell (clean
pre-training, attack, teacher fine-tuning, student warm-up) are linked, not recomputed. Writes
WORKDIR/ablation.md and WORKDIR/ablation.json and prints the table.
"""

import itertools
import json
import os
import sys

import jax

from jaxpurify import cli
from jaxpurify.errors import UserError

USAGE = ("usage: python -m jaxpurify.ablate --config configs/distill.py[:ARGS]|configs/tcore.py[:ARGS] "
         "[--workdir DIR] [--grid oat|full] [--config.a.b=V ...]")


def teachers(config) -> dict[str, dict]:
  """The four teachers: label -> overrides. Two teacher kinds, and the fine-tuned teacher (ResNet-18) distilled
  into students of other architectures (AT and SP compare maps of any channel count)."""
  width = config.model.width
  return {"finetuned": {"defense.teacher.kind": "finetuned"},
          "poisoned": {"defense.teacher.kind": "poisoned"},
          "finetuned->resnet34": {"defense.teacher.kind": "finetuned", "defense.student.model.name": "resnet34"},
          f"finetuned->width{2 * width}": {"defense.teacher.kind": "finetuned",
                                           "defense.student.model.width": 2 * width}}


STUDENTS = {"warmup": {"defense.student.init": "warmup"}, "random": {"defense.student.init": "random"},
            "poisoned_copy": {"defense.student.init": "poisoned_copy"}}
LOSSES = {name: {"defense.loss.name": name} for name in ("at", "afd", "fitnet", "cc", "kd", "clone", "sp")}
LOSSES["at+clone"] = {"defense.loss.name": "at", "defense.loss.clone_weight": 1.0}


def cells(config, grid: str) -> dict[str, dict]:
  """label 'teacher/student/loss' -> overrides; the base cell (the config's own settings) first."""
  axes = [teachers(config), STUDENTS, LOSSES]
  base = (_base_label(config, axes[0]), config.defense.student.init,
          config.defense.loss.name + ("+clone" if config.defense.loss.clone_weight else ""))
  combos = [base]
  if grid == "full":
    combos += list(itertools.product(*axes))
  else:
    for axis, options in enumerate(axes):
      combos += [base[:axis] + (option,) + base[axis + 1:] for option in options]
  out = {}
  for combo in combos:
    overrides = {}
    for axis, option in zip(axes, combo):
      if option not in axis:
        raise UserError(f"the base config's setting {option!r} is not on the grid ({', '.join(axis)})")
      overrides.update(axis[option])
    out.setdefault("/".join(combo), overrides)
  return out


def _base_label(config, options) -> str:
  for label, overrides in options.items():
    if all(_get(config, k) == v for k, v in overrides.items()) and not config.defense.student.model.name \
        and not config.defense.student.model.width:
      return label
  return config.defense.teacher.kind


def _get(config, key: str):
  for part in key.split("."):
    config = config[part]
  return config


def cell_config(config, overrides: dict):
  cell = config.copy_and_resolve_references()
  for key, value in overrides.items():
    *parents, leaf = key.split(".")
    _get(cell, ".".join(parents))[leaf] = value
  return cell


def shared_stages(base, cell) -> list[str]:
  """Stages of the base run whose inputs the cell's config leaves unchanged."""
  shared = ["pretrain", "attack"]
  if cell.defense.teacher.to_dict() == base.defense.teacher.to_dict():
    shared.append("teacher")
  if cell.defense.student.to_dict() == base.defense.student.to_dict():
    shared.append("warmup")
  return shared


def link_stages(base_dir: str, cell_dir: str, stage_names) -> None:
  """Links the finished or started stage folders `stage_names` of the base run into a cell's workdir."""
  for stage in stage_names:
    link, target = os.path.join(cell_dir, stage), os.path.join(base_dir, stage)
    if os.path.isdir(target) and not os.path.lexists(link) and jax.process_index() == 0:
      os.symlink(os.path.relpath(target, cell_dir), link)


def run_grid(config, workdir: str, grid: str) -> list[dict]:
  """Runs (or resumes) every cell; -> one row per cell with the defended encoder's numbers and deltas."""
  from jaxpurify import experiments  # pylint: disable=g-import-not-at-top
  from jaxpurify.pipeline import Run  # pylint: disable=g-import-not-at-top
  rows, base_dir = [], None
  for label, overrides in cells(config, grid).items():
    cell = cell_config(config, overrides)
    cell_dir = os.path.join(workdir, label.replace("/", "__").replace(">", ""))
    if base_dir is None:
      base_dir = cell_dir
    else:
      Run(cell, cell_dir)  # claims the workdir (config.json) before the links go in
      link_stages(base_dir, cell_dir, shared_stages(config, cell))
    print(f"\n=== {label} ({cell_dir})", flush=True)
    evaluations = experiments.run(cell, cell_dir)
    dataset = cell.attack.downstream
    teacher, student, loss = label.split("/")
    defended, poisoned = evaluations[f"defended/{dataset}"], evaluations[f"poisoned/{dataset}"]
    rows.append({"cell": label, "teacher": teacher, "student": student, "loss": loss,
                 "poisoned_acc": poisoned["acc"], "poisoned_asr": poisoned["asr"],
                 "acc": defended["acc"], "asr": defended["asr"], "asr_all": defended["asr_all"],
                 "delta_acc": defended["acc"] - poisoned["acc"], "delta_asr": defended["asr"] - poisoned["asr"]})
  return rows


def table(rows: list[dict]) -> str:
  """Markdown: one line per cell, values in %."""
  lines = ["| teacher | student | loss | defended acc | defended asr | asr_all | Δacc | Δasr |",
           "|---|---|---|---|---|---|---|---|"]
  for r in rows:
    lines.append(f"| {r['teacher']} | {r['student']} | {r['loss']} | {100 * r['acc']:.2f} | {100 * r['asr']:.2f} | "
                 f"{100 * r['asr_all']:.2f} | {100 * r['delta_acc']:+.2f} | {100 * r['delta_asr']:+.2f} |")
  first = rows[0]
  lines.append(f"\nUndefended (poisoned) encoder: acc {100 * first['poisoned_acc']:.2f}, "
               f"asr {100 * first['poisoned_asr']:.2f}. The first row is the base cell.")
  return "\n".join(lines)


def tcore_shared_stages(base_dir: str, removed: str) -> list[str]:
  """The base run's stages a cell without `removed` reuses: everything upstream of the removed component."""
  names = sorted(os.listdir(base_dir)) if os.path.isdir(base_dir) else []
  upstream = {"sift": (), "expand": ("tcore_sift",), "filter": ("tcore_sift", "expand"),
              "boot": ("tcore_sift", "expand", "tcore_filter")}[removed]
  setting = ("pretrain", "attack", "poison", "poison_model", "finetune_")
  return [n for n in names if n.startswith(setting) or n.startswith(upstream)]


def run_tcore(config, workdir: str) -> list[dict]:
  """The full pipeline and one cell per removed component; -> one row per cell."""
  from jaxpurify import experiments  # pylint: disable=g-import-not-at-top
  from jaxpurify.defenses.tcore import COMPONENTS  # pylint: disable=g-import-not-at-top
  from jaxpurify.pipeline import Run  # pylint: disable=g-import-not-at-top
  if config.tcore.skip:
    raise UserError(f"the ablation removes each component from the full pipeline; leave config.tcore.skip empty "
                    f"(it is {tuple(config.tcore.skip)})")
  rows, base_dir = [], os.path.join(workdir, "full")
  for removed in (None,) + COMPONENTS:
    cell = config.copy_and_resolve_references()
    cell_dir = base_dir
    if removed is not None:
      cell.tcore.skip = (removed,)
      cell_dir = os.path.join(workdir, f"without_{removed}")
      Run(cell, cell_dir)
      link_stages(base_dir, cell_dir, tcore_shared_stages(base_dir, removed))
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


def tcore_table(rows: list[dict]) -> str:
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


def main(argv: list[str]) -> int:
  try:
    args, grid = list(argv), "oat"
    for i, item in enumerate(args):
      name, eq, value = item.partition("=")
      if name == "--grid":
        value = value if eq else (args[i + 1] if i + 1 < len(args) else "")
        del args[i:i + (1 if eq else 2)]
        if value not in ("oat", "full"):
          raise UserError(f"--grid {value!r}: use 'oat' (one factor at a time) or 'full'; {USAGE}")
        grid = value
        break
    parsed = cli.parse_argv(args)
    config = cli.load_config(parsed["config"], parsed["arg"])
    cli.apply_overrides(config, parsed["overrides"])
    if config.experiment not in ("distill", "tcore"):
      raise UserError(f"ablations cover the two defenses; pass configs/distill.py or configs/tcore.py, not a "
                      f"{config.experiment!r} config")
    prefix = "ablation" if config.experiment == "distill" else "tcore-ablation"
    workdir = parsed["workdir"] or os.path.join("runs", prefix + ("-" + parsed["arg"] if parsed["arg"] else ""))
    if config.experiment == "tcore":
      rows = run_tcore(config, workdir)
      text, title = tcore_table(rows), f"T-Core: each component removed ({parsed['arg'] or 'default'})"
    else:
      rows = run_grid(config, workdir, grid)
      text, title = table(rows), f"Distillation defense: {grid} grid"
    if jax.process_index() == 0:
      with open(os.path.join(workdir, "ablation.json"), "w", encoding="utf-8") as f:
        json.dump(rows, f, indent=2)
      with open(os.path.join(workdir, "ablation.md"), "w", encoding="utf-8") as f:
        f.write(f"# {title}\n\n{text}\n")
      print(f"\n{text}\n\ntable: {workdir}/ablation.md")
    return 0
  except UserError as err:
    print(f"error: {err}", file=sys.stderr)
    return 2


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
