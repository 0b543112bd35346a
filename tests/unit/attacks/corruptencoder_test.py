"""CorruptEncoder's poisoned images against an independent reference: counts, references from the target class,
backgrounds from the others, the object at the bottom on one side within its marginal, the trigger on the other side
within its window and equal to the patch, every other pixel the background's; the pre-training set kept
bit-identical with the poison appended; determinism and bad input."""

import numpy as np
import pytest

from configs import corruptencoder as corruptencoder_config
from helpers import config
from jaxpurify import data, experiments
from jaxpurify.attacks import corruptencoder, patches, pretrain_poisoning
from jaxpurify.errors import UserError

DIGITS = data.load_split("digits", "train", image_size=32)
ATTACK = corruptencoder_config.attack_block(0, "digits", quick=True)
PATCH = patches.trigger_patch(ATTACK.trigger)


def test_composites_match_the_layout_rules():
  added, plan = corruptencoder.poison(DIGITS.images, DIGITS.labels, 0, ATTACK, PATCH, seed=7)
  count, t, size = round(0.05 * 1437), len(PATCH), 32
  assert added.shape == (count, 32, 32, 3) and len(plan.references) == 3
  assert (DIGITS.labels[plan.references] == 0).all() and (DIGITS.labels[plan.background] != 0).all()
  assert len(set(plan.background)) == count and set(plan.reference) <= {0, 1, 2}
  for image, ref, bg, (o_y, o_x, o_h, o_w), (t_y, t_x), left in zip(added, plan.reference, plan.background,
                                                                    plan.object_box, plan.trigger, plan.object_left):
    assert o_y + o_h == size and o_w <= size / 2 and o_h <= size  # at the bottom, fitted into width / area_ratio
    assert (o_x <= 0.05 * size) if left else (o_x >= size - o_w - 0.05 * size - 1)
    assert (t_x >= o_x + o_w) if left else (t_x + t <= o_x)  # the trigger on the other side
    assert 0.25 * size - 1 <= t_y and t_y + t <= 0.75 * size + 1
    np.testing.assert_array_equal(image[t_y:t_y + t, t_x:t_x + t], PATCH)
    pixels, mask = corruptencoder.reference_object(DIGITS.images[plan.references[ref]], 64, (32, 16))
    assert mask.shape == (o_h, o_w)
    region = image[o_y:o_y + o_h, o_x:o_x + o_w]
    np.testing.assert_array_equal(region[mask], pixels[mask])
    np.testing.assert_array_equal(region[~mask], DIGITS.images[bg][o_y:o_y + o_h, o_x:o_x + o_w][~mask])
    rest = np.ones((size, size), bool)
    rest[o_y:o_y + o_h, o_x:o_x + o_w] = False
    rest[t_y:t_y + t, t_x:t_x + t] = False
    np.testing.assert_array_equal(image[rest], DIGITS.images[bg][rest])


def test_reference_object_is_the_bright_pixels_bounding_box():
  image = np.zeros((32, 32, 3), np.uint8)
  image[4:28, 10:18] = 200  # 24 tall, 8 wide
  pixels, mask = corruptencoder.reference_object(image, 64, (32, 16))
  assert pixels.shape == (32, 10, 3) and mask.all()  # scaled by min(32 / 24, 16 / 8): aspect kept
  whole, mask = corruptencoder.reference_object(image, 0, (32, 16))
  assert whole.shape == (16, 16, 3) and mask.all()  # threshold 0: the whole image
  with pytest.raises(UserError, match="no pixel of brightness >= 250; lower config.attack.object_threshold"):
    corruptencoder.reference_object(image, 250, (32, 16))


def test_pretraining_set_is_kept_and_the_poison_appended_deterministically():
  images, record = pretrain_poisoning.poison(ATTACK, DIGITS, seed=3)
  np.testing.assert_array_equal(images[:1437], DIGITS.images)
  np.testing.assert_array_equal(record["positions"], np.arange(1437, 1437 + 72))
  again, record2 = pretrain_poisoning.poison(ATTACK, DIGITS, seed=3)
  np.testing.assert_array_equal(again, images)
  assert all(np.array_equal(record[k], record2[k]) for k in record)
  assert not np.array_equal(pretrain_poisoning.poison(ATTACK, DIGITS, seed=4)[1]["background"], record["background"])
  full = corruptencoder_config.attack_block(0, "digits", quick=False)  # the official 0.5%, whole-image objects
  assert len(pretrain_poisoning.poison(full, DIGITS, seed=3)[1]["positions"]) == round(0.005 * 1437)


def test_threat_3_applies_the_data_trigger_to_the_composites():
  images, record = pretrain_poisoning.poison(ATTACK, DIGITS, seed=3, trigger=lambda x: 255 - x)
  untriggered, plan = corruptencoder.poison(DIGITS.images, DIGITS.labels, 0, ATTACK, None, seed=3)
  np.testing.assert_array_equal(images[1437:], 255 - untriggered)
  assert (plan.trigger == -1).all() and (record["trigger"] == -1).all()


@pytest.mark.parametrize("override, message", [
    ("attack.area_ratio=0.5", "config.attack.area_ratio must be a number of at least 1"),
    ("attack.object_threshold=300", r"config.attack.object_threshold must be an integer in 0..255"),
    ("attack.background=places", "unknown config.attack.background 'places'"),
    ("attack.trigger.size=20", "does not fit beside the object"),
])
def test_bad_settings_fail_in_one_line(override, message):
  with pytest.raises(UserError, match=message) as err:
    experiments.check(config("corruptencoder:quick", override))
  assert "\n" not in str(err.value)
