"""Throughput of a config's training step, built as training builds it, on synthetic images: the step its
experiment module names (`bench_step`): SSL pre-training (simclr, moco, byol, ctrl), encoder poisoning (badencoder,
drupe), distillation (distill), downstream fine-tuning (threat: the last of config.finetune.protocols) or T-Core's
confusion training (tcore).

  python -m jaxpurify.bench [--config configs/simclr.py[:ARGS]] [--config.a.b=V ...] [--steps N]
                            [--warmup N] [--json PATH] [--compare torch] [--profile DIR]

Prints device, compile time, step time, images/s, peak memory, XLA's FLOPs per step and the
utilisation of the device's peak. `--compare torch` then times the PyTorch reference of the same step
(`benchmarks/torch_reference`, benchmarks/README.md) and prints its images/s and the ratio. `--profile DIR`
writes a `jax.profiler` trace of PROFILED_STEPS more steps, after the timed ones, to DIR.
Bad input ends in one `error: ...` line and exit status 2.
"""

import json
import os
import sys
import time

import jax

from jaxpurify import cli, experiments, models, parallel
from jaxpurify.errors import UserError

DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "simclr.py")
USAGE = ("usage: python -m jaxpurify.bench [--config configs/simclr.py[:ARGS]] [--config.a.b=V ...] "
         "[--steps N] [--warmup N] [--json PATH] [--compare torch] [--profile DIR]")
PROFILED_STEPS = 3

# Peak dense (no sparsity) TFLOP/s per device, vendor data sheets: 'fp32' on CUDA cores, 'tf32' and
# 'bf16' on tensor cores / the TPU MXU. Keys are `device.device_kind`; every A100 variant has one row.
PEAK_TFLOPS = {
    "NVIDIA H100 80GB HBM3": {"fp32": 67.0, "tf32": 494.7, "bf16": 989.0},  # H100 SXM
    "NVIDIA H100 PCIe": {"fp32": 51.0, "tf32": 378.0, "bf16": 756.0},
    "NVIDIA H200": {"fp32": 67.0, "tf32": 494.7, "bf16": 989.0},  # SXM: the H100 SXM's compute
    "NVIDIA A100": {"fp32": 19.5, "tf32": 156.0, "bf16": 312.0},
    "TPU v4": {"bf16": 275.0},
    "TPU v5 lite": {"bf16": 197.0},  # v5e
    "TPU v5": {"bf16": 459.0},  # v5p
    "TPU v6 lite": {"bf16": 918.0},  # v6e
}


def matmul_peak(device_kind: str, precision: str | None, dtype: str = "float32") -> tuple[float, str] | None:
  """(TFLOP/s, what) of the unit that runs the step's matmuls and convolutions, or None if unknown.

  bfloat16 steps: bf16 tensor cores / the MXU. float32 steps: NVIDIA's TF32 tensor cores at JAX's default
  precision, CUDA-core fp32 at 'highest'/'float32'; TPU's bf16 MXU passes (at 'highest' XLA runs several, so
  utilisation reads low).
  """
  kind = "NVIDIA A100" if device_kind.startswith("NVIDIA A100") else device_kind
  peaks = PEAK_TFLOPS.get(kind)
  if peaks is None:
    return None
  if "tf32" not in peaks:
    return peaks["bf16"], f"{device_kind}, bf16 MXU, dense"
  if dtype == "bfloat16":
    return peaks["bf16"], f"{device_kind}, bf16 tensor cores, dense"
  if precision in ("highest", "float32"):
    return peaks["fp32"], f"{device_kind}, fp32 CUDA cores (jax_default_matmul_precision={precision})"
  return peaks["tf32"], f"{device_kind}, tf32 tensor cores, dense (f32 matmuls at JAX's default precision)"


def _count(least: int):
  def parse(text: str) -> int:
    if not text.isdigit() or int(text) < least:
      raise UserError(f"expected an integer >= {least}, got {text!r}; {USAGE}")
    return int(text)
  return parse


def _compare(text: str) -> str:
  if text != "torch":
    raise UserError(f"unknown --compare {text!r}; the one reference is --compare torch (benchmarks/README.md)")
  return text


def parse_argv(argv: list[str]) -> cli.Args:
  """cli.parse_argv with --steps, --warmup, --json, --compare and --profile; --config defaults to the full SimCLR
  config."""
  if not any(a == "--config" or a.startswith("--config=") for a in argv):
    argv = [f"--config={DEFAULT_CONFIG}", *argv]
  return cli.parse_argv(argv, USAGE, {"steps": (20, _count(1)), "warmup": (3, _count(0)), "json": (None, str),
                                      "compare": (None, _compare), "profile": (None, str)}, workdir=False)


def peak_memory() -> tuple[int, int] | None:
  """(max peak bytes in use, bytes limit) over this process' devices; None where the backend keeps no stats."""
  stats = [d.memory_stats() for d in jax.local_devices()]
  if not all(s and "peak_bytes_in_use" in s for s in stats):
    return None
  return max(s["peak_bytes_in_use"] for s in stats), min(s.get("bytes_limit", 0) for s in stats)


def measure(config, steps: int, warmup: int, profile: str | None = None) -> dict:
  """Builds, compiles and times config's training step; returns the numbers `report` prints. With `profile` (a
  folder), a jax.profiler trace of PROFILED_STEPS further steps goes there."""
  size = config.data.image_size
  mesh = parallel.make_mesh(config.mesh)
  with jax.set_mesh(mesh):
    state, step, batch_fn, batch_size, per_image = experiments.module(config.experiment).bench_step(config, mesh)
    key = jax.device_put(jax.random.key(config.seed), parallel.replicated(mesh))

    tick = time.perf_counter()
    compiled = step.lower(state, batch_fn(0), key).compile()
    compile_s = time.perf_counter() - tick
    flops = (compiled.cost_analysis() or {}).get("flops", 0.0)  # one device's partition of the program

    def run(first, count):
      nonlocal state
      for i in range(first, first + count):
        with jax.profiler.StepTraceAnnotation("train_step", step_num=i):
          state, metrics = compiled(state, batch_fn(i), key)
      jax.block_until_ready((state, metrics))

    if warmup:
      run(0, warmup)
    tick = time.perf_counter()
    run(warmup, steps)
    step_s = (time.perf_counter() - tick) / steps
    if profile:
      with jax.profiler.trace(profile):
        run(warmup + steps, PROFILED_STEPS)

  device = jax.devices()[0]
  memory = peak_memory()
  dtype = str(models.compute_dtype(config.model.dtype))
  peak = matmul_peak(device.device_kind, jax.config.jax_default_matmul_precision, dtype)
  achieved = flops / step_s / 1e12 if flops > 0 else None
  return {
      "device_kind": device.device_kind, "platform": device.platform, "device_count": jax.device_count(),
      "process_count": jax.process_count(),
      "experiment": config.experiment, "model": config.model.name, "width": config.model.width,
      "image_size": size, "global_batch": batch_size, "per_image": per_image, "dtype": dtype,
      "steps": steps, "warmup": warmup,
      "compile_s": compile_s, "step_ms": step_s * 1e3, "images_per_s": batch_size / step_s,
      "peak_memory_bytes": memory and memory[0], "memory_limit_bytes": memory and (memory[1] or None),
      "flops_per_step_per_device": flops if flops > 0 else None,
      "flops_per_step": flops * jax.device_count() if flops > 0 else None,
      "achieved_tflops_per_device": achieved,
      "peak_tflops_per_device": peak and peak[0], "peak_used": peak and peak[1],
      "utilisation": achieved / peak[0] if achieved and peak else None,
  }


def _si(value: float, unit: str) -> str:
  for scale, prefix in ((1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
    if value >= scale:
      return f"{value / scale:.3g} {prefix}{unit}"
  return f"{value:.3g} {unit}"


def report(r: dict, config_name: str) -> str:
  """The numbers of `measure` as a few labelled lines."""
  n = r["device_count"]
  mem = "n/a (the backend reports no memory statistics)"
  if r["peak_memory_bytes"] is not None:
    mem = f"{r['peak_memory_bytes'] / 2**30:.2f} GiB on the busiest device"
    mem += f" (of {r['memory_limit_bytes'] / 2**30:.1f} GiB)" if r["memory_limit_bytes"] else ""
  flops = achieved = "n/a (XLA gave no cost analysis)"
  if r["flops_per_step"] is not None:
    flops = (f"{_si(r['flops_per_step'], 'FLOP')} = {n} x {_si(r['flops_per_step_per_device'], 'FLOP')} "
             "per device (XLA cost analysis of the compiled step)")
    tflops = r["achieved_tflops_per_device"]
    achieved = f"{tflops:.3g} TFLOP/s per device ({tflops * n:.3g} total)"
  peak = f"{r['peak_tflops_per_device']:g} TFLOP/s per device: {r['peak_used']}" if r["peak_used"] else \
      f"n/a (no peak known for device kind {r['device_kind']!r}; see PEAK_TFLOPS in jaxpurify/bench.py)"
  util = "n/a" if r["utilisation"] is None else \
      f"{100 * r['utilisation']:.1f}% (achieved / peak; XLA's count includes non-matmul work)"
  rows = [
      ("config", f"{config_name} ({r['experiment']} step, {r['dtype']})"),
      ("devices", f"{n} x {r['device_kind']} ({r['platform']}, {r['process_count']} process(es))"),
      ("model", f"{r['model']} width {r['width']}, {r['image_size']}x{r['image_size']} images"),
      ("batch", f"{r['global_batch']} images global ({r['global_batch'] // n} per device), {r['per_image']}"),
      ("compile", f"{r['compile_s']:.1f} s (trace, lower and XLA-compile the step)"),
      ("step time", (f"{r['step_ms']:.1f} ms (mean of {r['steps']} steps after {r['warmup']} warm-up, "
                     "with the on-device batch gather)")),
      ("throughput", f"{r['images_per_s']:.1f} images/s (global batch / step time)"),
      ("peak memory", mem),
      ("FLOPs/step", flops),
      ("achieved", achieved),
      ("peak", peak),
      ("utilisation", util),
  ]
  return "\n".join(f"{label:<12} {text}" for label, text in rows)


def compare_report(r: dict) -> str:
  """The torch reference's numbers in `measure`'s result (r['torch']) and the ratio, as `report`'s lines."""
  t = r["torch"]
  rows = [("torch", (f"{t['step']} in PyTorch {t['torch_version']} ({t['device']}, {t['dtype']}, {t['threads']} "
                     f"threads, DataLoader with {t['workers']} workers, batch {t['global_batch']}): "
                     f"{t['step_ms']:.1f} ms per step, {t['images_per_s']:.1f} images/s")),
          ("ratio", f"{r['ratio_vs_torch']:.2f} (jaxpurify images/s / torch images/s)")]
  return "\n".join(f"{label:<12} {text}" for label, text in rows)


def main(argv: list[str]) -> int:
  if cli.wants_help(argv, USAGE):
    return 0

  def body():
    args = parse_argv(argv)
    config = cli.load_config(args.config, args.arg, args.overrides)
    if args.extra["compare"]:
      if models.is_vit(config.model.name):
        raise UserError(f"--compare torch: the PyTorch references are ResNets, not {config.model.name}; drop --compare "
                        "or set config.model.name to a ResNet")
      from benchmarks import torch_reference  # pylint: disable=g-import-not-at-top  (the repository's, not packaged)
      torch_reference.check(config)  # before the JAX side: a missing torch or reference fails fast
    if (profile := args.extra["profile"]) and os.path.exists(profile) and not os.path.isdir(profile):
      raise UserError(f"--profile {profile} is a file; pass a folder for the trace")
    result = measure(config, args.extra["steps"], args.extra["warmup"], profile)
    name = os.path.relpath(args.config) + (f":{args.arg}" if args.arg else "")
    print(report(result, name), flush=True)
    if profile:
      print(f"{'profile':<12} {PROFILED_STEPS} more steps traced in {profile} (jax.profiler: open it with XProf or "
            "TensorBoard's profile plugin)", flush=True)
    if args.extra["compare"]:
      result["torch"] = torch_reference.measure(config, args.extra["steps"], args.extra["warmup"])
      result["ratio_vs_torch"] = result["images_per_s"] / result["torch"]["images_per_s"]
      print(compare_report(result))
    if path := args.extra["json"]:
      try:
        with open(path, "w", encoding="utf-8") as f:
          json.dump({"config": name, **result}, f, indent=2)
      except OSError as err:
        raise UserError(f"cannot write --json {path}: {err.strerror}; choose a writable path") from None

  return cli.guarded(body)

if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
