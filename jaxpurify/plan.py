"""The cost of a config's whole pipeline before anyone rents a device: each training stage's step compiled at its
real batch (compile only, no training; runs on a CPU), with XLA's FLOPs and memory, and the time it would take.

  python -m jaxpurify.plan --config configs/distill.py[:ARGS] [--config.a.b=V ...] [--mfu 0.4]

An experiment module lists its stages (`plan(config)` -> [PlanStage]); each stage is a step built as its
`bench_step` builds it (or an inference forward), run `steps` times, the number the full config's data sets give
(split sizes from `jaxpurify.data.catalog`, so nothing needs to be prepared). Per stage: steps, FLOPs per step,
XLA's memory analysis (arguments, outputs, temporaries) of the step compiled for the devices at hand (one CPU: the
whole global batch on one device, an upper bound for data parallelism), whether that fits 16/40/80/141 GB, and the
hours on H100, H200, A100, TPU v4 and v5e at a stated utilisation of the device's peak (`--mfu`, default 0.4; small
CIFAR ResNets reach far less on large accelerators). The steps compile in the dtype an accelerator runs them in
(config.model.dtype 'auto' is bfloat16 there) and the peak is that dtype's. The evaluation heads (MLP, linear, kNN on
cached features) and the attacks' auxiliary models are not counted.
"""

import json
import math
import sys
from collections.abc import Callable
from typing import NamedTuple

import jax

from jaxpurify import cli, encoders, experiments, parallel
from jaxpurify.bench import matmul_peak
from jaxpurify.data import catalog, synthetic
from jaxpurify.errors import UserError
from jaxpurify.pipeline import derived_config

USAGE = "usage: python -m jaxpurify.plan --config configs/NAME.py[:ARGS] [--config.a.b=V ...] [--mfu 0.4]"
MEMORY_GB = (16, 40, 80, 141)
# Devices of the estimate (their device kind). Their peaks are bench.matmul_peak's at JAX's default precision: float32
# steps on TF32 tensor cores on NVIDIA and the bf16 MXU on TPUs, bfloat16 steps on the bf16 units of both.
TARGETS = {"H100": "NVIDIA H100 80GB HBM3", "H200": "NVIDIA H200", "A100": "NVIDIA A100", "TPU v4": "TPU v4",
           "TPU v5e": "TPU v5 lite"}


def target_peaks(dtype: str) -> dict[str, float]:
  """Dense peak TFLOP/s of each target for steps computing in `dtype` ('float32' or 'bfloat16')."""
  return {name: matmul_peak(kind, None, dtype)[0] for name, kind in TARGETS.items()}


def accelerator_dtype(config) -> str:
  """The compute dtype config.model.dtype gives on an accelerator ('auto' -> 'bfloat16')."""
  return "bfloat16" if config.model.dtype == "auto" else config.model.dtype


class PlanStage(NamedTuple):
  """A stage of the pipeline: `steps` runs of the function `build(mesh)` -> (jitted fn, example args) builds."""
  name: str
  steps: int
  build: Callable


def bench_stage(name: str, steps: int, config, experiment: str | None = None,
                overrides: dict | None = None) -> PlanStage:
  """`steps` training steps of the bench step of `experiment` (default config.experiment) on `config` with
  {dotted key: value} `overrides`."""
  config = derived_config(config, overrides or {})

  def build(mesh):
    state, step, batch_fn, *_ = experiments.module(experiment or config.experiment).bench_step(config, mesh)
    return step, (state, batch_fn(0), jax.device_put(jax.random.key(0), parallel.replicated(mesh)))

  return PlanStage(name, steps, build)


def forward_stage(name: str, images: int, config, model=None) -> PlanStage:
  """Inference forwards of an encoder (config.model, or `model`) over `images` images at config.evaluate's batch."""
  model = model or config.model
  batch = config.evaluate.batch_size

  def build(mesh):
    encoder = parallel.put_replicated(encoders.build_backbone(model, 0), mesh)
    encode = encoders.forward(encoder.graphdef, tuple(model.mean), tuple(model.std), None)
    images_ = parallel.put_batch(synthetic.images(batch, config.data.image_size), mesh)
    return encode, (encoder.params, encoder.batch_stats, images_)

  return PlanStage(name, math.ceil(images / batch), build)


def evaluation_stage(config, rows: int, backdoor: str | None = None) -> PlanStage:
  """The frozen-encoder evaluation: features of every evaluated set's train and test split (and the triggered
  test split of the `backdoor` set) for each of `rows` encoders."""
  images = sum(catalog.split_size(name, "train") + catalog.split_size(name, "test") * (2 if name == backdoor else 1)
               for name in config.evaluate.datasets)
  return forward_stage("evaluate (features)", rows * images, config)


def measure(stage: PlanStage, mesh) -> dict:
  """Compiles the stage's function -> {flops (per step, all devices), memory bytes (arguments, outputs, temps)}."""
  with jax.set_mesh(mesh):
    fn, args = stage.build(mesh)
    compiled = fn.lower(*args).compile()
  cost = compiled.cost_analysis() or {}
  cost = cost[0] if isinstance(cost, list) else cost
  memory = compiled.memory_analysis()
  fields = ("argument_size_in_bytes", "output_size_in_bytes", "temp_size_in_bytes", "alias_size_in_bytes")
  used = {f: int(getattr(memory, f, 0) or 0) for f in fields}
  peak = used["argument_size_in_bytes"] + used["output_size_in_bytes"] - used["alias_size_in_bytes"] \
      + used["temp_size_in_bytes"]
  return {"stage": stage.name, "steps": stage.steps, "flops_per_step": float(cost.get("flops", 0.0)) *
          jax.device_count(), "memory_bytes": peak, **{f.removesuffix("_size_in_bytes"): v for f, v in used.items()}}


def hours(flops: float, mfu: float, dtype: str) -> dict[str, float]:
  """Device-hours on each target at `mfu` of its peak for `dtype` steps."""
  return {name: flops / (peak * 1e12 * mfu) / 3600 for name, peak in target_peaks(dtype).items()}


def table(rows: list[dict], mfu: float, dtype: str) -> str:
  """Markdown: one line per stage and the pipeline's total."""
  head = ["stage", "steps", "GFLOP/step", "memory (GB)", "fits"] + [f"{t} h" for t in TARGETS]
  lines = ["| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
  total = 0.0
  for r in rows:
    flops = r["steps"] * r["flops_per_step"]
    total += flops
    gb = r["memory_bytes"] / 1e9
    fits = ", ".join(str(m) for m in MEMORY_GB if gb <= m) or "none"
    lines.append(f"| {r['stage']} | {r['steps']:,} | {r['flops_per_step'] / 1e9:,.1f} | {gb:.2f} | {fits} | "
                 + " | ".join(_hours(h) for h in hours(flops, mfu, dtype).values()) + " |")
  lines.append("| **total** | | | | | " + " | ".join(f"**{_hours(h)}**" for h in hours(total, mfu, dtype).values())
               + " |")
  units = "bf16 tensor cores on NVIDIA" if dtype == "bfloat16" else "TF32 on NVIDIA"
  return "\n".join(lines) + (f"\n\nDevice-hours of {dtype} steps at {mfu:.0%} of each device's dense peak "
                             f"({units}, bf16 MXU on TPU); divide by the device count for data parallelism.")


def _hours(h: float) -> str:
  return f"{h:.3g}" if h < 100 else f"{h:,.0f}"


def main(argv: list[str]) -> int:
  if cli.wants_help(argv, USAGE):
    return 0

  def body():
    args = cli.parse_argv(argv, USAGE, {"mfu": (0.4, float), "json": ("", str)}, workdir=False)
    mfu = args.extra["mfu"]
    if not 0 < mfu <= 1:
      raise UserError(f"--mfu {mfu} is not in (0, 1]; give the fraction of peak the steps reach, e.g. 0.4")
    config = cli.load_config(args.config, args.arg, args.overrides)
    dtype = accelerator_dtype(config)
    config = derived_config(config, {"model.dtype": dtype})
    experiment = experiments.module(config.experiment)
    if not hasattr(experiment, "plan"):
      raise UserError(f"experiment {config.experiment!r} has no plan yet; plans exist for "
                      f"{', '.join(n for n in experiments.names() if hasattr(experiments.module(n), 'plan'))}")
    mesh = parallel.make_mesh(config.mesh)
    rows = []
    for stage in experiment.plan(config):
      rows.append(measure(stage, mesh))
      print(f"compiled {stage.name}: {rows[-1]['flops_per_step'] / 1e9:,.1f} GFLOP/step", file=sys.stderr,
            flush=True)
    name = args.config + (f":{args.arg}" if args.arg else "")
    print(f"# Plan of {name} (compiled on {jax.device_count()} {jax.devices()[0].platform} device(s))\n\n"
          f"{table(rows, mfu, dtype)}")
    if args.extra["json"]:
      with open(args.extra["json"], "w", encoding="utf-8") as f:
        json.dump({"config": name, "mfu": mfu, "dtype": dtype, "stages": rows}, f, indent=2)

  return cli.guarded(body)


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
