"""The distillation defense's comparison grid: teachers x students x losses, one combined table.

  python -m jaxpurify.ablate --config configs/distill.py:quick [--workdir runs/ablation-quick]
                             [--grid oat|full] [--config.a.b=V ...]

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

USAGE = ("usage: python -m jaxpurify.ablate --config configs/distill.py[:ARGS] [--workdir DIR] [--grid oat|full] "
         "[--config.a.b=V ...]")


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
      for stage in shared_stages(config, cell):
        link, target = os.path.join(cell_dir, stage), os.path.join(base_dir, stage)
        if os.path.isdir(target) and not os.path.lexists(link) and jax.process_index() == 0:
          os.symlink(os.path.relpath(target, cell_dir), link)
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
    if config.experiment != "distill":
      raise UserError(f"the grid varies the distillation defense; pass configs/distill.py, not a "
                      f"{config.experiment!r} config")
    workdir = parsed["workdir"] or os.path.join("runs", "ablation" + ("-" + parsed["arg"] if parsed["arg"] else ""))
    rows = run_grid(config, workdir, grid)
    text = table(rows)
    if jax.process_index() == 0:
      with open(os.path.join(workdir, "ablation.json"), "w", encoding="utf-8") as f:
        json.dump(rows, f, indent=2)
      with open(os.path.join(workdir, "ablation.md"), "w", encoding="utf-8") as f:
        f.write(f"# Distillation defense: {grid} grid\n\n{text}\n")
      print(f"\n{text}\n\ntable: {workdir}/ablation.md")
    return 0
  except UserError as err:
    print(f"error: {err}", file=sys.stderr)
    return 2


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
