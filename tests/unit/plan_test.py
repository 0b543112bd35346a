"""The cost plan: every experiment's stage list with the steps its full config gives (by hand from the published
split sizes), the hours formula, and the command on a tiny config (compile only)."""

import json

import pytest
from helpers import cli_main, config

from jaxpurify import experiments, parallel, plan


def stages_of(name_arg):
  cfg = config(name_arg)
  return {stage.name: stage.steps for stage in experiments.module(cfg.experiment).plan(cfg)}


def test_distillation_pipeline_steps_follow_the_full_config():
  steps = stages_of("distill")
  # CIFAR-10's 50,000 images: SimCLR 1000 epochs at 256; BadEncoder 200 epochs at 256 on all of them; the
  # defender's 5% (2,500 images) at 128: teacher 100, warm-up 500, distillation 500 epochs.
  assert steps == {"pretrain": 1000 * (50_000 // 256), "attack": 200 * (50_000 // 256), "teacher": 100 * 19,
                   "warmup": 500 * 19, "distill": 500 * 19,
                   "evaluate (features)": -(-4 * (5_000 + 2 * 8_000) // 512)}


def test_threat_and_tcore_pipelines_list_their_stages():
  threat = stages_of("threat:threat=3,attack=badnets")
  assert list(threat)[:2] == ["pretrain", "attack"]
  assert threat["finetune_poisoned_ft_all"] == 50 * (5_000 // 128) and "finetune_clean_ft_head" in threat
  tcore = stages_of("tcore:threat=2,attack=badnets")
  assert "attack" not in tcore and tcore["expand0_confuse"] == 6000 and tcore["expand4_confuse"] == 2000
  assert tcore["expand1_pretrain"] == 10 * (int(5_000 * 0.5) // 32)
  assert tcore["boot_ft_all (4 stages)"] == 4 * 1000
  assert list(stages_of("ctrl")) == ["pretrain", "pretrain_poisoned", "evaluate (features)"]


def test_hours_are_flops_over_the_utilised_peak_of_the_steps_dtype():
  h = plan.hours(3600 * 494.7e12 * 0.5, 0.5, "float32")  # TF32 tensor cores
  assert h["H100"] == pytest.approx(1.0) and h["A100"] == pytest.approx(494.7 / 156.0)
  h = plan.hours(3600 * 989e12 * 0.5, 0.5, "bfloat16")
  assert h["H100"] == pytest.approx(1.0) and h["A100"] == pytest.approx(989 / 312.0)
  assert h["TPU v4"] == plan.hours(3600 * 989e12 * 0.5, 0.5, "float32")["TPU v4"]  # the MXU is bf16 either way
  assert plan.accelerator_dtype(config("simclr:tiny")) == "bfloat16"
  assert plan.accelerator_dtype(config("simclr:tiny", "model.dtype=float32")) == "float32"


def test_the_command_prints_a_table_with_a_total(tmp_path):
  path = str(tmp_path / "plan.json")
  status, lines, out = cli_main("--config", "configs/simclr.py:tiny", "--json", path, main=plan.main)
  assert status == 0, lines
  assert "| pretrain | 44 |" in out and "| **total** |" in out
  with open(path) as f:
    rows = json.load(f)["stages"]
  assert [r["stage"] for r in rows] == ["pretrain", "evaluate (features)"]
  assert "Device-hours of bfloat16 steps" in out
  assert all(r["flops_per_step"] > 0 and r["memory_bytes"] > 0 for r in rows)
  status, lines, _ = cli_main("--config", "configs/simclr.py:tiny", "--mfu", "2", main=plan.main)
  assert status == 2 and "--mfu 2.0 is not in (0, 1]" in lines[0]


@pytest.mark.parametrize("attack", ["blended", "input_aware"])
def test_threat_3_attack_stage_compiles_with_the_dataset_attacks_trigger(attack):
  """Threat 3's encoder attack has no trigger of its own (found by the plan of configs/tcore.py:threat=3)."""
  cfg = config(f"threat:threat=3,attack={attack},tiny")
  (stage,) = [s for s in experiments.module("threat").plan(cfg) if s.name == "attack"]
  assert plan.measure(stage, parallel.make_mesh(cfg.mesh))["flops_per_step"] > 0
