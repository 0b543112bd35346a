"""Ablations: an experiment's cells, each a resumable run of its own in WORKDIR/<cell>/, in one table.

  python -m jaxpurify.ablate --config configs/distill.py:quick [--workdir runs/ablation-quick]
                             [--grid oat|full] [--config.a.b=V ...]
  python -m jaxpurify.ablate --config configs/tcore.py:threat=2,attack=badnets,quick [--workdir DIR]

The experiment's module says what its cells are (`ablate`; docs/design.md): the distillation defense's comparison
grid of teachers x students x losses (`oat`, the default, one factor at a time around the config's own cell;
`full`, the whole product), T-Core's full pipeline and each of its four components removed in turn. The stages a
cell shares with the base cell are linked, not recomputed. Writes WORKDIR/ablation.md and WORKDIR/ablation.json
and prints the table.

  python -m jaxpurify.ablate --config configs/badencoder.py:quick --seeds 5

`--seeds` runs the experiment (or its ablation; `--grid none`: the experiment alone) once per seed in
WORKDIR/seed<N>/ and writes WORKDIR/seeds.md and WORKDIR/seeds.json: every metric as mean ± std (n), min, max and
per seed (`jaxpurify.seeds`). It works for every experiment, with or without an ablation. "{seed}" in a string
field becomes each seed's number, so a sweep can reuse another sweep's stages:
`--config.attack.clean_encoder=runs/badencoder-seeds/seed{seed}`.
"""

import json
import os
import sys

import jax

from jaxpurify import cli, experiments, seeds
from jaxpurify.errors import UserError

USAGE = ("usage: python -m jaxpurify.ablate --config configs/NAME.py[:ARGS] "
         "[--workdir DIR] [--grid oat|full|none] [--seeds N|S0,S1,...] [--config.a.b=V ...]")


def main(argv: list[str]) -> int:
  if cli.wants_help(argv, USAGE):
    return 0
  where = {}

  def body():
    cli.enable_compilation_cache()
    parsed = cli.parse_argv(argv, USAGE, {"grid": ("oat", str), "seeds": (None, seeds.parse)})
    grid, seed_list = parsed.extra["grid"], parsed.extra["seeds"]
    if grid not in ("oat", "full", "none") or (grid == "none" and seed_list is None):
      raise UserError(f"--grid {grid!r}: use 'oat' (one factor at a time), 'full', or 'none' with --seeds (the "
                      f"experiment alone over seeds); {USAGE}")
    config = cli.load_config(parsed.config, parsed.arg, parsed.overrides)
    experiment = experiments.module(config.experiment)
    ablated = hasattr(experiment, "ablate") and grid != "none"
    if not ablated and seed_list is None:
      names = [n for n in experiments.names() if hasattr(experiments.module(n), "ablate")]
      raise UserError(f"experiment {config.experiment!r} has no ablation; ablations exist for "
                      f"{', '.join(names)} (configs/{'.py, configs/'.join(names)}.py), and --seeds runs any "
                      "experiment over seeds")
    name = (getattr(experiment, "ABLATION_NAME", config.experiment) if ablated else config.experiment) + (
        "-seeds" if seed_list else "")
    suffix = "-" + parsed.arg if parsed.arg else ""
    where["workdir"] = workdir = parsed.workdir or os.path.join("runs", name + suffix)
    if seed_list is None:
      rows, text, title = experiment.ablate(config, workdir, grid)
      _write(workdir, "ablation", rows, text, f"{title} ({parsed.arg or 'default'})")
      return
    for seed in seed_list:  # every seed's config validated before the first one runs
      experiments.check(seeds.seed_config(config, seed))
    rows_per_seed = {}
    for seed in seed_list:
      cell, cell_dir = seeds.seed_config(config, seed), seeds.seed_workdir(workdir, seed)
      print(f"\n##### seed {seed} ({cell_dir})", flush=True)
      if ablated:
        rows_per_seed[seed] = experiment.ablate(cell, cell_dir, grid)[0]
      else:
        rows_per_seed[seed] = seeds.evaluation_rows(experiments.run(cell, cell_dir))
    pooled = seeds.pool(rows_per_seed)
    _write(workdir, "seeds", pooled, seeds.table(pooled, seed_list),
           f"{os.path.relpath(parsed.config)}:{parsed.arg or ''} over seeds {', '.join(map(str, seed_list))}")

  return cli.guarded(body, lambda: where.get("workdir"))


def _write(workdir: str, name: str, rows: list[dict], text: str, title: str) -> None:
  """WORKDIR/<name>.json (rows) and WORKDIR/<name>.md (title and table), and the table printed (process 0)."""
  if jax.process_index() == 0:
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, f"{name}.json"), "w", encoding="utf-8") as f:
      json.dump(rows, f, indent=2)
    with open(os.path.join(workdir, f"{name}.md"), "w", encoding="utf-8") as f:
      f.write(f"# {title}\n\n{text}\n")
    print(f"\n{text}\n\ntable: {workdir}/{name}.md")


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
