"""One table of defenses on one setting (or several): every defense run on the same victim set, shared stages once.

  python -m jaxpurify.compare --config configs/tcore.py:threat=2,attack=badnets,quick \\
      --defenses tcore,ss,ac,scan,spectre,strip,ct,asset,abl [--workdir DIR] [--config.a.b=V ...]
  python -m jaxpurify.compare --config configs/tcore.py:quick --defenses tcore,ss \\
      --settings threat=2,attack=badnets threat=3,attack=blended,encoder=badencoder [--seeds 3]
  python -m jaxpurify.compare --config configs/distill.py:quick \\
      --defenses distill,mimic,ssl_cleanse,clp,nad,decree [--settings attack=badencoder attack=drupe]

Each defense of each setting is a resumable run of `configs/baseline.py` (the arguments of --config, each
setting's keys over them, defense=NAME) in WORKDIR/[seed<N>/]<setting>/<defense>/; the setting's stages (clean
encoder, encoder attack, poisoned set, undefended fine-tuning) are made by the first defense and linked into the
others (also into a defense added to the command later). Writes WORKDIR/compare.md and WORKDIR/compare.json: per
setting and protocol, defense | acc | asr | asr_all | DER | removed TPR / FPR | clean images used | defense time,
after the clean and the undefended models, then the mean over the settings. On the encoder setting
(configs/distill.py: the encoder-side defenses, `jaxpurify.defenses.encoder`) a table is per setting and
downstream set, and a detector's columns are its score and verdict on the clean and on the poisoned encoder.
DER is BackdoorBench's defense effectiveness rating ((max(0, ΔASR) − max(0, ΔACC)) + 1) / 2 against the
undefended model. With --seeds every number is mean ± std.
"""

import json
import math
import os
import sys

import jax

from jaxpurify import cli, experiments, seeds
from jaxpurify.errors import UserError
from jaxpurify.pipeline import Run, link_stages

USAGE = ("usage: python -m jaxpurify.compare --config configs/tcore.py[:ARGS] --defenses NAME,NAME,... "
         "[--settings ARGS ARGS ...] [--seeds N|S0,S1,...] [--workdir DIR] [--config.a.b=V ...]")
DEFENSES = "tcore,ss,ac,scan,spectre,strip,ct,asset,abl,ft,fp,nad,anp,ibau,clp,rnp"
ENCODER_DEFENSES = "distill,nad,mimic,ssl_cleanse,decree,clp"
SETTING_FILES = ("tcore.py", "baseline.py", "threat.py", "distill.py")  # configs whose arguments name a setting
ENCODER_KEYS = ("attack", "downstream")  # what names an encoder setting (configs/distill.py's other arguments
# choose the distillation defense's own recipe, which the `distill` row takes from --config.defense.*)
SHARED_STAGES = ("pretrain", "attack", "poison", "finetune_clean_", "finetune_poisoned_", "evaluate_setting")


def _settings_flag(argv: list[str]) -> tuple[list[str], list[str]]:
  """argv with `--settings A B ...` (or --settings=A) taken out -> (the rest, the settings)."""
  rest, settings, taking = [], [], False
  for item in argv:
    if item.startswith("--settings"):
      taking = True
      settings += [item.partition("=")[2]] if "=" in item else []
    elif taking and not item.startswith("--"):
      settings.append(item)
    else:
      taking = False
      rest.append(item)
  if taking and not settings:
    raise UserError(f"--settings needs at least one setting such as threat=2,attack=badnets; {USAGE}")
  return rest, settings


SIZE_WORDS = ("quick", "tiny", "smoke")


def _items(*args: str | None) -> dict:
  """'a=1,quick', 'a=2' -> {'a': 'a=2', 'quick': 'quick'}: the later argument's keys over the earlier's."""
  items = {}
  for item in filter(None, ",".join(a or "" for a in args).split(",")):
    items[item.partition("=")[0]] = item
  return items


def merged_arg(base: str | None, setting: str, defense: str) -> str:
  """The baseline config's argument: base's items, the setting's over them, then defense=NAME ('a=1,quick' +
  'a=2' + 'ss' -> 'a=2,quick,defense=ss'); a `defense=` in base or setting is replaced."""
  items = _items(base, setting)
  items["defense"] = f"defense={defense}"
  return ",".join(items.values())


def setting_name(base: str | None, setting: str) -> str:
  """What a setting is, without the size word and the defense: 'threat=2,attack=badnets,quick' + '' ->
  'threat=2,attack=badnets'."""
  items = _items(base, setting)
  return ",".join(v for k, v in items.items() if k not in SIZE_WORDS + ("defense",)) or "default"


def slug(setting: str) -> str:
  """A setting's folder name: 'threat=3,attack=blended' -> 'threat3-blended'."""
  return "-".join(f"threat{value}" if key == "threat" else value or key
                  for key, _, value in (item.partition("=") for item in setting.split(",") if item))


def encoder_arg(arg: str | None) -> str:
  """configs/distill.py's argument as the encoder setting's ('quick' -> 'attack=badencoder,quick'); UserError for
  the distillation recipe's own arguments (teacher, student, loss), which are not a setting."""
  items = _items("attack=badencoder", arg)
  if unknown := [k for k in items if k not in ENCODER_KEYS + SIZE_WORDS]:
    raise UserError(f"compare's encoder setting takes {', '.join(ENCODER_KEYS)} and a size word from "
                    f"configs/distill.py's argument, not {unknown[0]!r}; set the distillation recipe with "
                    "--config.defense.* (e.g. --config.defense.loss.name=sp)")
  return ",".join(items.values())


def default_defenses(config_path: str) -> str:
  """The methods a comparison runs when --defenses is not given: the encoder-side ones on configs/distill.py, else
  T-Core and the threat harness's baselines."""
  return ENCODER_DEFENSES if os.path.basename(config_path) == "distill.py" else DEFENSES


def cells(config_path: str, arg: str | None, overrides: list[str], defenses: list[str], settings: list[str]) -> dict:
  """{(setting name, defense): locked config} of configs/baseline.py beside `config_path`."""
  if os.path.basename(config_path) not in SETTING_FILES:
    raise UserError(f"compare takes the setting from configs/{', configs/'.join(SETTING_FILES)}; got {config_path}")
  if os.path.basename(config_path) == "distill.py":
    arg = encoder_arg(arg)
  baseline_path = os.path.join(os.path.dirname(config_path), "baseline.py")
  return {(setting_name(arg, setting), defense): cli.load_config(baseline_path, merged_arg(arg, setting, defense),
                                                                overrides)
          for setting in settings for defense in defenses}


def run_cells(configs: dict, workdir: str) -> list[dict]:
  """Every (setting, defense) run in workdir/<setting>/<defense>, linking the setting's stages from a finished
  cell of the same setting where there is one (else making them) -> rows {setting, defense, protocol, acc, asr,
  asr_all, der, tpr, fpr, clean_used, seconds}, after the clean ('clean model') and undefended ('none') rows of
  each setting."""
  rows, reported = [], set()
  for (setting, defense), config in configs.items():
    cell_dir = os.path.join(workdir, slug(setting), defense)
    if (source := finished_cell(os.path.dirname(cell_dir), cell_dir)) is not None:
      Run(config, cell_dir)
      link_stages(source, cell_dir, [name for name in sorted(os.listdir(source)) if name.startswith(SHARED_STAGES)])
    print(f"\n=== {setting}: {defense} ({cell_dir})", flush=True)
    evaluations = experiments.run(config, cell_dir)
    with open(os.path.join(cell_dir, "results.json"), encoding="utf-8") as f:
      diagnostics = json.load(f)["diagnostics"]
    for protocol in row_groups(config):
      label = {"setting": setting, "protocol": protocol}
      poisoned = evaluations[f"poisoned/{protocol}"]
      if (setting, protocol) not in reported and f"clean/{protocol}" in evaluations:
        reported.add((setting, protocol))
        rows += [{**label, "defense": "clean model", **evaluations[f"clean/{protocol}"]},
                 {**label, "defense": "none", **poisoned}]
      defended = evaluations.get(f"defended/{protocol}")
      removed = diagnostics.get(f"removed/{protocol}", {})
      rows.append({**label, "defense": defense, **(defended or {}),
                   **({"der": der(poisoned, defended)} if defended else {}),
                   **{k: removed[k] for k in ("tpr", "fpr") if k in removed}, **detections(diagnostics),
                   "clean_used": diagnostics["clean_used"], "seconds": diagnostics["defense_seconds"]})
  return rows


def row_groups(config) -> tuple[str, ...]:
  """What a setting's table is per: the fine-tuning protocols in the threat harness, the evaluated downstream set on
  the encoder setting."""
  return (config.attack.downstream,) if config.experiment == "encoder_defense" else tuple(config.finetune.protocols)


def detections(diagnostics: dict) -> dict:
  """A detector's verdicts {'score_clean', 'flagged_clean', 'score_poisoned', 'flagged_poisoned'} (flags as 0/1, so
  that seeds pool into the fraction flagged); {} for a method that detects nothing."""
  out = {}
  for encoder in ("clean", "poisoned"):
    if (verdict := diagnostics.get(f"detect/{encoder}")) is not None:
      out |= {f"score_{encoder}": verdict["score"], f"flagged_{encoder}": float(verdict["flagged"])}
  return out


def finished_cell(setting_dir: str, cell_dir: str) -> str | None:
  """The first finished cell (by name) of a setting other than `cell_dir`, whose stages a new cell links; None when
  there is none yet (the new cell makes the setting's stages)."""
  names = sorted(os.listdir(setting_dir)) if os.path.isdir(setting_dir) else []
  done = [os.path.join(setting_dir, n) for n in names if os.path.exists(os.path.join(setting_dir, n, "results.json"))]
  return next((path for path in done if path != cell_dir), None)


def der(undefended: dict, defended: dict) -> float:
  """BackdoorBench's defense effectiveness rating in [0, 1] from {acc, asr} of the undefended and defended models."""
  return (max(0.0, undefended["asr"] - defended["asr"]) - max(0.0, undefended["acc"] - defended["acc"]) + 1) / 2


def with_means(rows: list[dict], several_settings: bool) -> list[dict]:
  """rows, followed by their mean over the settings when there are several."""
  return rows + (mean_rows(rows) if several_settings else [])


def mean_rows(rows: list[dict]) -> list[dict]:
  """The mean over settings of every defense's numbers, per protocol (setting 'mean')."""
  groups = {}
  for row in rows:
    groups.setdefault((row["protocol"], row["defense"]), []).append(row)
  out = []
  for (protocol, defense), members in groups.items():
    mean = {"setting": "mean", "protocol": protocol, "defense": defense}
    for key in members[0]:
      values = [m[key] for m in members if isinstance(m.get(key), (int, float))]
      if key not in mean and len(values) == len(members):
        mean[key] = sum(values) / len(values)
    out.append(mean)
  return out


COLUMNS = (("acc", "acc", "pct"), ("asr", "asr", "pct"), ("asr_all", "asr_all", "pct"), ("der", "DER", "pct"),
           ("tpr", "removed TPR", "pct"), ("fpr", "removed FPR", "pct"),
           ("score_clean", "score (clean)", "score"), ("flagged_clean", "flags clean", "flag"),
           ("score_poisoned", "score (poisoned)", "score"), ("flagged_poisoned", "flags poisoned", "flag"),
           ("clean_used", "clean images used", "count"), ("seconds", "defense time (s)", "count"))
ALWAYS = ("acc", "asr", "asr_all", "der", "clean_used", "seconds")  # other columns appear where a row has them


def _cell(value, kind: str, seeds: int = 1) -> str:
  """A number, or {mean, std, n} pooled over seeds, as text: 'pct' a fraction in %, 'count' a whole number, 'score'
  4 significant digits, 'flag' yes/no (a mean: the fraction flagged); '–' for none and for NaN (a removal
  TPR where the set holds no poison: threat 1). A pooled value over fewer than `seeds` seeds (the others' were not
  finite: a detector's score of inf) says its n; a count that no seed changed has no spread."""
  if value is None or (isinstance(value, float) and math.isnan(value)):
    return "–"
  pooled = isinstance(value, dict)
  if kind == "flag":  # 1 or 0 on one run; a mean over seeds or settings is the fraction flagged
    share = value["mean"] if pooled else value
    return {1.0: "yes", 0.0: "no"}.get(share, f"{share:.2f}")
  fmt = {"pct": lambda v: f"{100 * v:.2f}", "count": lambda v: f"{v:.0f}", "score": lambda v: f"{v:.4g}"}[kind]
  if not pooled:
    return fmt(value)
  spread = value["n"] > 1 and not (kind == "count" and value["std"] == 0)
  return (fmt(value["mean"]) + (f" ± {fmt(value['std'])}" if spread else "")
          + (f" (n={value['n']})" if value["n"] < seeds else ""))


def table(rows: list[dict]) -> str:
  """Markdown: one table per (setting, protocol), in order of appearance."""
  out, groups = [], {}
  for row in rows:
    groups.setdefault((row["setting"], row["protocol"]), []).append(row)
  seeds = max((v["n"] for row in rows for v in row.values() if isinstance(v, dict)), default=1)
  for (setting, protocol), members in groups.items():
    columns = [c for c in COLUMNS if c[0] in ALWAYS or any(c[0] in row for row in members)]
    out += [f"### {setting} ({protocol})", "", "| defense | " + " | ".join(c[1] for c in columns) + " |",
            "|---" * (len(columns) + 1) + "|"]
    out += ["| " + row["defense"] + " | " + " | ".join(_cell(row.get(key), kind, seeds) for key, _, kind in columns)
            + " |" for row in members]
    out.append("")
  return "\n".join(out)


def main(argv: list[str]) -> int:
  if cli.wants_help(argv, USAGE):
    return 0
  where = {}

  def body():
    cli.enable_compilation_cache()
    rest, settings = _settings_flag(argv)
    parsed = cli.parse_argv(rest, USAGE, {"defenses": (None, str), "seeds": (None, seeds.parse)})
    given = parsed.extra["defenses"] or default_defenses(parsed.config)
    defenses = [d for d in given.split(",") if d]
    if not defenses or len(set(defenses)) != len(defenses):
      raise UserError(f"--defenses {given!r}: give distinct names, e.g. --defenses {default_defenses(parsed.config)}")
    configs = cells(parsed.config, parsed.arg, parsed.overrides, defenses, settings or [""])
    where["workdir"] = workdir = parsed.workdir or os.path.join(
        "runs", "compare" + ("-" + parsed.arg if parsed.arg else ""))
    seed_list = parsed.extra["seeds"]
    per_seed = {None: configs} if seed_list is None else {
        seed: {key: seeds.seed_config(config, seed) for key, config in configs.items()} for seed in seed_list}
    for cells_ in per_seed.values():  # every cell of every seed validated before the first one runs
      for config in cells_.values():
        experiments.check(config)
    rows = {seed: with_means(run_cells(cells_, workdir if seed is None else seeds.seed_workdir(workdir, seed)),
                             len(settings) > 1) for seed, cells_ in per_seed.items()}
    pooled = rows[None] if seed_list is None else seeds.pool(rows)
    title = (f"Defenses on {os.path.relpath(parsed.config)}:{parsed.arg or ''}"
             + (f" over seeds {', '.join(map(str, seed_list))}" if seed_list else ""))
    if jax.process_index() == 0:
      os.makedirs(workdir, exist_ok=True)
      with open(os.path.join(workdir, "compare.json"), "w", encoding="utf-8") as f:
        json.dump(pooled, f, indent=2)
      text = table(pooled)
      with open(os.path.join(workdir, "compare.md"), "w", encoding="utf-8") as f:
        f.write(f"# {title}\n\n{text}\n")
      print(f"\n{text}\ntable: {workdir}/compare.md")

  return cli.guarded(body, lambda: where.get("workdir"))


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
