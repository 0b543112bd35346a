"""Pre-training experiments end to end, in-process: the tiny SimCLR run's files, a finished run recomputing
nothing, a corrupt checkpoint, MoCo and BYOL."""

import json
import math
import os
import shutil

import pytest
from helpers import cli_main, config, run_experiment

from jaxpurify import ablate, stages
from jaxpurify.pipeline import Run, link_stages

pytestmark = pytest.mark.integration


def read(workdir, name):
  with open(os.path.join(workdir, name)) as f:
    return json.load(f) if name.endswith(".json") else [json.loads(line) for line in f]


def test_tiny_run_writes_results(clean_run):
  workdir, out = clean_run
  results = read(workdir, "results.json")
  assert results["experiment"] == "pretrain"
  row = results["evaluations"]["clean/digits"]
  assert set(row) == {"acc", "acc_knn"}
  assert 0.3 < row["acc"] <= 1.0  # well above the 0.1 of chance, even for this tiny run
  assert "| clean/digits |" in out
  metrics = read(workdir, "pretrain/metrics.jsonl")
  assert [m["step"] for m in metrics] == list(range(4, 45, 4))  # 1437 // 64 = 22 steps per epoch
  assert {"loss", "l2_grads", "l2_params", "l2_updates", "images_per_s"} <= set(metrics[-1])
  assert read(workdir, "config.json")["pretrain"]["train"]["epochs"] == 2
  times = read(workdir, "time.json")
  assert [s["stage"] for s in times["stages"]] == ["pretrain", "evaluate"]
  assert set(times["stages"][0]) == {"stage", "compile_s", "train_s"} and set(times["stages"][1]) == {"stage",
                                                                                                      "evaluate_s"}
  counted = sum(v for s in times["stages"] for k, v in s.items() if k != "stage")
  assert 0 < counted <= times["total_s"] and math.isclose(times["other_s"], times["total_s"] - counted, abs_tol=1e-6)
  assert "\ntime (compile + train per stage): " in out  # this worker's run, or a rerun where nothing ran


def test_rerun_of_a_finished_run_recomputes_nothing(clean_run):
  workdir, _ = clean_run
  before = os.path.getmtime(os.path.join(workdir, "pretrain", "metrics.jsonl"))
  times = read(workdir, "time.json")
  evaluations, out = run_experiment("simclr:tiny", workdir)
  assert os.path.getmtime(os.path.join(workdir, "pretrain", "metrics.jsonl")) == before
  assert evaluations == read(workdir, "results.json")["evaluations"] and "| clean/digits |" in out
  assert "steps, compile" not in out and "evaluate:" not in out  # no stage ran, so none reports its time
  assert read(workdir, "time.json") == times and "per stage): nothing ran;" in out  # the working run's times kept


def test_corrupt_checkpoint_is_one_line(clean_run, tmp_path):
  workdir = str(tmp_path / "corrupt")
  shutil.copytree(clean_run[0], workdir)
  os.remove(os.path.join(workdir, "evaluate", "done.json"))
  ckpt = os.path.join(workdir, "pretrain", "ckpt")
  for step in os.listdir(ckpt):
    for dirpath, _, files in os.walk(os.path.join(ckpt, step)):
      for name in files:
        with open(os.path.join(dirpath, name), "wb") as f:
          f.write(b"garbage")
  status, lines, _ = cli_main("--config", "configs/simclr.py:tiny", "--workdir", workdir)
  assert status == 2, lines
  assert len(lines) == 1 and lines[0].startswith("error:") and "cannot be read" in lines[0], lines
  assert "delete" in lines[0] and "pretrain/done.json" in lines[0], lines


@pytest.mark.extended  # 25-28 s each; their steps run in tests/unit/ssl_test.py
@pytest.mark.parametrize("method", ["moco", "byol"])
def test_tiny_pretraining_with_another_ssl_method(tmp_path, method):
  workdir = str(tmp_path / method)
  evaluations, _ = run_experiment(f"{method}:tiny", workdir, "pretrain.train.epochs=1")
  assert read(workdir, "results.json")["experiment"] == "pretrain"
  assert read(workdir, "config.json")["pretrain"]["method"] == method
  assert 0.3 < evaluations["clean/digits"]["acc"] <= 1.0
  metrics = read(workdir, "pretrain/metrics.jsonl")
  assert [m["step"] for m in metrics] == [4, 8, 12, 16, 20, 22]  # one epoch of 1437 // 64 steps
  assert all(math.isfinite(m["loss"]) for m in metrics)


@pytest.mark.extended  # 47 s; the seed pooling is unit-tested by default (tests/unit/seeds_test.py)
def test_seeds_axis_pools_runs_and_the_seed_changes_the_result(clean_run, tmp_path):
  """`ablate --seeds 100,101` on simclr:tiny: seed 100 is the session's run (linked), seed 101 trains."""
  workdir = str(tmp_path / "seeds")
  linked = os.path.join(workdir, "seed100")
  Run(config("simclr:tiny"), linked)
  link_stages(clean_run[0], linked, ["pretrain", "evaluate"])
  status, lines, out = cli_main("--config", "configs/simclr.py:tiny", "--seeds", "100,101", "--workdir", workdir,
                                main=ablate.main)
  assert status == 0, lines
  (row,) = read(workdir, "seeds.json")
  assert row["row"] == "clean/digits" and row["acc"]["n"] == 2
  acc = row["acc"]["values"]
  assert acc["100"] == read(clean_run[0], "results.json")["evaluations"]["clean/digits"]["acc"]
  assert acc["101"] == read(os.path.join(workdir, "seed101"), "results.json")["evaluations"]["clean/digits"]["acc"]
  assert acc["101"] != acc["100"]  # another seed: another initialisation, data order and augmentation
  assert "| clean/digits | acc | " in out and "seed 100 | seed 101 |" in out
  # every stage that ran printed its times (seed 101's), the linked finished ones nothing
  assert out.count("pretrain: 44 steps, compile ") == 1 and out.count("evaluate: 1 encoder(s) on digits, ") == 1


def test_smoke_limits_cap_every_stage_and_mock_an_unprepared_data_set(tmp_path, monkeypatch):
  """What `smoke` sets, on a tiny model: CIFAR-10 (not prepared here) from mock data, 2 steps, 64 test examples,
  heads trained for the whole epochs that reach 2 steps."""
  monkeypatch.setenv("JAXPURIFY_DATA_DIR", str(tmp_path / "no_data"))
  fitted = []
  evaluate = stages.evaluation.evaluate
  monkeypatch.setattr(stages.evaluation, "evaluate",
                      lambda protocol, *args, **kwargs: fitted.append((protocol, kwargs.get("epochs")))
                      or evaluate(protocol, *args, **kwargs))
  workdir = str(tmp_path / "capped")
  evaluations, _ = run_experiment("simclr:tiny", workdir, "data.name=cifar10", "data.mock_examples=256",
                                  "evaluate.datasets=('cifar10',)", "limits.max_steps=2",
                                  "limits.max_eval_examples=64", "evaluate.mlp.batch_size=32")
  assert read(workdir, "pretrain/done.json") == {"steps": 2, "examples": 256}
  assert fitted == [("mlp", 1), ("knn", None)]  # 64 training examples at batch 32: one epoch is 2 steps (of 5)
  assert [m["step"] for m in read(workdir, "pretrain/metrics.jsonl")] == [2]
  acc = evaluations["clean/cifar10"]["acc"]
  assert acc * 64 == pytest.approx(round(acc * 64))  # a fraction of the 64 capped test examples
