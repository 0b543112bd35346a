"""Throughput of a config's training step, built as training builds it, on synthetic images: the SSL
pre-training step (simclr, moco, byol, ctrl configs), the encoder-poisoning step (badencoder, drupe), the
distillation defense's step (distill) or the downstream fine-tuning step (threat: the last of
config.finetune.protocols, FT-all unless set).

  python -m jaxpurify.bench [--config configs/simclr.py[:ARGS]] [--config.a.b=V ...] [--steps N]
                            [--warmup N] [--json PATH]

Prints device, compile time, step time, images/s, peak memory, XLA's FLOPs per step and the
utilisation of the device's peak. Bad input ends in one `error: ...` line and exit status 2.
"""

import json
import os
import sys
import time

import jax
import numpy as np

from jaxpurify import cli, encoders, parallel, stages
from jaxpurify.errors import UserError
from jaxpurify.train.state import create_state

DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "simclr.py")
USAGE = ("usage: python -m jaxpurify.bench [--config configs/simclr.py[:ARGS]] [--config.a.b=V ...] "
         "[--steps N] [--warmup N] [--json PATH]")
OPTIONS = {"--steps": ("steps", 1), "--warmup": ("warmup", 0), "--json": ("json", None)}
NUM_BATCHES = 4  # synthetic images: this many global batches, cycled through as epochs

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


def matmul_peak(device_kind: str, precision: str | None) -> tuple[float, str] | None:
  """(TFLOP/s, what) of the unit that runs float32 matmuls and convolutions, or None if unknown.

  NVIDIA: TF32 tensor cores at JAX's default precision, CUDA-core fp32 at 'highest'/'float32'.
  TPU: bf16 MXU passes (at 'highest' XLA runs several, so utilisation reads low).
  """
  kind = "NVIDIA A100" if device_kind.startswith("NVIDIA A100") else device_kind
  peaks = PEAK_TFLOPS.get(kind)
  if peaks is None:
    return None
  if "tf32" not in peaks:
    return peaks["bf16"], f"{device_kind}, bf16 MXU, dense"
  if precision in ("highest", "float32"):
    return peaks["fp32"], f"{device_kind}, fp32 CUDA cores (jax_default_matmul_precision={precision})"
  return peaks["tf32"], f"{device_kind}, tf32 tensor cores, dense (f32 matmuls at JAX's default precision)"


def parse_argv(argv: list[str]) -> tuple[dict, dict]:
  """-> (cli.parse_argv's dict, {'steps', 'warmup', 'json'}); --config defaults to the full SimCLR config."""
  opts, config_args = {"steps": 20, "warmup": 3, "json": None}, []
  args = list(argv)
  while args:
    item = args.pop(0)
    name, eq, value = item.partition("=")
    if not (name in OPTIONS or name == "--config" or name.startswith("--config.")):
      raise UserError(f"unknown argument {item!r}; {USAGE}")
    if not eq:
      if not args:
        raise UserError(f"{name} needs a value; {USAGE}")
      value = args.pop(0)
    if name not in OPTIONS:
      config_args.append(f"{name}={value}")
      continue
    key, least = OPTIONS[name]
    if least is not None:
      if not value.isdigit() or int(value) < least:
        raise UserError(f"{name}={value}: expected an integer >= {least}")
      value = int(value)
    opts[key] = value
  if not any(a.startswith("--config=") for a in config_args):
    config_args.insert(0, f"--config={DEFAULT_CONFIG}")
  return cli.parse_argv(config_args), opts


def peak_memory() -> tuple[int, int] | None:
  """(max peak bytes in use, bytes limit) over this process' devices; None where the backend keeps no stats."""
  stats = [d.memory_stats() for d in jax.local_devices()]
  if not all(s and "peak_bytes_in_use" in s for s in stats):
    return None
  return max(s["peak_bytes_in_use"] for s in stats), min(s.get("bytes_limit", 0) for s in stats)


def _synthetic_images(count: int, size: int) -> np.ndarray:
  return np.random.default_rng(0).integers(0, 256, (count, size, size, 3), np.uint8)


def ssl_bench(config, mesh):
  """The pre-training step of config.pretrain -> (state, step, batch_fn, global batch, what a batch holds)."""
  batch_size = config.pretrain.train.batch_size
  images = _synthetic_images(NUM_BATCHES * batch_size, config.data.image_size)
  _, state, step, dataset, _ = stages.ssl_training(config, images, mesh)
  return state, step, dataset.batch, batch_size, "2 augmented views each"


def attack_bench(config, mesh):
  """The BadEncoder/DRUPE step on an untrained clean encoder -> (state, step, batch_fn, global batch, what)."""
  attack, size = config.attack, config.data.image_size
  clean = parallel.put_replicated(encoders.build_backbone(config.model, config.seed), mesh)
  shadow = _synthetic_images(NUM_BATCHES * attack.train.batch_size, size)
  refs = _synthetic_images(attack.num_references, size)
  state, step, _ = stages.attack_training(config, clean, len(shadow), mesh)
  batch_fn = stages.attack_batches(config, clean, shadow, refs, mesh)
  what = f"shadow, triggered and {attack.num_references} x augmented-reference images each"
  return state, step, batch_fn, attack.train.batch_size, what


def distill_bench(config, mesh):
  """The distillation step: a random student and teacher of the configured architectures -> (state, step,
  batch_fn, global batch, what)."""
  from jaxpurify.defenses import stages as defense_stages  # pylint: disable=g-import-not-at-top
  ssl = config.defense.ssl
  images = _synthetic_images(NUM_BATCHES * ssl.train.batch_size, config.data.image_size)
  teacher = parallel.put_replicated(encoders.build_backbone(defense_stages.teacher_model(config), config.seed), mesh)
  student_config = defense_stages.ssl_config(config, ssl.train.epochs, model=defense_stages.student_model(config))
  graphdef, student, *_ = stages.ssl_training(student_config, images, mesh)
  state, step, _, batch_fn, _ = defense_stages.distill_training(
      config, teacher, (graphdef, student.params, student.batch_stats), images, mesh)
  return state, step, batch_fn, ssl.train.batch_size, "2 student views (trained) and 1 teacher view (inference) each"


def finetune_bench(config, mesh):
  """The downstream fine-tuning step of config.finetune.protocols[-1] (FT-all by default) on an untrained encoder
  -> (state, step, batch_fn, global batch, what)."""
  from jaxpurify import threats  # pylint: disable=g-import-not-at-top
  protocol = config.finetune.protocols[-1]
  batch_size = config.finetune[protocol].train.batch_size
  images = _synthetic_images(NUM_BATCHES * batch_size, config.data.image_size)
  labels = np.arange(len(images)) % 10
  encoder = parallel.put_replicated(encoders.build_backbone(config.model, config.seed), mesh)
  _, state, step, dataset, _ = threats.finetune_training(config, protocol, encoder, images, labels, 10, mesh)
  return state, step, dataset.batch, batch_size, f"{protocol}: 1 augmented labelled view each"


def confusion_bench(config, mesh):
  """T-Core's confusion-training step (round 1's lambda and lr, FT-all or head per config.tcore.expand) on an
  untrained encoder -> (state, step, batch_fn, global batch, what)."""
  from jaxpurify import finetune  # pylint: disable=g-import-not-at-top
  from jaxpurify.defenses import tcore  # pylint: disable=g-import-not-at-top
  e = config.tcore.expand
  images = _synthetic_images(NUM_BATCHES * e.batch_size, config.data.image_size)
  seeds = _synthetic_images(NUM_BATCHES * e.seed_batch_size, config.data.image_size)
  encoder = parallel.put_replicated(encoders.build_backbone(config.model, config.seed), mesh)
  tx = tcore.confusion_optimizer(config, 0)
  graphdef, state = create_state(lambda: finetune.build_classifier(encoder, 10, config.finetune.head, config.seed),
                                 tx, mesh)
  step, batch_fn = tcore.confusion_training(
      config, 0, graphdef, tx, {"image": images, "label": (np.arange(len(images)) % 10).astype(np.int32),
                                "weight": np.ones(len(images), np.float32)},
      {"seed_image": seeds, "seed_pred": (np.arange(len(seeds)) % 10).astype(np.int32)}, 10, mesh, config.seed)
  return (state, step, batch_fn, e.batch_size + e.seed_batch_size,
          f"{e.batch_size} suspect + {e.seed_batch_size} seed images, 1 augmented view each")


BENCHES = {"pretrain": ssl_bench, "ctrl": ssl_bench, "badencoder": attack_bench, "drupe": attack_bench,
           "distill": distill_bench, "threat": finetune_bench, "tcore": confusion_bench}


def measure(config, steps: int, warmup: int) -> dict:
  """Builds, compiles and times config's training step; returns the numbers `report` prints."""
  if config.experiment not in BENCHES:
    raise UserError(f"config.experiment={config.experiment!r} has no step to time; benchmarked: "
                    f"{', '.join(BENCHES)}")
  size = config.data.image_size
  mesh = parallel.make_mesh(config.mesh)
  with jax.set_mesh(mesh):
    state, step, batch_fn, batch_size, per_image = BENCHES[config.experiment](config, mesh)
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

  device = jax.devices()[0]
  memory = peak_memory()
  peak = matmul_peak(device.device_kind, jax.config.jax_default_matmul_precision)
  achieved = flops / step_s / 1e12 if flops > 0 else None
  return {
      "device_kind": device.device_kind, "platform": device.platform, "device_count": jax.device_count(),
      "process_count": jax.process_count(),
      "experiment": config.experiment, "model": config.model.name, "width": config.model.width,
      "image_size": size, "global_batch": batch_size, "per_image": per_image, "dtype": "float32",
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
      ("step time", f"{r['step_ms']:.1f} ms (mean of {r['steps']} steps after {r['warmup']} warm-up, "
                    "with the on-device batch gather)"),
      ("throughput", f"{r['images_per_s']:.1f} images/s (global batch / step time)"),
      ("peak memory", mem),
      ("FLOPs/step", flops),
      ("achieved", achieved),
      ("peak", peak),
      ("utilisation", util),
  ]
  return "\n".join(f"{label:<12} {text}" for label, text in rows)


def main(argv: list[str]) -> int:
  try:
    args, opts = parse_argv(argv)
    config = cli.load_config(args["config"], args["arg"])
    cli.apply_overrides(config, args["overrides"])
    result = measure(config, opts["steps"], opts["warmup"])
    name = os.path.relpath(args["config"]) + (f":{args['arg']}" if args["arg"] else "")
    print(report(result, name))
    if opts["json"]:
      try:
        with open(opts["json"], "w", encoding="utf-8") as f:
          json.dump({"config": name, **result}, f, indent=2)
      except OSError as err:
        raise UserError(f"cannot write --json {opts['json']}: {err.strerror}; choose a writable path") from None
    return 0
  except UserError as err:
    print(f"error: {err}", file=sys.stderr)
    return 2


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
