"""`python -m jaxpurify.compare`, in-process on a tiny setting: one defense of each path through the harness on one
victim set (a filter reading the undefended model and the clean reserve; a training defense, the repair of the
undefended model on the reserve; FT-head, the cheaper protocol), the setting's stages made once
and linked, the table and its rows, and a re-run that trains nothing.
The other methods' `suspects` run tiny in their unit tests; ABL's cell runs with `-m extended`."""

import json
import os

import numpy as np
import pytest

from helpers import cli_main
from jaxpurify import compare
from jaxpurify.defenses import baselines
from jaxpurify.poisoning import registry

DEFENSES = ["strip", "ft", "clp"]  # ABL's phases are unit-tested (tests/unit/defenses/baselines/abl_test.py)
REPAIRS = ["fp", "nad", "anp", "ibau", "rnp"]  # the trained model-repair methods: -m extended
PRUNERS = {"fp", "anp", "clp", "rnp"}


@pytest.mark.extended  # 100 s; every method's parts are unit-tested by default
def test_compare_runs_every_defense_on_one_victim_set(clean_run, tmp_path):
  workdir = str(tmp_path / "compare")
  args = ("--config", "configs/tcore.py:threat=2,attack=badnets,protocol=ft_head,tiny", "--defenses",
          ",".join(DEFENSES), "--workdir", workdir, f"--config.clean_encoder={clean_run[0]}")
  status, lines, _ = cli_main(*args, main=compare.main)
  assert status == 0, lines
  rows = json.load(open(os.path.join(workdir, "compare.json"), encoding="utf-8"))
  assert [r["defense"] for r in rows] == ["clean model", "none"] + DEFENSES
  first = os.path.join(workdir, "threat2-badnets-ft_head", DEFENSES[0])
  poisoned, _ = registry.load(os.path.join(first, "poison", "poisoned_train.npz"))
  for defense, row in zip(DEFENSES, rows[2:]):
    cell = os.path.join(workdir, "threat2-badnets-ft_head", defense)
    assert {"acc", "asr", "asr_all", "der", "clean_used", "seconds"} <= set(row), defense
    if defense != DEFENSES[0]:  # the setting's stages are the first defense's, linked
      assert all(os.path.islink(os.path.join(cell, stage)) for stage in ("poison", "finetune_poisoned_ft_head"))
    assert (row["clean_used"] > 0) == baselines.module(defense).CLEAN_DATA, defense
    if baselines.module(defense).KIND == "filter":
      with open(os.path.join(cell, f"{defense}_detect_ft_head", "done.json"), encoding="utf-8") as f:
        removed = np.asarray(json.load(f)["removed"])
      hits = np.isin(removed, poisoned.poison).sum()
      assert row["tpr"] == hits / len(poisoned.poison)
      assert row["fpr"] == (len(removed) - hits) / (len(poisoned.labels) - len(poisoned.poison))
    _assert_pruning_reported(cell, defense)
    if defense == "ft":  # the undefended model, fine-tuned on the reserve alone
      with open(os.path.join(cell, "ft_repair_ft_head", "done.json"), encoding="utf-8") as f:
        assert json.load(f)["examples"] == row["clean_used"]
  text = open(os.path.join(workdir, "compare.md"), encoding="utf-8").read()
  assert all(f"| {d} |" in text for d in DEFENSES) and "DER" in text
  stamps = {path: os.path.getmtime(path) for path in _done_files(workdir)}
  assert cli_main(*args, main=compare.main)[0] == 0  # resumed: every stage done, nothing trained again
  assert {path: os.path.getmtime(path) for path in _done_files(workdir)} == stamps
  assert json.load(open(os.path.join(workdir, "compare.json"), encoding="utf-8")) == rows


def _assert_pruning_reported(cell: str, defense: str) -> None:
  """A pruning method's results name the channels it pruned per layer, as its defended stage recorded them."""
  if defense not in PRUNERS:
    return
  with open(os.path.join(cell, "results.json"), encoding="utf-8") as f:
    repair = json.load(f)["diagnostics"]["repair/ft_head"]
  assert all(isinstance(n, int) and n >= 0 for n in repair["pruned"].values()), (defense, repair)


def _done_files(workdir: str) -> list[str]:
  return [os.path.join(root, "done.json") for root, _, files in os.walk(workdir) if "done.json" in files]


@pytest.mark.extended  # ABL's three phases (isolate, fine-tune the rest, unlearn) through the harness
def test_compare_runs_abl_and_reports_its_isolated_set(clean_run, tmp_path):
  workdir = str(tmp_path / "compare_abl")
  status, lines, _ = cli_main("--config", "configs/tcore.py:threat=2,attack=badnets,protocol=ft_head,tiny",
                              "--defenses", "abl", "--workdir", workdir, f"--config.clean_encoder={clean_run[0]}",
                              main=compare.main)
  assert status == 0, lines
  row = json.load(open(os.path.join(workdir, "compare.json"), encoding="utf-8"))[-1]
  assert row["defense"] == "abl" and row["clean_used"] == 0 and {"tpr", "fpr"} <= set(row)
  cell = os.path.join(workdir, "threat2-badnets-ft_head", "abl")
  for phase in ("isolate", "finetune", "unlearn"):
    assert os.path.exists(os.path.join(cell, f"abl_{phase}_ft_head", "done.json")), phase


@pytest.mark.extended  # the trained model-repair methods through the harness, one cell each
def test_compare_runs_the_model_repair_methods(clean_run, tmp_path):
  workdir = str(tmp_path / "compare_repair")
  status, lines, _ = cli_main("--config", "configs/tcore.py:threat=2,attack=badnets,protocol=ft_head,tiny",
                              "--defenses", ",".join(REPAIRS), "--workdir", workdir,
                              f"--config.clean_encoder={clean_run[0]}", main=compare.main)
  assert status == 0, lines
  rows = json.load(open(os.path.join(workdir, "compare.json"), encoding="utf-8"))
  assert [r["defense"] for r in rows] == ["clean model", "none"] + REPAIRS
  for defense, row in zip(REPAIRS, rows[2:]):
    assert row["clean_used"] > 0 and "tpr" not in row, defense
    _assert_pruning_reported(os.path.join(workdir, "threat2-badnets-ft_head", defense), defense)
