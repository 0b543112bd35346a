"""The threat harness and T-Core end to end, in-process, on the session's clean encoder: threat 2 (BadNets) and
T-Core after it (the threat run's poisoned set and rows linked), threat 3, and a bad protocol refused."""

import json
import os

import numpy as np
import pytest

from helpers import cli_main, run_experiment
from jaxpurify.poisoning import registry

pytestmark = pytest.mark.integration
THREAT_STAGES = ["poison", "finetune_clean_ft_all", "finetune_poisoned_ft_all"]


def read(workdir, name):
  with open(os.path.join(workdir, name)) as f:
    return json.load(f)


def test_threat_2_writes_the_poisoned_set_and_both_rows(threat2_run):
  evaluations = read(threat2_run, "results.json")["evaluations"]
  assert set(evaluations) == {"clean/ft_all", "poisoned/ft_all"}
  assert all({"acc", "asr", "asr_all"} <= set(row) for row in evaluations.values())
  poisoned, block = registry.load(os.path.join(threat2_run, "poison", "poisoned_train.npz"))
  assert block.attack == "badnets" and len(poisoned.poison) == 144  # round(0.1 * 1437)
  np.testing.assert_array_equal(poisoned.labels[poisoned.poison], 1)
  assert os.path.getsize(os.path.join(threat2_run, "poison", "samples.png")) > 1000


@pytest.mark.extended  # 85 s; T-Core's components are unit-tested by default
def test_tcore_under_threat_2_writes_rows_diagnostics_and_resumes(clean_run, threat2_run, tmp_path):
  """T-Core after the threat-2 setting: seeds, expansion, filter and one bootstrapping stage in one tiny run."""
  workdir = str(tmp_path / "tcore2")
  args = ("tcore:threat=2,attack=badnets,tiny", workdir, f"clean_encoder={clean_run[0]}")
  evaluations, _ = run_experiment(*args, links=[(threat2_run, THREAT_STAGES)])
  assert set(evaluations) == {"clean/ft_all", "poisoned/ft_all", "defended/ft_all"}
  assert all({"acc", "asr", "asr_all"} <= set(row) for row in evaluations.values())
  poisoned, _ = registry.load(os.path.join(workdir, "poison", "poisoned_train.npz"))
  diagnostics = read(workdir, "results.json")["diagnostics"]
  seeds = read(os.path.join(workdir, "tcore_sift"), "done.json")["seeds"]
  assert diagnostics["seeds"]["count"] == 200
  assert diagnostics["seeds"]["poisoned"] == int(np.isin(seeds, poisoned.poison).sum())
  expansion = diagnostics["expansion"]
  assert expansion["suspected"] == round(0.4 * 1437) and {"precision", "recall", "trusted"} <= set(expansion)
  assert sum(diagnostics["filter"]["pruned"].values()) == diagnostics["filter"]["pruned_total"]
  core = diagnostics["bootstrap/ft_all"]  # from the seeds the expansion kept trusted, then one growth stage
  assert len(core) == 2 and 100 <= core[0]["count"] <= 200 and core[1]["count"] >= core[0]["count"]
  for stage in ("expand0_pretrain", "expand0_confuse", "tcore_filter", "boot0_ft_all"):  # each a finished stage
    assert os.path.exists(os.path.join(workdir, stage, "done.json")), stage
  before = os.path.getmtime(os.path.join(workdir, "tcore_filter", "done.json"))
  again, out = run_experiment(*args)  # a finished run resumes to the same table without recomputing
  assert os.path.getmtime(os.path.join(workdir, "tcore_filter", "done.json")) == before
  assert again == evaluations and "| defended/ft_all |" in out


@pytest.mark.extended  # 26-28 s; threat 3's attack stage compiles by default in tests/unit/plan_test.py
def test_threat_3_trains_the_encoder_attack_with_the_data_trigger(clean_run, tmp_path):
  workdir = str(tmp_path / "t3")
  evaluations, _ = run_experiment("threat:threat=3,attack=badnets,tiny", workdir, f"clean_encoder={clean_run[0]}",
                                  "finetune.protocols=('ft_head',)")
  for stage in ("poison", "attack", "finetune_poisoned_ft_head"):
    assert os.path.exists(os.path.join(workdir, stage, "done.json")), stage
  assert set(evaluations) == {"clean/ft_head", "poisoned/ft_head"}


def test_threat_with_unknown_protocol_fails_before_training(tmp_path):
  status, lines, _ = cli_main("--config", "configs/threat.py:threat=2,attack=badnets,quick", "--workdir",
                              str(tmp_path / "w"), "--config.finetune.protocols=('ft_some',)")
  assert status == 2 and len(lines) == 1, lines
  assert lines[0].startswith("error: unknown fine-tuning protocol 'ft_some'")
  assert not os.path.exists(tmp_path / "w")
