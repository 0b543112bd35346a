"""Runs shared by the end-to-end tests, made once per test session and in-process: one tiny pre-trained clean
encoder, one BadEncoder-attacked encoder, one threat-2 run with its BadNets-poisoned set. Tests that extend them
link the stages they share (as an ablation's cells do) instead of recomputing them.

The suite runs on two pytest-xdist workers, each with its own session fixtures: a shared run is made by the first
worker that needs it, under a file lock in the session's common temporary folder, and resumed (nothing
recomputed) by the other.
"""

import fcntl
import os

import pytest

from helpers import run_experiment


def shared_run(tmp_path_factory, name: str, name_arg: str, *overrides: str) -> tuple[str, str]:
  """configs/<name_arg> with overrides, run in the session's common folder once across workers -> (workdir, what
  it printed)."""
  root = tmp_path_factory.getbasetemp()
  if os.environ.get("PYTEST_XDIST_WORKER"):
    root = root.parent  # the session's folder, above each worker's own
  workdir = str(root / name)
  with open(workdir + ".lock", "w", encoding="utf-8") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    _, out = run_experiment(name_arg, workdir, *overrides)
  return workdir, out


@pytest.fixture(scope="session")
def clean_run(tmp_path_factory) -> tuple[str, str]:
  """(workdir, printed table) of `configs/simclr.py:tiny`: 2 epochs of SimCLR, MLP and kNN evaluation."""
  return shared_run(tmp_path_factory, "clean", "simclr:tiny")


@pytest.fixture(scope="session")
def badencoder_run(tmp_path_factory, clean_run) -> str:
  """The workdir of `configs/badencoder.py:tiny` on the clean run's encoder."""
  return shared_run(tmp_path_factory, "badencoder", "badencoder:tiny", f"attack.clean_encoder={clean_run[0]}")[0]


@pytest.fixture(scope="session")
def threat2_run(tmp_path_factory, clean_run) -> str:
  """The workdir of `configs/threat.py:threat=2,attack=badnets,tiny` (FT-all only) on the clean run's encoder:
  the BadNets-poisoned set and the clean and poisoned FT-all rows."""
  return shared_run(tmp_path_factory, "threat2", "threat:threat=2,attack=badnets,tiny", f"clean_encoder={clean_run[0]}",
                    "finetune.protocols=('ft_all',)")[0]
