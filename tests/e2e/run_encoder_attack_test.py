"""Encoder attacks end to end, in-process, on the session's clean encoder: BadEncoder, DRUPE, CTRL."""

import json
import os

import pytest

from helpers import run_experiment

pytestmark = pytest.mark.integration


def read(workdir, name):
  with open(os.path.join(workdir, name)) as f:
    return json.load(f) if name.endswith(".json") else [json.loads(line) for line in f]


def check_attack_run(workdir, clean_workdir, mode):
  results = read(workdir, "results.json")
  assert results["experiment"] == "encoder_attack" and read(workdir, "config.json")["attack"]["mode"] == mode
  clean, poisoned = results["evaluations"]["clean/digits"], results["evaluations"]["poisoned/digits"]
  assert set(clean) == set(poisoned) == {"acc", "asr", "asr_all", "acc_knn", "asr_knn", "asr_all_knn"}
  # The clean row is the pre-training run's encoder, evaluated the same way.
  assert clean["acc"] == read(clean_workdir, "results.json")["evaluations"]["clean/digits"]["acc"]
  assert not os.path.exists(os.path.join(workdir, "pretrain"))
  metrics = read(workdir, "attack/metrics.jsonl")
  assert {"loss", "l0", "l1", "l2"} <= set(metrics[-1])
  assert metrics[-1]["step"] == 1437 // 128  # one epoch


def test_badencoder_on_a_pretrained_encoder(badencoder_run, clean_run):
  check_attack_run(badencoder_run, clean_run[0], "badencoder")


@pytest.mark.extended  # 27-35 s; DRUPE's step runs in tests/unit/attacks/encoder_finetune_test.py
def test_drupe_on_a_pretrained_encoder(clean_run, tmp_path):
  workdir = str(tmp_path / "drupe")
  _, out = run_experiment("drupe:tiny", workdir, f"attack.clean_encoder={clean_run[0]}")
  assert "| poisoned/digits |" in out
  check_attack_run(workdir, clean_run[0], "drupe")


@pytest.mark.extended  # 29-31 s; CTRL's frequency trigger runs by default in tests/unit/triggers/
def test_ctrl_poisons_the_target_class_and_pretrains_on_it(clean_run, tmp_path):
  workdir = str(tmp_path / "ctrl")
  evaluations, _ = run_experiment("ctrl:tiny", workdir, f"attack.clean_encoder={clean_run[0]}",
                                  "pretrain.train.epochs=1")
  positions = read(workdir, "poison/done.json")["poisoned_positions"]
  assert len(positions) == int(0.05 * 1437)
  assert set(evaluations) == {"clean/digits", "poisoned/digits"}
  assert os.path.exists(os.path.join(workdir, "pretrain_poisoned", "done.json"))
