"""The three threats of transfer learning: a poisoned encoder, poisoned downstream data, or both.

  python main.py --config configs/threat.py:threat=2,attack=badnets,quick
  python main.py --config configs/threat.py:threat=1,attack=badencoder,quick
  python main.py --config configs/threat.py:threat=3,attack=badnets,encoder=badencoder,quick
Full (CIFAR-10 SimCLR encoder, downstream STL-10 / GTSRB / SVHN):
  python main.py --config configs/threat.py:threat=2,attack=blended,downstream=gtsrb \\
      --config.clean_encoder=runs/simclr

threat 1: attack = badencoder | drupe. threat 2 and 3: attack = badnets | blended | trojan | wanet |
adaptive_blend | sig | label_consistent | issba | input_aware; threat 3 adds the encoder attack `encoder`
(default badencoder), trained with the data attack's trigger and target.
"""

from configs import common


def get_config(arg=None):
  arg = common.parse_arg(arg, threat=2, attack="badnets", encoder="badencoder", downstream="stl10", quick=False)
  return common.threat_experiment(arg.threat, arg.attack, arg.encoder, arg.downstream, arg.quick)
