"""SSL-Backdoor's poisoning and the patch triggers it shares with CorruptEncoder, against NumPy references: the
target-class images drawn, the patch inside the training window, untouched images bit-identical, the test trigger
on a sharded batch, determinism and bad input."""

import jax
import numpy as np
import pytest
from PIL import Image

from configs import ssl_backdoor as ssl_backdoor_config
from helpers import config
from jaxpurify import experiments, parallel
from jaxpurify.attacks import patches, pretrain_poisoning, ssl_backdoor
from jaxpurify.data import ImageSplit
from jaxpurify.errors import UserError

RNG = np.random.default_rng(0)
IMAGES = RNG.integers(0, 256, (60, 32, 32, 3), dtype=np.uint8)
LABELS = np.repeat(np.arange(6), 10)
PATCH = patches.trigger_patch(ssl_backdoor_config.htba_trigger(7))


def reference_paste(image, row, col):
  out = image.copy()
  out[row:row + len(PATCH), col:col + len(PATCH)] = PATCH
  return out


def test_windows_follow_ssl_backdoors_rule():
  assert patches.window(32, 7, 0.25, 0.75, "train_location") == (8, 17)  # int(8.0), int(24 - 7)
  assert patches.window(32, 7, 0.10, 0.90, "test_location") == (3, 21)  # int(3.2), int(28.8 - 7)
  assert patches.window(32, 20, 0.25, 0.75, "train_location") == (8, 8)  # the code clamps last to first
  with pytest.raises(UserError, match="leaves the 32-pixel image; lower config.attack.trigger.size"):
    patches.window(32, 30, 0.25, 0.75, "train_location")
  with pytest.raises(UserError, match=r"config.attack.test_location = \(0.9, 0.1\) is not a range"):
    patches.window(32, 7, 0.9, 0.1, "test_location")


@pytest.mark.parametrize("rate", [1.0, 0.5, 0.25])
def test_poison_pastes_the_patch_into_target_class_images_only(rate):
  index = ssl_backdoor.poison_indices(LABELS, 3, rate, seed=5)
  assert len(index) == round(rate * 10) and (LABELS[index] == 3).all() and len(set(index)) == len(index)
  poisoned, where = ssl_backdoor.poison(IMAGES, index, PATCH, (8, 17), seed=5)
  assert where.shape == (len(index), 2) and ((8 <= where) & (where <= 17)).all()
  for i, (row, col) in zip(index, where):
    np.testing.assert_array_equal(poisoned[i], reference_paste(IMAGES[i], row, col))
  untouched = np.setdiff1d(np.arange(len(IMAGES)), index)
  np.testing.assert_array_equal(poisoned[untouched], IMAGES[untouched])
  again = ssl_backdoor.poison(IMAGES, ssl_backdoor.poison_indices(LABELS, 3, rate, seed=5), PATCH, (8, 17), seed=5)
  np.testing.assert_array_equal(again[0], poisoned)
  np.testing.assert_array_equal(again[1], where)


def test_positions_cover_the_window_and_change_with_the_seed():
  index = np.arange(60)
  _, where = ssl_backdoor.poison(IMAGES, index, PATCH, (8, 17), seed=0)
  assert where.min() == 8 and where.max() == 17
  assert not np.array_equal(where, ssl_backdoor.poison(IMAGES, index, PATCH, (8, 17), seed=1)[1])


def test_test_trigger_on_a_sharded_batch_matches_the_reference():
  mesh = parallel.make_mesh((("data", -1),))
  trigger = patches.random_paste(PATCH, (3, 21), seed=4)
  images = IMAGES[:16]
  with jax.set_mesh(mesh):
    out = np.asarray(jax.jit(trigger)(jax.device_put(images, jax.NamedSharding(mesh, jax.P("data")))))
  where = np.asarray(jax.random.randint(jax.random.key(4), (16, 2), 3, 22))
  assert ((3 <= where) & (where <= 21)).all()
  for image, got, (row, col) in zip(images, out, where):
    np.testing.assert_array_equal(got, reference_paste(image, row, col))


def test_trigger_patch_is_seeded_or_read_from_a_file(tmp_path):
  block = ssl_backdoor_config.htba_trigger(7)
  np.testing.assert_array_equal(patches.trigger_patch(block), PATCH)
  block.seed = 1
  assert not np.array_equal(patches.trigger_patch(block), PATCH)
  path = str(tmp_path / "trigger.png")
  Image.fromarray(PATCH).save(path)
  block.path = path
  np.testing.assert_array_equal(patches.trigger_patch(block), PATCH)  # same size: the resize keeps it
  block.path = str(tmp_path / "missing.png")
  with pytest.raises(UserError, match="does not exist; fix config.attack.trigger.path"):
    patches.trigger_patch(block)
  (tmp_path / "bad.png").write_text("not an image")
  block.path = str(tmp_path / "bad.png")
  with pytest.raises(UserError, match="is not a readable image"):
    patches.trigger_patch(block)


def test_pretrain_poisoning_returns_the_set_with_positions():
  attack = ssl_backdoor_config.attack_block(2, "digits")
  split = ImageSplit(IMAGES, LABELS, 6, "fake", "train")
  images, record = pretrain_poisoning.poison(attack, split, seed=3)
  assert images.shape == IMAGES.shape and len(record["positions"]) == 10
  np.testing.assert_array_equal(record["positions"], ssl_backdoor.poison_indices(LABELS, 2, 1.0, 3))
  stamp = lambda x: x // 2  # threat 3: the data attack's trigger applied to the same images
  images3, record3 = pretrain_poisoning.poison(attack, split, seed=3, trigger=stamp)
  np.testing.assert_array_equal(images3[record3["positions"]], IMAGES[record3["positions"]] // 2)
  assert set(record3) == {"positions"}


@pytest.mark.parametrize("override, message", [
    ("attack.poison_rate=0.0", r"config.attack.poison_rate must be in \(0, 1\], got 0.0"),
    ("attack.train_location=(0.5, 0.2)", r"config.attack.train_location = \(0.5, 0.2\) is not a range"),
    ("attack.test_location=(0.1, 1.5)", r"config.attack.test_location must be in \[0, 1\]"),
    ("attack.trigger.size=30", "leaves the 32-pixel image"),
    ("attack.trigger.seed=-1", r"config.attack.trigger.seed=-1 is negative; set a seed >= 0"),
    ("attack.target=12", "config.attack.target=12 is not a class of the pre-training set digits"),
    ("attack.downstream=svhn_cropped", "set config.attack.downstream to config.data.name"),
])
def test_bad_settings_fail_in_one_line(override, message):
  with pytest.raises(UserError, match=message) as err:
    experiments.check(config("ssl_backdoor:quick", override))
  assert "\n" not in str(err.value)
