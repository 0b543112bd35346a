"""The pre-training poisoning attacks end to end, in-process, on the session's clean encoder: SSL-Backdoor and
CorruptEncoder poison, pre-train (1 epoch) and evaluate both encoders; CTRL as threat 1's encoder attack. All
`extended`: they train (their poisoning runs by default in tests/unit/attacks/)."""

import json
import os

import numpy as np
import pytest

from helpers import run_experiment

pytestmark = [pytest.mark.integration, pytest.mark.extended]


def read(workdir, stage):
  with open(os.path.join(workdir, stage, "done.json")) as f:
    return json.load(f)


@pytest.mark.parametrize("name, poisoned, examples", [("ssl_backdoor", 142, 1437), ("corruptencoder", 72, 1509)])
def test_attack_poisons_pretrains_and_evaluates(name, poisoned, examples, clean_run, tmp_path):
  workdir = str(tmp_path / name)
  evaluations, out = run_experiment(f"{name}:tiny", workdir, f"attack.clean_encoder={clean_run[0]}",
                                    "pretrain.train.epochs=1")
  assert set(evaluations) == {"clean/digits", "poisoned/digits"} and "| poisoned/digits |" in out
  assert all({"acc", "asr", "asr_all"} <= set(row) for row in evaluations.values())
  record = read(workdir, "poison")
  assert (record["poisoned"], record["examples"]) == (poisoned, examples)
  assert read(workdir, "pretrain_poisoned")["examples"] == examples
  with np.load(os.path.join(workdir, "poison", "poisoned_pretrain.npz")) as npz:
    np.testing.assert_array_equal(npz["positions"], record["poisoned_positions"])
    assert npz["poisoned_images"].shape == (poisoned, 32, 32, 3)
  assert os.path.getsize(os.path.join(workdir, "poison", "samples.png")) > 1000
  assert not os.path.exists(os.path.join(workdir, "pretrain"))


def test_threat_1_with_ctrl_pretrains_on_the_poisoned_set(clean_run, tmp_path):
  workdir = str(tmp_path / "t1ctrl")
  evaluations, _ = run_experiment("threat:threat=1,attack=ctrl,tiny", workdir, f"clean_encoder={clean_run[0]}",
                                  "finetune.protocols=('ft_head',)", "pretrain.train.epochs=1")
  assert set(evaluations) == {"clean/ft_head", "poisoned/ft_head"}
  assert all({"acc", "asr", "asr_all"} <= set(row) for row in evaluations.values())
  assert read(workdir, "attack_poison")["poisoned"] == int(0.05 * 1437)  # the first of digit 1, CTRL's rule
  assert read(workdir, "attack")["examples"] == 1437
