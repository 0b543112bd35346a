"""Shared by the tests: the repository root, configs with overrides, and the CLI run in-process or as a process."""

import contextlib
import io
import os
import subprocess
import sys

import jax
import numpy as np

from jaxpurify import cli, experiments
from jaxpurify.defenses.baselines.inputs import Inputs
from jaxpurify.pipeline import Run, link_stages

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def config(name_arg: str, *overrides: str):
  """configs/<name>.py[:arg] (locked) with `--config.` overrides given as 'key=value'."""
  name, _, arg = name_arg.partition(":")
  return cli.load_config(os.path.join(ROOT, "configs", f"{name}.py"), arg or None,
                         [f"--config.{item}" for item in overrides])


def cli_main(*argv: str, main=cli.main) -> tuple[int, list[str], str]:
  """A command's main (default: main.py's) in-process -> (exit status, non-empty stderr lines, stdout)."""
  old_err, old_out = sys.stderr, sys.stdout
  sys.stderr, sys.stdout = err, out = io.StringIO(), io.StringIO()
  try:
    status = main(list(argv))
  finally:
    sys.stderr, sys.stdout = old_err, old_out
  return status, [line for line in err.getvalue().splitlines() if line.strip()], out.getvalue()


def main_py(*args: str, devices: int = 8, env: dict | None = None, **kwargs) -> subprocess.Popen:
  """`python main.py ARGS` as a process on `devices` fake CPU devices (the test session's JAX settings and
  compilation cache are inherited through the environment)."""
  env = {**os.environ, "JAX_NUM_CPU_DEVICES": str(devices), "JAX_PLATFORMS": "cpu", **(env or {})}
  return subprocess.Popen([sys.executable, "main.py", *args], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True, **kwargs)


def run_experiment(name_arg: str, workdir: str, *overrides: str, links: tuple = ()) -> tuple[dict, str]:
  """configs/<name_arg> with overrides, run in-process in `workdir` -> (evaluations, what it printed). `links`:
  (workdir of another run, its stage names) whose stages this run reuses."""
  cfg = config(name_arg, *overrides)
  if links:
    Run(cfg, workdir)  # claims the workdir before the links go in
    for base, stages in links:
      link_stages(base, workdir, stages)
  out = io.StringIO()
  with contextlib.redirect_stdout(out):
    evaluations = experiments.run(cfg, workdir)
  return evaluations, out.getvalue()


def assert_trees_close(actual, desired, rtol: float = 1e-3, atol: float = 1e-6) -> None:
  """Sharded against single-device results, tree by tree: each array as a whole, ||a - d|| <= rtol ||d|| + atol.

  The two runs take float32 sums in other orders (another shard size selects other XLA convolution kernels), and
  BatchNorm over a few images amplifies those last-bit differences to ~1e-5 relative after a training step; a
  sharding bug moves whole arrays by O(1). An elementwise test would instead hinge on near-zero entries. Steps
  compared this way use SGD: Adam divides a near-zero gradient by its own RMS, so float noise becomes an lr-sized
  update of either sign.
  """
  assert jax.tree.structure(actual) == jax.tree.structure(desired)
  for (path, a), d in zip(jax.tree_util.tree_leaves_with_path(actual), jax.tree.leaves(desired)):
    a, d = np.asarray(a, np.float64), np.asarray(d, np.float64)
    assert a.shape == d.shape, (jax.tree_util.keystr(path), a.shape, d.shape)
    error, scale = np.linalg.norm(a - d), np.linalg.norm(d)
    assert error <= rtol * scale + atol, f"{jax.tree_util.keystr(path)}: |a - d| = {error:.3g}, |d| = {scale:.3g}"


def feature_inputs(features, labels, num_classes: int):
  """A baselines `Inputs` holding only what a feature filter (SS, AC, SPECTRE) reads: features [N, D], labels [N]."""
  cfg = config("baseline:defense=ss,threat=2,attack=badnets,tiny")
  n = len(labels)
  return Inputs(cfg, None, "ft_all", None, np.zeros((n, 1, 1, 3), np.uint8), labels, num_classes,
                np.zeros((0, 1, 1, 3), np.uint8), np.zeros(0, np.int64), None, features,
                np.zeros((0, features.shape[1]), np.float32), np.zeros((n, num_classes), np.float32),
                np.zeros((0, num_classes), np.float32))
