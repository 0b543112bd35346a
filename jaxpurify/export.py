"""A run's encoder as a PyTorch checkpoint with the key names of the model it came from (docs/interop.md):

  python -m jaxpurify.export --workdir runs/X [--stage distill] [--format safetensors|torch]
                             --map badencoder|torchvision|ctrl OUT

--stage: the stage whose checkpoint to write (default: the run's last encoder, the first finished of distill,
attack, pretrain_poisoned, pretrain). --map badencoder: BadEncoder's and DRUPE's SimCLR keys, `f.f.*` and `g.*`
from the stage's projection head where it has one; in torch format inside {'state_dict': ...} as their scripts read
it. --map torchvision: torchvision's ResNet names, no `fc`. --map ctrl: CTRL's `backbone.*` (no projection head);
in torch format inside {'epoch': step, 'state_dict': ...} as its utils/util.py load_model reads it. --format
(default: from OUT's suffix, .safetensors or .pth/.pt/.tar): torch writes a zip archive that `torch.load(OUT,
weights_only=True)` reads, made without torch. Bad input ends in one `error: ...` line and exit status 2.
"""

import json
import os
import sys

import ml_collections
import numpy as np
from flax import nnx

from jaxpurify import cli, encoders, interop
from jaxpurify.errors import UserError
from jaxpurify.models import ProjectionHead

USAGE = ("usage: python -m jaxpurify.export --workdir runs/X [--stage STAGE] [--format safetensors|torch] "
         "--map badencoder|torchvision|ctrl OUT")
FORMATS = {"safetensors": (".safetensors",), "torch": (".pth", ".pt", ".tar")}
STUDENT_STAGES = ("warmup", "distill")  # stages that train the defense's student (config.defense.student.model)


def parse_argv(argv: list[str]) -> tuple[cli.Args, str]:
  """(cli.Args with --stage, --format, --map; OUT), OUT the last argument (not a flag's value)."""
  flags = {"stage": (None, str), "format": (None, str), "map": (None, str)}
  takes_value = len(argv) > 1 and argv[-2].startswith("--") and "=" not in argv[-2] and argv[-2] != "--distributed"
  if not argv or argv[-1].startswith("--") or takes_value:
    raise UserError(f"OUT (the file to write) is missing; {USAGE}")
  args = cli.parse_argv(argv[:-1], USAGE, flags, config=False)
  if args.workdir is None:
    raise UserError(f"--workdir is required; {USAGE}")
  if args.extra["map"] is None:
    raise UserError(f"--map is required; {USAGE}")
  return args, argv[-1]


def _plain(tree):
  """orbax's nested dicts -> arrays (an nnx Variable is stored as {'value': array})."""
  if isinstance(tree, dict):
    return _plain(tree["value"]) if set(tree) == {"value"} else {k: _plain(v) for k, v in tree.items()}
  return np.asarray(tree)


def projection_head(raw: dict) -> nnx.Module | None:
  """The ProjectionHead of a restored SSL state (params/head, batch_stats/head), or None where it has none."""
  params, stats = (raw.get(kind, {}).get("head") for kind in ("params", "batch_stats"))
  if not (isinstance(params, dict) and {"fc1", "bn", "fc2"} <= set(params) and isinstance(stats, dict)):
    return None
  params, stats = _plain(params), _plain(stats)
  (features, hidden), out = params["fc1"]["kernel"].shape, params["fc2"]["kernel"].shape[1]
  head = ProjectionHead(features, hidden, out, rngs=nnx.Rngs(0))
  nnx.update(head, {"fc1": params["fc1"], "bn": params["bn"], "fc2": params["fc2"]}, {"bn": stats["bn"]})
  return head


def export(workdir: str, out: str, import_map: str, fmt: str | None = None, stage: str | None = None) -> str:
  """Writes the encoder of `workdir`'s `stage` (default: its last) to `out`; -> the line to show."""
  if interop.keymaps.parse(import_map) is None:
    raise UserError("--map auto has nothing to detect on export; pass --map badencoder, torchvision or ctrl")
  fmt = fmt or next((name for name, suffixes in FORMATS.items() if out.lower().endswith(suffixes)), None)
  if fmt not in FORMATS or not out.lower().endswith(FORMATS[fmt]):
    raise UserError(f"cannot tell the format of {out}: name it .safetensors (--format safetensors) or .pth/.pt/.tar "
                    "(--format torch)")
  if os.path.dirname(out) and not os.path.isdir(os.path.dirname(out)):
    raise UserError(f"folder {os.path.dirname(out)} does not exist; create it or write OUT elsewhere")
  saved = os.path.join(workdir, "config.json")
  if not os.path.isfile(saved):
    raise UserError(f"{workdir} holds no jaxpurify run (no config.json); pass a run's workdir as --workdir")
  with open(saved, encoding="utf-8") as f:
    config = ml_collections.ConfigDict(json.load(f))
  if stage and not os.path.isdir(os.path.join(workdir, stage, "ckpt")):
    known = sorted(d for d in os.listdir(workdir) if os.path.isdir(os.path.join(workdir, d, "ckpt")))
    raise UserError(f"{workdir} has no stage {stage!r} with a checkpoint; pass one of {', '.join(known) or 'none'} "
                    "as --stage")
  directory, step, raw = encoders.restore(workdir, (stage,) if stage else encoders.FINAL_STAGES, "--workdir")
  model = config.model
  if os.path.basename(os.path.dirname(directory)) in STUDENT_STAGES:
    from jaxpurify.defenses.distill import training  # pylint: disable=g-import-not-at-top
    model = training.student_model(config)
  encoder = encoders.backbone_from(raw, model, directory, "--workdir")
  backbone = nnx.merge(encoder.graphdef, encoder.params, encoder.batch_stats)
  tensors = interop.state_dict(backbone, import_map, projection_head(raw), batches=step)
  wraps = {"badencoder": {}, "ctrl": {"epoch": step}}  # the checkpoint dicts their scripts read
  interop.write(out, tensors, fmt, wrap=wraps.get(interop.keymaps.parse(import_map).style) if fmt == "torch" else None)
  return (f"wrote {out}: {len(tensors)} tensors with {import_map} keys ({next(iter(tensors))}, ...) from "
          f"{directory} step {step}")


def main(argv: list[str]) -> int:
  if any(item in ("-h", "--help") for item in argv):
    print(__doc__)
    return 0

  def body():
    args, out = parse_argv(argv)
    print(export(args.workdir, out, args.extra["map"], args.extra["format"], args.extra["stage"]))

  return cli.guarded(body)


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
