"""The distillation defense (Han et al.): purify a BadEncoder/DRUPE-poisoned encoder by distilling a fine-tuned
teacher into a warmed-up student on a little clean, unlabelled data with attention transfer.

Arguments: attack (badencoder | drupe), downstream (stl10 | gtsrb | svhn_cropped), teacher (finetuned |
poisoned), student (warmup | random | poisoned_copy), loss (at | afd | fitnet | cc | kd | sp | clone), quick.
The pipeline runs clean pre-training -> attack -> teacher -> student warm-up -> distillation -> evaluation in
one workdir; --config.attack.clean_encoder or --config.defense.suspect_encoder skip the first stages.

Full (CIFAR-10; 5% defender data; Adam 1e-3, batch 128, 500 epochs):
  python main.py --config configs/distill.py:attack=badencoder,downstream=stl10
Quick (digits, a narrow ResNet-18, minutes on a 2-core CPU):
  python main.py --config configs/distill.py:quick
"""

from configs import common


def get_config(arg=None):
  arg = common.parse_arg(arg, attack="badencoder", downstream="stl10", teacher="finetuned", student="warmup",
                         loss="at", quick=False)
  return common.distill_experiment(arg.attack, arg.downstream, arg.teacher, arg.student, arg.loss, arg.quick)
