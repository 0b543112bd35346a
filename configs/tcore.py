"""T-Core: trusted-core bootstrapping of a clean downstream model under the three threats.

  python main.py --config configs/tcore.py:threat=2,attack=badnets,quick
  python main.py --config configs/tcore.py:threat=1,attack=badencoder,quick
  python main.py --config configs/tcore.py:threat=3,attack=blended,encoder=badencoder,quick
Full (CIFAR-10 SimCLR encoder, downstream STL-10 / GTSRB / SVHN):
  python main.py --config configs/tcore.py:threat=2,attack=badnets,downstream=gtsrb \\
      --config.clean_encoder=runs/simclr

protocol = ft_all (default) | ft_head | both. Components are switched off with
--config.tcore.skip='("filter",)'; `python -m jaxpurify.ablate --config configs/tcore.py:...` removes each in turn.
"""

from configs import common


def get_config(arg=None):
  arg = common.parse_arg(arg, threat=2, attack="badnets", encoder="badencoder", downstream="stl10",
                         protocol="ft_all", quick=False)
  return common.tcore_experiment(arg.threat, arg.attack, arg.encoder, arg.downstream, arg.protocol, arg.quick)
