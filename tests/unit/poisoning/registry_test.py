"""The dataset-attack registry: poisoned sets, artefacts, checks, and the threat configs that wire the attacks."""

import numpy as np
import pytest

from configs import threat as threat_config
from jaxpurify import parallel, triggers
from jaxpurify.data import ImageSplit
from jaxpurify.errors import UserError
from jaxpurify.poisoning import defaults, registry


def _data(n=200, size=32, classes=10, seed=0):
  rng = np.random.default_rng(seed)
  return (rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8),
          np.tile(np.arange(classes), n // classes + 1)[:n].astype(np.int64))


def _block(attack, quick=True, **overrides):
  block = defaults.default_config(attack, quick=quick)
  block.update(dict(seed=0) | overrides)  # the threat harness sets an unset seed to config.seed
  return block


@pytest.mark.parametrize("attack", ["badnets", "blended", "trojan", "wanet", "adaptive_blend"])
def test_dirty_label_set_relabels_exactly_the_poisoned_positions(attack):
  images, labels = _data()
  block = _block(attack, quick=False, target=3, rate=0.1)
  out = registry.poison(block, images, labels, parallel.make_mesh())
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
  again = registry.poison(block, images, labels, parallel.make_mesh())
  np.testing.assert_array_equal(again.images, out.images)


def test_badnets_poison_has_the_white_square_and_the_test_trigger_matches():
  images, labels = _data()
  out = registry.poison(_block("badnets", target=1), images, labels, parallel.make_mesh())
  np.testing.assert_array_equal(out.images[out.poison][:, 29:, 29:], 255)
  np.testing.assert_array_equal(out.images[out.poison][:, :29], images[out.poison][:, :29])
  trigger = registry.test_trigger(_block("badnets"), 32)
  np.testing.assert_array_equal(np.asarray(trigger(images[:4])), triggers.badnets(images[:4]))


def test_adaptive_blend_tests_with_the_full_pattern_at_test_alpha():
  images, _ = _data(8)
  block = _block("adaptive_blend")
  pattern = triggers.blend_pattern(32, block.adaptive_blend.pattern_seed)
  np.testing.assert_array_equal(np.asarray(registry.test_trigger(block, 32)(images)),
                                triggers.blended(images, pattern, 0.2))


def test_clean_label_sig_poisons_target_images_only_and_keeps_labels():
  images, labels = _data()
  out = registry.poison(_block("sig", target=4), images, labels, parallel.make_mesh())
  assert len(out.poison) == 20  # quick: convention 'class', rate 1: every target image
  np.testing.assert_array_equal(labels[out.poison], 4)
  np.testing.assert_array_equal(out.labels, labels)


def test_saved_set_loads_back_with_its_arrays_and_settings(tmp_path):
  images, labels = _data()
  block = _block("wanet", quick=False, target=2)
  out = registry.poison(block, images, labels, parallel.make_mesh())
  registry.save(str(tmp_path / "p.npz"), out, block)
  loaded, settings = registry.load(str(tmp_path / "p.npz"))
  for a, b in zip(loaded[:5], out[:5]):
    np.testing.assert_array_equal(a, b)
  np.testing.assert_array_equal(loaded.arrays["grid"], out.arrays["grid"])
  assert settings.attack == "wanet" and settings.target == 2
  # The saved grid rebuilds the test trigger exactly.
  np.testing.assert_array_equal(triggers.wanet(images[:2], loaded.arrays["grid"]),
                                registry.test_trigger(block, 32)(images[:2]))


def _saved(tmp_path, **changes):
  """A BadNets set saved to p.npz with arrays replaced by `changes` -> (path, the clean split, the block)."""
  images, labels = _data()
  block = _block("badnets")
  out = registry.poison(block, images, labels, parallel.make_mesh())
  path = str(tmp_path / "p.npz")
  registry.save(path, out._replace(**changes), block)
  return path, ImageSplit(images, labels, 10, "digits", "train"), block


def test_load_checks_the_set_against_the_clean_split_and_the_config(tmp_path):
  path, split, block = _saved(tmp_path)
  registry.load(path, split, block)
  other = block.copy_and_resolve_references()
  other.target = 3
  with pytest.raises(UserError, match="settings that differ from config.poison; delete .* re-run"):
    registry.load(path, split, other)
  smaller = ImageSplit(split.images[:-1], split.labels[:-1], 10, "digits", "train")
  with pytest.raises(UserError, match=f"{len(split.labels)} images of size 32, but digits train has"):
    registry.load(path, smaller, block)


@pytest.mark.parametrize("changes, problem", [
    (lambda s: dict(images=s.images.astype(np.float32) / 255), "images are float32"),
    (lambda s: dict(labels=s.labels.astype(np.float32)), "labels or positions are not integers"),
    (lambda s: dict(labels=s.labels + 10), "labels outside digits's 10 classes"),
    (lambda s: dict(poison=s.poison + 10_000), "poison positions outside"),
])
def test_load_refuses_a_set_of_the_wrong_kind_in_one_line(tmp_path, changes, problem):
  images, labels = _data()
  clean = registry.poison(_block("badnets"), images, labels, parallel.make_mesh())
  path, split, block = _saved(tmp_path, **changes(clean))
  with pytest.raises(UserError, match=f"p.npz holds {problem}"):
    registry.load(path, split, block)


@pytest.mark.parametrize("damage", ["truncated", "random"])
def test_load_refuses_a_damaged_file_in_one_line(tmp_path, damage):
  path, split, block = _saved(tmp_path)
  with open(path, "rb") as f:
    data = f.read()
  with open(path, "wb") as f:
    f.write(data[:len(data) // 2] if damage == "truncated" else np.random.default_rng(0).bytes(len(data)))
  with pytest.raises(UserError, match=r"p.npz cannot be read as a poisoned set \(\w+\); delete .* re-run"):
    registry.load(path, split, block)


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
    registry.check(block, 32, labels)


def test_clean_label_attack_with_too_few_target_images_fails():
  _, labels = _data()
  block = _block("sig", convention="dataset", rate=0.5)
  with pytest.raises(UserError, match="needs 100 images of target class 0 but it has 20"):
    registry.check(block, 32, labels)


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
