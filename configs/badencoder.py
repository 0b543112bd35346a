"""BadEncoder (Jia et al., S&P 2022): backdoor a clean SimCLR encoder for one downstream task.

The argument names the downstream task (and so the target class and its reference): stl10 (truck, 9),
gtsrb (priority road, 12) or svhn_cropped (one, 1). The clean encoder is pre-trained in the same workdir
unless --config.attack.clean_encoder names a finished pre-training run (e.g. runs/simclr).

Full (CIFAR-10 shadow set, 200 epochs, SGD 1e-3, batch 256; then the MLP evaluation):
  python main.py --config configs/badencoder.py:stl10 --config.attack.clean_encoder=runs/simclr
Quick (digits, a narrow ResNet-18, minutes on a 2-core CPU):
  python main.py --config configs/badencoder.py:quick
"""

from configs import common


def get_config(arg=None):
  arg = common.parse_arg(arg, downstream="stl10", method="simclr", quick=False)
  return common.encoder_attack_experiment("badencoder", arg.downstream, arg.method, arg.quick)
