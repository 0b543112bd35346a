"""Ablations: an experiment's cells, each a resumable run of its own in WORKDIR/<cell>/, in one table.

  python -m jaxpurify.ablate --config configs/distill.py:quick [--workdir runs/ablation-quick]
                             [--grid oat|full] [--config.a.b=V ...]
  python -m jaxpurify.ablate --config configs/tcore.py:threat=2,attack=badnets,quick [--workdir DIR]

The experiment's module says what its cells are (`ablate`; docs/design.md): the distillation defense's comparison
grid of teachers x students x losses (`oat`, the default, one factor at a time around the config's own cell;
`full`, the whole product), T-Core's full pipeline and each of its four components removed in turn. The stages a
cell shares with the base cell are linked, not recomputed. Writes WORKDIR/ablation.md and WORKDIR/ablation.json
and prints the table.
"""

import json
import os
import sys

import jax

from jaxpurify import cli, experiments
from jaxpurify.errors import UserError

USAGE = ("usage: python -m jaxpurify.ablate --config configs/NAME.py[:ARGS] "
         "[--workdir DIR] [--grid oat|full] [--config.a.b=V ...]")


def main(argv: list[str]) -> int:
  if cli.wants_help(argv, USAGE):
    return 0
  where = {}

  def body():
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
    config = cli.load_config(parsed.config, parsed.arg, parsed.overrides)
    experiment = experiments.module(config.experiment)
    if not hasattr(experiment, "ablate"):
      ablated = [n for n in experiments.names() if hasattr(experiments.module(n), "ablate")]
      raise UserError(f"experiment {config.experiment!r} has no ablation; ablations exist for "
                      f"{', '.join(ablated)} (configs/{'.py, configs/'.join(ablated)}.py)")
    suffix = "-" + parsed.arg if parsed.arg else ""
    where["workdir"] = workdir = parsed.workdir or os.path.join("runs", experiment.ABLATION_NAME + suffix)
    rows, text, title = experiment.ablate(config, workdir, grid)
    title += f" ({parsed.arg or 'default'})"
    if jax.process_index() == 0:
      with open(os.path.join(workdir, "ablation.json"), "w", encoding="utf-8") as f:
        json.dump(rows, f, indent=2)
      with open(os.path.join(workdir, "ablation.md"), "w", encoding="utf-8") as f:
        f.write(f"# {title}\n\n{text}\n")
      print(f"\n{text}\n\ntable: {workdir}/ablation.md")

  return cli.guarded(body, lambda: where.get("workdir"))

if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
