"""Seeds as an axis: parsing --seeds, pooling rows across seeds (against NumPy), the table."""

import numpy as np
import pytest

from helpers import config
from jaxpurify import seeds
from jaxpurify.errors import UserError


def test_parse_counts_and_lists():
  assert seeds.parse("3") == (0, 1, 2)
  assert seeds.parse("0,4,7") == (0, 4, 7)
  assert seeds.parse("5,") == (5,)
  for bad in ("", "0", "1,1", "a", "-1,2"):
    with pytest.raises(UserError, match="--seeds"):
      seeds.parse(bad)
  with pytest.raises(UserError, match="one seed: --seeds 0,"):  # a count of 0 is not seed 0
    seeds.parse("0")


def test_seed_config_changes_only_the_seed():
  base = config("simclr:tiny")
  cell = seeds.seed_config(base, 7)
  assert cell.seed == 7 and base.seed == 100
  cell.seed = base.seed
  assert cell.to_json() == base.to_json()


def test_seed_config_fills_the_seed_into_paths():
  base = config("badencoder:tiny", "attack.clean_encoder=runs/simclr-seeds/seed{seed}/pretrain")
  cell = seeds.seed_config(base, 3)
  assert cell.attack.clean_encoder == "runs/simclr-seeds/seed3/pretrain"
  assert base.attack.clean_encoder.endswith("seed{seed}/pretrain")
  assert cell.attack.trigger.kind == base.attack.trigger.kind


def test_pool_gives_mean_sample_std_extremes_and_values_per_label():
  rows = {0: [{"row": "clean/d", "acc": 0.9, "asr": 0.1}, {"row": "poisoned/d", "acc": 0.8, "asr": 0.9}],
          1: [{"row": "clean/d", "acc": 0.7, "asr": 0.3}, {"row": "poisoned/d", "acc": 0.6, "asr": 1.0}],
          2: [{"row": "clean/d", "acc": 0.8, "asr": 0.2}, {"row": "poisoned/d", "acc": 0.7, "asr": 0.2}]}
  pooled = seeds.pool(rows)
  assert [r["row"] for r in pooled] == ["clean/d", "poisoned/d"]
  asr = pooled[1]["asr"]
  np.testing.assert_allclose(asr["mean"], 0.7)
  np.testing.assert_allclose(asr["std"], np.std([0.9, 1.0, 0.2], ddof=1))
  assert (asr["n"], asr["min"], asr["max"]) == (3, 0.2, 1.0)
  assert asr["values"] == {"0": 0.9, "1": 1.0, "2": 0.2}
  one = seeds.pool({4: rows[0]})
  assert one[0]["acc"]["std"] == 0.0 and one[0]["acc"]["n"] == 1


def test_table_shows_mean_std_n_and_every_seed():
  pooled = seeds.pool({0: [{"cell": "a/b", "acc": 0.5, "trusted": 12}], 3: [{"cell": "a/b", "acc": 0.7, "trusted": 9}]})
  text = seeds.table(pooled, (0, 3))
  assert "| a/b | acc | 60.00 ± 14.14 (2) | 50.00 | 70.00 | 50.00 | 70.00 |" in text
  assert "trusted" not in text  # counts stay in seeds.json


def test_config_seed_redraws_the_poison_positions_unless_poison_seed_is_set():
  from jaxpurify import threats
  from jaxpurify.poisoning import registry
  labels = np.tile(np.arange(10), 50)
  base = config("threat:threat=2,attack=badnets,quick")
  assert base.poison.seed is None
  blocks = {s: threats.poison_block(seeds.seed_config(base, s)) for s in (0, 1)}
  assert blocks[0].seed == 0 and blocks[1].seed == 1
  assert not np.array_equal(registry.indices(blocks[0], labels)[0], registry.indices(blocks[1], labels)[0])
  fixed = config("threat:threat=2,attack=badnets,quick", "poison.seed=7")
  assert {threats.poison_block(seeds.seed_config(fixed, s)).seed for s in (0, 1)} == {7}
