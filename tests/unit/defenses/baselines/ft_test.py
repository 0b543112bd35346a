"""FT (fine-tuning the undefended classifier on the reserve): its batch rule and bad input; its training runs in
the end-to-end compare test (tests/e2e/run_compare_test.py)."""

import numpy as np
import pytest
from helpers import config as load_config

from jaxpurify.defenses.baselines import _repair, ft
from jaxpurify.errors import UserError


def test_batch_is_the_reserve_at_most_and_splits_over_the_devices():
  assert _repair.batch_size(examples=70, wanted=256, devices=1) == 70  # quick: the whole reserve in one batch
  assert _repair.batch_size(examples=70, wanted=256, devices=8) == 64
  assert _repair.batch_size(examples=2500, wanted=256, devices=8) == 256  # full size: BackdoorBench's batch
  assert _repair.batch_size(examples=7, wanted=256, devices=8) == 0


def test_a_reserve_smaller_than_one_batch_over_the_devices_is_one_line():
  config = load_config("baseline:defense=ft,threat=2,attack=badnets,tiny")
  ft.check(config.baseline.ft, config, np.full(8, 16), np.full(8, 1))  # 8 images, 8 devices: one batch
  with pytest.raises(UserError, match="holds 7 images, fewer than one batch over the 8 devices") as err:
    ft.check(config.baseline.ft, config, np.full(7, 16), np.full(7, 1))
  assert "\n" not in str(err.value)
