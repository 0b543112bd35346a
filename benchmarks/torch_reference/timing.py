"""Steady-state timing of a reference pipeline, end to end: WORKERS DataLoader processes transform the images while
the main process waits for each batch, copies it to the device (pinned memory on CUDA) and runs the eager step,
under bfloat16 autocast where jaxpurify's step computes in bfloat16 (config.model.dtype), as PyTorch's AMP runs
mixed precision. The clock covers `steps` steps after `warmup` steps (which include starting the workers)."""

import os
import time
import warnings

import torch
from torch.utils.data import DataLoader, RandomSampler

from benchmarks.torch_reference import pipelines
from jaxpurify.models import compute_dtype

WORKERS = 2  # the official loaders' num_workers


def _batches(pipeline: pipelines.Pipeline, count: int, device: torch.device):
  """An iterator over `count` shuffled full batches of the pipeline's dataset, its workers started."""
  sampler = RandomSampler(pipeline.dataset, num_samples=count * pipeline.batch_size)
  loader = DataLoader(pipeline.dataset, pipeline.batch_size, sampler=sampler, num_workers=WORKERS,
                      pin_memory=device.type == "cuda", drop_last=True)
  with warnings.catch_warnings():  # JAX warns on every fork; the workers never call JAX
    warnings.filterwarnings("ignore", "os.fork", RuntimeWarning)
    return iter(loader)


def _run(pipeline: pipelines.Pipeline, batches, count: int, device: torch.device, bfloat16: bool) -> None:
  """`count` steps on the next batches (under bfloat16 autocast if `bfloat16`), then a wait for the device."""
  for _ in range(count):
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bfloat16):
      pipeline.step(*(t.to(device, non_blocking=True) for t in next(batches)))
  if device.type == "cuda":
    torch.cuda.synchronize(device)


def measure(config, ref, steps: int, warmup: int) -> dict:
  """config's reference pipeline (`ref`: its REFERENCES entry) on CUDA if there is one, else on the CPU with
  os.cpu_count() threads -> its numbers, images/s counting images (not views) as jaxpurify's bench does."""
  torch.set_num_threads(os.cpu_count())
  torch.manual_seed(config.seed)
  device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
  pipeline = pipelines.BUILDERS[config.experiment](config, device)
  batches = _batches(pipeline, warmup + steps, device)
  dtype = str(compute_dtype(config.model.dtype))
  _run(pipeline, batches, warmup, device, dtype == "bfloat16")
  tick = time.perf_counter()
  _run(pipeline, batches, steps, device, dtype == "bfloat16")
  step_s = (time.perf_counter() - tick) / steps
  return {"step": ref.what, "torch_version": torch.__version__,
          "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
          "threads": torch.get_num_threads(), "workers": WORKERS, "dtype": dtype, "global_batch": pipeline.batch_size,
          "steps": steps, "warmup": warmup, "step_ms": step_s * 1e3, "images_per_s": pipeline.batch_size / step_s}
