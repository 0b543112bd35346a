"""Runs shared by the end-to-end tests, made once per session and in-process: one tiny pre-trained clean encoder,
one BadEncoder-attacked encoder, one threat-2 run with its BadNets-poisoned set. Tests that extend them link the
stages they share (as an ablation's cells do) instead of recomputing them."""

import os

import pytest

from helpers import run_experiment


@pytest.fixture(scope="session")
def workspace(tmp_path_factory) -> str:
  return str(tmp_path_factory.mktemp("runs"))


@pytest.fixture(scope="session")
def clean_run(workspace) -> tuple[str, str]:
  """(workdir, printed table) of `configs/simclr.py:tiny`: 2 epochs of SimCLR, MLP and kNN evaluation."""
  workdir = os.path.join(workspace, "clean")
  _, out = run_experiment("simclr:tiny", workdir)
  return workdir, out


@pytest.fixture(scope="session")
def badencoder_run(workspace, clean_run) -> str:
  """The workdir of `configs/badencoder.py:tiny` on the clean run's encoder."""
  workdir = os.path.join(workspace, "badencoder")
  run_experiment("badencoder:tiny", workdir, f"attack.clean_encoder={clean_run[0]}")
  return workdir


@pytest.fixture(scope="session")
def threat2_run(workspace, clean_run) -> str:
  """The workdir of `configs/threat.py:threat=2,attack=badnets,tiny` (FT-all only) on the clean run's encoder:
  the BadNets-poisoned set and the clean and poisoned FT-all rows."""
  workdir = os.path.join(workspace, "threat2")
  run_experiment("threat:threat=2,attack=badnets,tiny", workdir, f"clean_encoder={clean_run[0]}",
                 "finetune.protocols=('ft_all',)")
  return workdir
