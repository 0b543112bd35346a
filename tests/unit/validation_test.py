"""Everything a config says is checked before anything runs: every number by the rules of jaxpurify.validation,
every name by the experiment's check, on every config file."""

import re

import pytest

from helpers import config
from jaxpurify import experiments, validation
from jaxpurify.errors import UserError
from jaxpurify.poisoning.defaults import ATTACKS

FULL = ["simclr", "moco", "byol", "badencoder", "drupe", "ctrl", "distill", "threat:threat=1,attack=badencoder",
        "threat:threat=2,attack=input_aware", "tcore:threat=3,attack=blended",
        "distill:attack=drupe,downstream=gtsrb,smoke", "tcore:threat=3,attack=blended,smoke",
        "baseline:defense=ct,threat=3,attack=blended"]
# Together these hold every key of every config: all experiments, and each attack with its own settings block.
TINY = ["simclr:tiny", "moco:tiny", "byol:tiny", "ctrl:tiny", "distill:tiny", "threat:threat=2,attack=issba,tiny",
        "threat:threat=2,attack=label_consistent,tiny", "threat:threat=2,attack=input_aware,tiny",
        "tcore:threat=3,attack=blended,tiny", "baseline:defense=ss,threat=2,attack=badnets,tiny"]
PATHS = {"clean_encoder", "reference_file", "data_dir", "checkpoint", "suspect_encoder", "path"}
BAD = {"an integer of at least 0": -1, "an integer of at least 1": 0, "in (0, 1]": 0.0, "in [0, 1]": 1.5,
       "in [0, 1)": 1.0, "a number above 0": 0.0, "a number of at least 0": -0.5, "in (0, 1)": 1.0}


def leaves(node, prefix=""):
  for key, value in node.items():
    if hasattr(value, "items"):
      yield from leaves(value, f"{prefix}{key}.")
    else:
      yield f"{prefix}{key}", value


def with_value(cfg, key, value):
  cell = cfg.copy_and_resolve_references()
  *parents, leaf = key.split(".")
  node = cell
  for part in parents:
    node = node[part]
  with cell.unlocked():
    node[leaf] = value
  return cell


def rule_of(key):
  name = key.rpartition(".")[2]
  return next((what for pattern, _, what in validation._COMPILED if pattern.fullmatch(name)), None)


@pytest.mark.parametrize("name_arg", FULL + TINY)
def test_shipped_configs_pass(name_arg):
  validation.check(config(name_arg))


@pytest.mark.parametrize("name_arg", ["distill:tiny", "tcore:threat=3,attack=blended,tiny",
                                      "baseline:defense=abl,threat=2,attack=badnets,tiny",
                                      "threat:threat=2,attack=input_aware,tiny", "threat:threat=2,attack=issba,tiny"])
def test_every_ranged_number_out_of_range_is_refused_naming_its_key(name_arg):
  cfg, checked = config(name_arg), 0
  for key, value in leaves(cfg):
    what = rule_of(key)
    if what is None or value is None or isinstance(value, (str, bool)):
      continue
    bad = BAD[what] if not isinstance(value, tuple) else tuple(value[:-1]) + (BAD[what],)
    with pytest.raises(UserError, match="^" + re.escape(f"config.{key} must be {what}, got")):
      validation.check_ranges(with_value(cfg, key, bad))
    checked += 1
  assert checked >= 40


def test_rules_cover_the_keys_that_set_run_length_and_rates():
  for key in ("pretrain.train.epochs", "finetune.ft_all.train.batch_size", "defense.clean_fraction",
              "poison.rate", "tcore.expand.iters", "tcore.boot.schedule", "attack.optim.lr"):
    assert rule_of(key) is not None, key
  assert rule_of("pretrain.optim.warmup_epochs") == "an integer of at least 0"


@pytest.mark.parametrize("name_arg", TINY)
def test_every_name_is_checked_before_anything_runs(name_arg):
  """Each string setting set to an unknown name: the experiment's check refuses it in one line (no training)."""
  cfg = config(name_arg)
  attack = cfg.poison.attack if "poison" in cfg else None
  for key, value in leaves(cfg):
    parts = key.split(".")
    if not isinstance(value, str) or parts[-1] in PATHS or (parts[0] == "poison" and parts[1] in ATTACKS
                                                           and parts[1] != attack):
      continue  # paths are checked as files; the blocks of the attacks not chosen are not used
    with pytest.raises(UserError) as err:
      experiments.check(with_value(cfg, key, "foo"))
    assert "\n" not in str(err.value), key


def test_batch_larger_than_its_data_is_refused_with_its_key():
  cfg = config("threat:threat=2,attack=badnets,tiny", "finetune.ft_all.train.batch_size=2048")
  with pytest.raises(UserError, match=r"config\.finetune\.ft_all\.train\.batch_size=2048 is larger than the 1437 "):
    experiments.check(cfg)
  cfg = config("badencoder:tiny", "attack.shadow_fraction=0.05")
  with pytest.raises(UserError, match=r"config\.attack\.train\.batch_size=128 is larger than the 72 shadow images"):
    experiments.check(cfg)


def test_batch_not_split_evenly_over_the_devices_is_refused():
  with pytest.raises(UserError, match=r"config\.pretrain\.train\.batch_size=60 is not divisible by the 8 devices"):
    validation.check(config("simclr:tiny", "pretrain.train.batch_size=60"))
