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

import ml_collections

from configs import badencoder, common

ATTACKS = ("badencoder", "drupe")  # the encoder attacks the distillation defense is judged on


def get_config(arg=None):
  return common.build(arg, experiment, attack="badencoder", downstream="stl10", teacher="finetuned",
                      student="warmup", loss="at")


def experiment(attack: str, downstream: str, teacher: str, student: str, loss: str,
               quick: bool) -> ml_collections.ConfigDict:
  """The distillation defense against a BadEncoder/DRUPE (`attack`) encoder backdoored for `downstream`.

  The defense's SSL recipe is the official code's (distillation.md section 8): SimCLR (τ 0.5), Adam 1e-3 with
  coupled weight decay 1e-6, batch 128, 500 epochs, no schedule, on the first 5% of the pre-training set.
  Team choices (unknown in the paper): teacher fine-tuning 100 epochs at the same lr, student warm-up 500 epochs;
  the student is monitored with the linear probe every 50 epochs (the kNN monitor misses BadEncoder's backdoor
  on digits: asr 0 on the poisoned encoder). quick: 20% of digits (287 images) at batch 64; teacher 10, warm-up
  30, distillation 30 epochs, monitored every 5; the clean encoder pre-trained at batch 64 for 12 epochs (264
  steps, as many as configs/simclr.py:quick's 25 epochs at batch 128, in half the time: the README's quickstart).

  loss.taps: the student's taps the map losses compare (default: a ResNet's layer1..layer4, a 12-block ViT's
  block3, block6, block9, block12); loss.teacher_taps: the teacher's, paired in order (default: the same names, or
  the teacher's own default taps when it is another architecture); loss.layer_weights: one weight per pair.
  """
  c = badencoder.experiment(attack, downstream, "simclr", quick)
  c.experiment = "distill"
  ssl = common.pretraining("simclr", quick=False)
  ssl.train.update(batch_size=128, epochs=500, log_every=20, checkpoint_every=1000)
  c.defense = ml_collections.ConfigDict(dict(
      suspect_encoder="", clean_fraction=0.05, subset="first",
      teacher=dict(kind=teacher, checkpoint="", model=dict(name="", width=0), epochs=100, lr=1e-3),
      student=dict(init=student, checkpoint="", model=dict(name="", width=0), warmup_epochs=500),
      loss=dict(name=loss, taps=ml_collections.config_dict.placeholder(tuple),
                teacher_taps=ml_collections.config_dict.placeholder(tuple),
                layer_weights=ml_collections.config_dict.placeholder(tuple),
                clone_weight=ml_collections.config_dict.placeholder(float)),
      ssl=ssl, monitor=dict(every_epochs=50, protocol="linear")))
  if quick:
    c.pretrain.train.update(batch_size=64, epochs=12)
    c.defense.clean_fraction = 0.2
    c.defense.ssl.train.update(batch_size=64, epochs=30, log_every=10, checkpoint_every=100)
    c.defense.teacher.epochs, c.defense.student.warmup_epochs = 10, 30
    c.defense.monitor.every_epochs = 5
  return c
