"""The distillation defense end to end, in-process: the session's clean and BadEncoder runs supply its first two
stages (linked, as an ablation's cells share them); teacher, warm-up, distillation and evaluation run here."""

import json
import os
import shutil

import pytest

from helpers import cli_main, run_experiment
from jaxpurify import ablate

pytestmark = pytest.mark.integration


def read(workdir, name):
  with open(os.path.join(workdir, name)) as f:
    return json.load(f) if name.endswith(".json") else [json.loads(line) for line in f]


def test_distillation_defense_end_to_end(clean_run, badencoder_run, tmp_path):
  workdir = str(tmp_path / "distill")
  evaluations, out = run_experiment("distill:tiny", workdir, f"attack.clean_encoder={clean_run[0]}",
                                    links=[(badencoder_run, ["attack"])])
  assert read(workdir, "results.json")["experiment"] == "distill"
  assert set(evaluations) == {"clean/digits", "poisoned/digits", "teacher/digits", "defended/digits"}
  assert all({"acc", "asr", "asr_all"} <= set(row) for row in evaluations.values())
  # The poisoned row is the BadEncoder run's encoder, evaluated the same way.
  assert evaluations["poisoned/digits"] == read(badencoder_run, "results.json")["evaluations"]["poisoned/digits"]
  assert "| defended/digits |" in out
  for stage in ("attack", "teacher", "warmup", "distill", "evaluate"):
    assert os.path.exists(os.path.join(workdir, stage, "done.json")), stage
  steps_per_epoch = int(0.2 * 1437) // 64
  monitor = read(workdir, "distill/monitor.jsonl")
  assert [m["step"] for m in monitor] == [0, steps_per_epoch, 2 * steps_per_epoch]
  assert [m["epoch"] for m in monitor] == [0.0, 1.0, 2.0]
  metrics = read(workdir, "distill/metrics.jsonl")
  assert {"loss", "nt_xent", "at_layer1", "at_layer4"} <= set(metrics[-1])
  with open(os.path.join(workdir, "distill.png"), "rb") as f:
    assert f.read(8) == b"\x89PNG\r\n\x1a\n"

  # `ablate --seeds 100, --grid none` (a list of one seed): the finished run as seed 100 resumes to its own rows,
  # no grid cells.
  seeds_dir = str(tmp_path / "seeds")
  shutil.copytree(workdir, os.path.join(seeds_dir, "seed100"))  # the linked stages copied as folders
  status, lines, _ = cli_main("--config", "configs/distill.py:tiny", "--seeds", "100,", "--grid", "none",
                              "--workdir", seeds_dir, f"--config.attack.clean_encoder={clean_run[0]}",
                              main=ablate.main)
  assert status == 0, lines
  assert sorted(os.listdir(seeds_dir)) == ["seed100", "seeds.json", "seeds.md"]
  pooled = {row["row"]: row for row in read(seeds_dir, "seeds.json")}
  assert set(pooled) == set(evaluations)
  assert all(pooled[name]["asr"]["values"]["100"] == evaluations[name]["asr"] for name in evaluations)
