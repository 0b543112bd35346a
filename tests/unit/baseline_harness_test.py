"""The baseline harness: the defender's clean reserve, the filters' removal rates, DER, the compare command's
settings and tables, and its bad input (each one line)."""

import numpy as np
import pytest

from helpers import cli_main, config
from jaxpurify import compare, experiments, stages, threats
from jaxpurify.errors import UserError
from jaxpurify.evaluation.metrics import removal_rates


def test_clean_reserve_takes_the_fraction_of_every_class_with_the_seed():
  labels = np.repeat(np.arange(3), [20, 40, 10])
  kept, reserved = threats.clean_reserve(labels, 0.1, seed=0)
  assert np.bincount(labels[reserved]).tolist() == [2, 4, 1]
  assert np.array_equal(np.sort(np.concatenate([kept, reserved])), np.arange(len(labels)))
  assert np.array_equal(reserved, threats.clean_reserve(labels, 0.1, seed=0)[1])
  assert not np.array_equal(reserved, threats.clean_reserve(labels, 0.1, seed=1)[1])


@pytest.mark.parametrize("fraction", [0.01, 1.0])
def test_a_reserve_that_empties_a_class_or_leaves_it_nothing_is_refused(fraction):
  with pytest.raises(UserError, match="clean_fraction"):
    threats.clean_reserve(np.repeat(np.arange(2), 10), fraction, seed=0)


def test_the_victim_trains_without_the_reserve_and_the_attack_poisons_only_what_it_trains_on():
  cfg = config("baseline:defense=ss,threat=2,attack=badnets,tiny")
  train = stages.load_data(cfg, cfg.finetune.dataset, "train")
  victim, reserve = threats.victim_and_reserve(cfg, train)
  assert len(victim.labels) + len(reserve.labels) == len(train.labels)
  assert len(reserve.labels) == sum(round(0.05 * n) for n in np.bincount(train.labels))
  assert threats.victim_and_reserve(config("threat:threat=2,attack=badnets,tiny"), train) == (train, None)


def test_removal_rates_count_true_and_false_positives_by_hand():
  rates = removal_rates(np.array([0, 1, 5, 7]), poison=np.array([1, 7, 8]), num_examples=10)
  assert rates == {"removed": 4, "tpr": 2 / 3, "fpr": 2 / 7}
  assert np.isnan(removal_rates(np.array([0]), np.zeros(0, np.int64), 4)["tpr"])


def test_der_is_backdoorbench_rating():
  assert compare.der({"acc": 0.9, "asr": 0.95}, {"acc": 0.85, "asr": 0.05}) == pytest.approx((0.9 - 0.05 + 1) / 2)
  assert compare.der({"acc": 0.9, "asr": 0.1}, {"acc": 0.95, "asr": 0.3}) == pytest.approx(0.5)


def test_settings_merge_over_the_base_arguments():
  assert compare.merged_arg("threat=2,attack=badnets,quick", "attack=blended,encoder=badencoder", "ss") == (
      "threat=2,attack=blended,quick,encoder=badencoder,defense=ss")
  assert compare.merged_arg("defense=ct,quick", "", "tcore") == "defense=tcore,quick"
  assert compare.slug("threat=3,attack=blended,encoder=badencoder") == "threat3-blended-badencoder"
  assert compare.setting_name("threat=2,attack=badnets,quick", "") == "threat=2,attack=badnets"
  assert compare.setting_name("quick", "threat=3,attack=blended") == "threat=3,attack=blended"
  assert compare._settings_flag(["--config", "c", "--settings", "a=1", "b=2", "--seeds", "2"]) == (
      ["--config", "c", "--seeds", "2"], ["a=1", "b=2"])


def test_mean_rows_average_each_defense_over_settings():
  rows = [{"setting": s, "protocol": "ft_all", "defense": "ss", "acc": a, "asr": r}
          for s, a, r in (("x", 0.8, 0.2), ("y", 0.6, 0.4))]
  (mean,) = compare.mean_rows(rows)
  assert mean["setting"] == "mean" and mean["acc"] == pytest.approx(0.7) and mean["asr"] == pytest.approx(0.3)


def test_table_shows_fractions_in_percent_and_pooled_spread():
  rows = [{"setting": "x", "protocol": "ft_all", "defense": "ss", "acc": 0.5, "asr": {"mean": 0.1, "std": 0.02, "n": 3},
           "clean_used": 0, "seconds": 12.3}]
  text = compare.table(rows)
  assert "| defense | acc | asr | asr_all | DER | clean images used | defense time (s) |" in text  # nothing removed
  assert "| ss | 50.00 | 10.00 ± 2.00 | – | – | 0 | 12 |" in text
  no_poison = [{"setting": "x", "protocol": "ft_all", "defense": "ss", "tpr": float("nan"), "fpr": 0.1}]
  assert "| ss | – | – | – | – | – | 10.00 | – | – |" in compare.table(no_poison)  # threat 1: nothing to find


def test_table_shows_a_detectors_scores_and_verdicts_on_both_encoders():
  verdicts = compare.detections({"detect/clean": {"score": 0.4321, "flagged": False},
                                 "detect/poisoned": {"score": 0.01234, "flagged": True}, "clean_used": 5})
  assert verdicts == {"score_clean": 0.4321, "flagged_clean": 0.0, "score_poisoned": 0.01234, "flagged_poisoned": 1.0}
  rows = [{"setting": "attack=badencoder", "protocol": "stl10", "defense": "decree", **verdicts, "clean_used": 5,
           "seconds": 3.0},
          {"setting": "attack=badencoder", "protocol": "stl10", "defense": "mimic", "acc": 0.9, "asr": 0.1,
           "clean_used": 5, "seconds": 7.0}]
  text = compare.table(rows)
  assert "| decree | – | – | – | – | 0.4321 | no | 0.01234 | yes | 5 | 3 |" in text
  assert "| mimic | 90.00 | 10.00 | – | – | – | – | – | – | 5 | 7 |" in text
  pooled = {"mean": 2 / 3, "std": 0.58, "n": 3}  # over seeds (or settings): the fraction flagged
  assert compare._cell(pooled, "flag") == "0.67" and compare._cell(0.5, "flag") == "0.50"
  assert compare._cell({"mean": 1.0, "std": 0.0, "n": 3}, "flag") == "yes"
  assert compare._cell({"mean": 0.5, "std": 0.1, "n": 2}, "score", seeds=3) == "0.5 ± 0.1 (n=2)"  # one was inf
  assert compare._cell({"mean": 287, "std": 0.0, "n": 3}, "count", seeds=3) == "287"


def test_the_encoder_setting_is_the_distillation_defenses():
  cell, distill = config("baseline:defense=mimic,attack=drupe,tiny"), config("distill:attack=drupe,tiny")
  assert cell.experiment == "encoder_defense" and cell.baseline.defense == "mimic"
  for block in ("data", "model", "pretrain", "attack", "defense", "evaluate"):  # its stages are distill.py's
    assert cell[block].to_dict() == distill[block].to_dict(), block
  assert config("baseline:defense=clp,threat=1,attack=badencoder,tiny").experiment == "baseline"  # threat 1
  assert config("baseline:defense=ss,tiny").threat == 2  # a dataset attack without a threat: threat 2
  assert compare.encoder_arg("quick") == "attack=badencoder,quick"
  assert compare.encoder_arg("attack=drupe,downstream=gtsrb") == "attack=drupe,downstream=gtsrb"
  assert compare.default_defenses("configs/distill.py") == compare.ENCODER_DEFENSES
  assert compare.default_defenses("configs/tcore.py") == compare.DEFENSES
  experiments.check(cell)


@pytest.mark.parametrize("args, message", [
    (("--config", "configs/baseline.py:defense=ss,attack=badencoder,tiny"), "runs against threats 1-3"),
    (("--config", "configs/baseline.py:defense=clp,attack=badencoder,tiny", "--config.baseline.clp.u=-1"),
     "clp.u must be"),
    (("--config", "configs/baseline.py:defense=mimic,attack=badencoder,tiny",
      "--config.baseline.mimic.momentum_weight=-1"), "momentum_weight must be"),
])
def test_bad_encoder_defense_input_is_one_line(args, message, tmp_path):
  status, lines, _ = cli_main(*args, "--workdir", str(tmp_path / "w"))
  assert status == 2 and len(lines) == 1 and message in lines[0], lines
  assert not (tmp_path / "w").exists()
  status, lines, _ = cli_main("--config", "configs/distill.py:loss=sp,tiny", "--defenses", "clp", "--workdir",
                              str(tmp_path / "w"), main=compare.main)
  assert status == 2 and len(lines) == 1 and "not 'loss'" in lines[0], lines


@pytest.mark.parametrize("args, message", [
    (("--config", "configs/baseline.py:defense=nope,threat=2,attack=badnets,tiny"), "unknown defense 'nope'"),
    (("--config", "configs/baseline.py:defense=ss,threat=2,attack=badnets,tiny",
      "--config.baseline.ss.remove_fraction=1.5"), "remove_fraction must be in"),
    (("--config", "configs/baseline.py:defense=ss,threat=2,attack=badnets,tiny",
      "--config.baseline.clean_fraction=0.001"), "clean_fraction 0.001 leaves class"),
    (("--config", "configs/baseline.py:defense=ss,threat=2,attack=badnets,tiny",
      "--config.baseline.clean_fraction=0.01"), "ASSET draws base batches"),  # every method's block is checked
])
def test_bad_baseline_input_is_one_line(args, message, tmp_path):
  status, lines, _ = cli_main(*args, "--workdir", str(tmp_path / "w"))
  assert status == 2 and len(lines) == 1 and message in lines[0]
  assert not (tmp_path / "w").exists()


def test_compare_refuses_unknown_defenses_and_configs_in_one_line(tmp_path):
  status, lines, _ = cli_main("--config", "configs/tcore.py:threat=2,attack=badnets,tiny", "--defenses", "ss,nope",
                              "--workdir", str(tmp_path / "w"), main=compare.main)
  assert status == 2 and len(lines) == 1 and "unknown defense 'nope'" in lines[0]
  status, lines, _ = cli_main("--config", "configs/simclr.py:tiny", "--workdir", str(tmp_path / "w"),
                              main=compare.main)
  assert status == 2 and len(lines) == 1 and "compare takes the setting" in lines[0]


def test_every_baseline_config_checks():
  for name in ("tcore", "ss"):
    experiments.check(config(f"baseline:defense={name},threat=2,attack=badnets,tiny"))
