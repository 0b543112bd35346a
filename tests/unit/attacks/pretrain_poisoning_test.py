"""The pre-training poisoning attacks as the threat harness's encoder attack: the attack blocks threats 1 and 3 (and
T-Core and the baselines through them) build, the pre-training target per downstream task, and the refusals."""

import pytest

from configs import baseline as baseline_config
from configs import tcore as tcore_config
from configs import threat as threat_config
from helpers import config
from jaxpurify import experiments
from jaxpurify.errors import UserError

POISONING = ("ctrl", "ssl_backdoor", "corruptencoder")


@pytest.mark.parametrize("attack", POISONING)
def test_threat_1_and_3_blocks(attack):
  one = threat_config.get_config(f"threat=1,attack={attack},quick")
  assert one.attack.mode == attack and "trigger" in one.attack and "clean_encoder" not in one.attack
  assert one.attack.target == one.attack.pretrain_target == 1 and one.attack.downstream == "digits"
  three = threat_config.get_config(f"threat=3,attack=badnets,encoder={attack},quick")
  assert not {"trigger", "train_location", "test_location"} & set(three.attack)  # the data attack's trigger
  assert three.attack.target == three.poison.target == three.attack.pretrain_target
  assert tcore_config.get_config(f"threat=1,attack={attack},quick").attack.mode == attack
  assert baseline_config.get_config(f"defense=ss,threat=1,attack={attack},quick").attack.mode == attack


def test_full_setting_targets():
  stl10 = threat_config.get_config("threat=1,attack=ssl_backdoor")
  assert (stl10.data.name, stl10.attack.pretrain_target, stl10.attack.target) == ("cifar10", 9, 9)  # truck, truck
  assert threat_config.get_config("threat=1,attack=ctrl,downstream=gtsrb").attack.pretrain_target == -1


def test_a_pretraining_set_without_the_target_is_refused_in_one_line():
  with pytest.raises(UserError, match="has no class matching the downstream digits's target 1, so corruptencoder "
                     "has no class to poison; use downstream=stl10") as err:
    experiments.check(config("threat:threat=1,attack=corruptencoder,quick", "attack.pretrain_target=-1"))
  assert "\n" not in str(err.value)
