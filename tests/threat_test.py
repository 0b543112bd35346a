"""The dataset-attack registry (poisoned sets, artefacts, checks) and the threat harness end to end."""

import json
import os
import subprocess
import sys
import tempfile

import numpy as np
import pytest

from configs import threat as threat_config
from jaxpurify import parallel
from jaxpurify.errors import UserError
from jaxpurify.poisoning import attacks, triggers

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _data(n=200, size=32, classes=10, seed=0):
  rng = np.random.default_rng(seed)
  return (rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8),
          np.tile(np.arange(classes), n // classes + 1)[:n].astype(np.int64))


def _block(attack, quick=True, **overrides):
  block = attacks.default_config(attack, quick=quick)
  block.update(overrides)
  return block


@pytest.mark.parametrize("attack", ["badnets", "blended", "trojan", "wanet", "adaptive_blend"])
def test_dirty_label_set_relabels_exactly_the_poisoned_positions(attack):
  images, labels = _data()
  block = _block(attack, quick=False, target=3, rate=0.1)
  out = attacks.poison(block, images, labels, parallel.make_mesh())
  assert len(out.poison) == 20  # round(0.1 * 200)
  np.testing.assert_array_equal(out.labels[out.poison], 3)
  untouched = np.setdiff1d(np.arange(200), np.concatenate([out.poison, out.extra]))
  np.testing.assert_array_equal(out.labels[untouched], labels[untouched])
  np.testing.assert_array_equal(out.images[untouched], images[untouched])
  np.testing.assert_array_equal(out.labels[out.extra], labels[out.extra])  # cross / cover keep their labels
  assert not np.intersect1d(out.poison, out.extra).size
  expected_extra = {"wanet": 40, "adaptive_blend": 20}.get(attack, 0)  # full defaults: cross_ratio 2, cover 1
  assert len(out.extra) == expected_extra
  assert (out.images[out.poison] != images[out.poison]).any(axis=(1, 2, 3)).all()
  # The same settings give the same set.
  again = attacks.poison(block, images, labels, parallel.make_mesh())
  np.testing.assert_array_equal(again.images, out.images)


def test_badnets_poison_has_the_white_square_and_the_test_trigger_matches():
  images, labels = _data()
  out = attacks.poison(_block("badnets", target=1), images, labels, parallel.make_mesh())
  np.testing.assert_array_equal(out.images[out.poison][:, 29:, 29:], 255)
  np.testing.assert_array_equal(out.images[out.poison][:, :29], images[out.poison][:, :29])
  trigger = attacks.test_trigger(_block("badnets"), 32)
  np.testing.assert_array_equal(np.asarray(trigger(images[:4])), triggers.badnets(images[:4]))


def test_adaptive_blend_tests_with_the_full_pattern_at_test_alpha():
  images, _ = _data(8)
  block = _block("adaptive_blend")
  pattern = triggers.blend_pattern(32, block.adaptive_blend.pattern_seed)
  np.testing.assert_array_equal(np.asarray(attacks.test_trigger(block, 32)(images)),
                                triggers.blended(images, pattern, 0.2))


def test_clean_label_sig_poisons_target_images_only_and_keeps_labels():
  images, labels = _data()
  out = attacks.poison(_block("sig", target=4), images, labels, parallel.make_mesh())
  assert len(out.poison) == 20  # quick: convention 'class', rate 1: every target image
  np.testing.assert_array_equal(labels[out.poison], 4)
  np.testing.assert_array_equal(out.labels, labels)


def test_saved_set_loads_back_with_its_arrays_and_settings(tmp_path):
  images, labels = _data()
  block = _block("wanet", quick=False, target=2)
  out = attacks.poison(block, images, labels, parallel.make_mesh())
  attacks.save(str(tmp_path / "p.npz"), out, block)
  loaded, settings = attacks.load(str(tmp_path / "p.npz"))
  for a, b in zip(loaded[:5], out[:5]):
    np.testing.assert_array_equal(a, b)
  np.testing.assert_array_equal(loaded.arrays["grid"], out.arrays["grid"])
  assert settings.attack == "wanet" and settings.target == 2
  # The saved grid rebuilds the test trigger exactly.
  np.testing.assert_array_equal(triggers.wanet(images[:2], loaded.arrays["grid"]),
                                attacks.test_trigger(block, 32)(images[:2]))


@pytest.mark.parametrize("change, message", [
    (dict(rate=1.5), "config.poison.rate must be in [0, 1]"),
    (dict(attack="nope"), "unknown dataset attack 'nope'"),
    (dict(target=12), "config.poison.target 12 is not a label"),
    (dict(badnets=dict(size=40, value=255)), "does not fit 32×32"),
])
def test_bad_settings_fail_in_one_line(change, message):
  images, labels = _data()
  block = _block("badnets")
  block.update(change)
  with pytest.raises(UserError, match=message.replace("[", r"\[").replace("]", r"\]")):
    attacks.check(block, 32, labels)


def test_clean_label_attack_with_too_few_target_images_fails():
  _, labels = _data()
  block = _block("sig", convention="dataset", rate=0.5)
  with pytest.raises(UserError, match="needs 100 images of target class 0 but it has 20"):
    attacks.check(block, 32, labels)


def test_threat_configs_wire_the_attacks():
  one = threat_config.get_config("threat=1,attack=badencoder,quick")
  assert "poison" not in one and one.attack.mode == "badencoder"
  two = threat_config.get_config("threat=2,attack=blended,quick")
  assert "attack" not in two and two.poison.attack == "blended" and two.poison.target == 1
  three = threat_config.get_config("threat=3,attack=badnets,encoder=drupe,quick")
  assert three.attack.mode == "drupe" and "trigger" not in three.attack
  assert three.attack.target == three.poison.target
  with pytest.raises(ValueError, match="threat 1 poisons the encoder"):
    threat_config.get_config("threat=1,attack=badnets")
  with pytest.raises(ValueError, match="attack must be one of"):
    threat_config.get_config("threat=2,attack=nope")


# ---------------------------------------------------------------------------------------------------------------
# End to end (subprocesses; tiny widths and epochs)

TINY_PRETRAIN = ["--config.model.width=4", "--config.pretrain.train.epochs=1",
                 "--config.pretrain.train.batch_size=64", "--config.evaluate.mlp.epochs=1",
                 "--config.evaluate.monitors=()"]
TINY_FINETUNE = ["--config.model.width=4", "--config.finetune.ft_head.train.epochs=1",
                 "--config.finetune.ft_all.train.epochs=1"]


def _main(*args):
  env = {**os.environ, "JAX_NUM_CPU_DEVICES": "8", "JAX_PLATFORMS": "cpu"}
  proc = subprocess.run([sys.executable, "main.py", *args], cwd=ROOT, env=env, capture_output=True, text=True,
                        timeout=900)
  return proc


@pytest.fixture(scope="module")
def clean_encoder():
  with tempfile.TemporaryDirectory() as tmp:
    workdir = os.path.join(tmp, "clean")
    proc = _main("--config", "configs/simclr.py:quick", "--workdir", workdir, *TINY_PRETRAIN)
    assert proc.returncode == 0, proc.stderr[-3000:]
    yield tmp, workdir


@pytest.mark.integration
def test_tcore_under_threat_2_writes_rows_poisoned_set_diagnostics_and_resumes(clean_encoder):
  """The threat-2 setting (poisoned set, clean and poisoned rows) and T-Core after it, in one tiny run."""
  tmp, clean = clean_encoder
  workdir = os.path.join(tmp, "tcore2")
  args = ["--config", "configs/tcore.py:threat=2,attack=badnets,quick", "--workdir", workdir,
          f"--config.clean_encoder={clean}", *TINY_FINETUNE, "--config.tcore.expand.iters=(4,4)",
          "--config.tcore.expand.pretrain_epochs=(1,1)", "--config.tcore.boot.steps_per_stage=2",
          "--config.tcore.boot.schedule=(0.6,)", "--config.tcore.filter.u_grid=(3.0,)"]
  proc = _main(*args)
  assert proc.returncode == 0, proc.stderr[-3000:]
  with open(os.path.join(workdir, "results.json")) as f:
    results = json.load(f)
  assert set(results["evaluations"]) == {"clean/ft_all", "poisoned/ft_all", "defended/ft_all"}
  assert all({"acc", "asr", "asr_all"} <= set(row) for row in results["evaluations"].values())
  poisoned, block = attacks.load(os.path.join(workdir, "poison", "poisoned_train.npz"))
  assert block.attack == "badnets" and len(poisoned.poison) == 144  # round(0.1 * 1437)
  np.testing.assert_array_equal(poisoned.labels[poisoned.poison], 1)
  assert os.path.getsize(os.path.join(workdir, "poison", "samples.png")) > 1000
  diagnostics = results["diagnostics"]
  with open(os.path.join(workdir, "tcore_sift", "done.json")) as f:
    seeds = json.load(f)["seeds"]
  assert diagnostics["seeds"]["count"] == 200
  assert diagnostics["seeds"]["poisoned"] == int(np.isin(seeds, poisoned.poison).sum())
  expansion = diagnostics["expansion"]
  assert expansion["suspected"] == round(0.4 * 1437) and {"precision", "recall", "trusted"} <= set(expansion)
  assert sum(diagnostics["filter"]["pruned"].values()) == diagnostics["filter"]["pruned_total"]
  core = diagnostics["bootstrap/ft_all"]  # from the seeds the expansion kept trusted, then one growth stage
  assert len(core) == 2 and 100 <= core[0]["count"] <= 200 and core[1]["count"] >= core[0]["count"]
  before = os.path.getmtime(os.path.join(workdir, "poison", "poisoned_train.npz"))
  again = _main(*args)  # a finished run resumes to the same table without recomputing
  assert again.returncode == 0, again.stderr[-3000:]
  assert os.path.getmtime(os.path.join(workdir, "poison", "poisoned_train.npz")) == before
  assert "| defended/ft_all |" in again.stdout


@pytest.mark.integration
def test_threat_3_trains_the_encoder_attack_with_the_data_trigger(clean_encoder):
  tmp, clean = clean_encoder
  workdir = os.path.join(tmp, "t3")
  proc = _main("--config", "configs/threat.py:threat=3,attack=badnets,quick", "--workdir", workdir,
               f"--config.clean_encoder={clean}", *TINY_FINETUNE, "--config.attack.train.epochs=1",
               "--config.finetune.protocols=('ft_head',)")
  assert proc.returncode == 0, proc.stderr[-3000:]
  for stage in ("poison", "attack", "finetune_poisoned_ft_head"):
    assert os.path.exists(os.path.join(workdir, stage, "done.json")), stage
  with open(os.path.join(workdir, "results.json")) as f:
    assert set(json.load(f)["evaluations"]) == {"clean/ft_head", "poisoned/ft_head"}


def test_threat_with_unknown_protocol_fails_before_training(tmp_path):
  proc = _main("--config", "configs/threat.py:threat=2,attack=badnets,quick", "--workdir", str(tmp_path / "w"),
               "--config.finetune.protocols=('ft_some',)")
  assert proc.returncode == 2
  assert proc.stderr.strip().splitlines()[-1].startswith("error: unknown fine-tuning protocol 'ft_some'")
  assert not os.path.exists(tmp_path / "w" / "pretrain")
