"""The encoder-side defenses through `python -m jaxpurify.compare --config configs/distill.py:...`, in-process on
the tiny setting: the session's clean and BadEncoder runs supply the encoders (the first cell links the attack,
the later cells link the setting's stages from it), a detector judges both encoders, a mitigator's cleaned encoder
is evaluated like the distillation defense's. Default: the data-free CLP and DECREE judging both encoders clean;
`-m extended`: the trained mitigators (the distillation defense, NAD, MIMIC, SSL-Cleanse, DECREE's flagged trigger
through SSL-Cleanse's mitigator)."""

import json
import os

import pytest

from helpers import cli_main
from jaxpurify import compare
from jaxpurify.defenses import encoder as methods
from jaxpurify.pipeline import Run, link_stages

pytestmark = pytest.mark.integration


def _compare(defenses, clean_run, badencoder_run, workdir, *more):
  """compare on the tiny encoder setting (`more`: --config overrides), its first cell claimed with the session's
  attack stage linked in -> (exit status, error lines, compare.json rows)."""
  overrides = [f"--config.attack.clean_encoder={clean_run[0]}", *more]
  ((_, first), config), = compare.cells("configs/distill.py", "tiny", overrides, defenses[:1], [""]).items()
  cell = os.path.join(workdir, "badencoder", first)
  if not os.path.exists(cell):
    Run(config, cell)
    link_stages(badencoder_run, cell, ["attack"])
  status, lines, _ = cli_main("--config", "configs/distill.py:tiny", "--defenses", ",".join(defenses), "--workdir",
                              workdir, *overrides, main=compare.main)
  rows = json.load(open(os.path.join(workdir, "compare.json"), encoding="utf-8")) if status == 0 else None
  return status, lines, rows


def _check_rows(rows, defenses, badencoder_run, workdir):
  with open(os.path.join(badencoder_run, "results.json"), encoding="utf-8") as f:
    attacked = json.load(f)["evaluations"]
  assert [r["defense"] for r in rows] == ["clean model", "none"] + defenses
  clean, poisoned = rows[0], rows[1]
  assert {k: poisoned[k] for k in ("acc", "asr")} == {k: attacked["poisoned/digits"][k] for k in ("acc", "asr")}
  assert clean["acc"] == attacked["clean/digits"]["acc"]
  for defense, row in zip(defenses, rows[2:]):
    method, cell = methods.module(defense), os.path.join(workdir, "badencoder", defense)
    assert (row["clean_used"] > 0) == method.CLEAN_DATA, defense
    assert ("acc" in row and "der" in row) == hasattr(method, "purify"), defense
    assert ("score_poisoned" in row and "score_clean" in row) == hasattr(method, "detect"), defense
    if defense != defenses[0]:  # the setting's stages are the first cell's, linked
      assert all(os.path.islink(os.path.join(cell, s)) for s in ("attack", "evaluate_setting")), defense


@pytest.mark.extended  # 35 s; DECREE's and CLP's parts are unit-tested by default
def test_compare_runs_the_encoder_side_defenses_on_one_setting(clean_run, badencoder_run, tmp_path):
  workdir, defenses = str(tmp_path / "compare"), ["clp", "decree"]
  # A PL1 cut-off no trigger passes: DECREE judges both encoders clean and the suspect is used as it is.
  status, lines, rows = _compare(defenses, clean_run, badencoder_run, workdir,
                                 "--config.baseline.decree.threshold=1e-9")
  assert status == 0, lines
  _check_rows(rows, defenses, badencoder_run, workdir)
  decree = rows[3]
  assert decree["flagged_clean"] == decree["flagged_poisoned"] == 0.0
  assert {k: decree[k] for k in ("acc", "asr")} == {k: rows[1][k] for k in ("acc", "asr")}
  text = open(os.path.join(workdir, "compare.md"), encoding="utf-8").read()
  assert "### attack=badencoder (digits)" in text and "score (poisoned)" in text and "flags clean" in text
  with open(os.path.join(workdir, "badencoder", "clp", "results.json"), encoding="utf-8") as f:
    pruned = json.load(f)["diagnostics"]["purify"]["pruned"]
  assert set(pruned) >= {"stem", "stage4.block0.conv2"}  # CLP reports every conv+BN layer of the encoder


@pytest.mark.extended
def test_compare_runs_the_trained_encoder_mitigators(clean_run, badencoder_run, tmp_path):
  workdir, defenses = str(tmp_path / "compare"), ["distill", "nad", "mimic", "ssl_cleanse", "decree"]
  # A PL1 cut-off every score passes (1 is the whole image): DECREE flags the suspect, and its trigger goes to
  # SSL-Cleanse's mitigator.
  status, lines, rows = _compare(defenses, clean_run, badencoder_run, workdir, "--config.baseline.decree.threshold=2")
  assert status == 0, lines
  _check_rows(rows, defenses, badencoder_run, workdir)
  assert os.path.exists(os.path.join(workdir, "badencoder", "decree", "decree_mitigate", "done.json"))
  nad = os.path.join(workdir, "badencoder", "nad")
  assert os.path.exists(os.path.join(nad, "teacher", "done.json"))  # its own teacher: its time is its whole cost
  assert not os.path.exists(os.path.join(nad, "warmup"))  # its student is the poisoned encoder
  with open(os.path.join(workdir, "badencoder", "mimic", "mimic_weights", "done.json"), encoding="utf-8") as f:
    weights = json.load(f)["layer_weights"]
  assert set(weights) == {"layer1", "layer2", "layer3", "layer4"} and all(w >= 1000 for w in weights.values())
