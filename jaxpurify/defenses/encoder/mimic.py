"""MIMIC (Han et al., TIFS'25; github:wssun/MIMIC, MIMIC.py and models/scheduler.py): the distillation defense's
successor from the same group. The poisoned encoder itself is the teacher (no fine-tuning), the student starts
from random weights (no warm-up), and the per-stage attention-transfer weights come from mutual information:
for each compared tap of the freshly initialised student (layer1..layer4 of a ResNet; block3, 6, 9, 12 of a
12-block ViT: distill's `default_taps`), a Donsker-Varadhan estimate of the MI between the tap's map and the final
feature (`_mutual_information`), weight_k = base + momentum * MI_k / sum MI; the loss is
NT-Xent + sum_k weight_k AT_k + clone (the official opt5 = 1). Everything else is the distillation defense's SSL
recipe (config.defense.ssl: SimCLR views, Adam with weight decay 1e-6, batch), on the same defender subset.

Defaults: the README's command (lr 1e-2, 1000 epochs; the code's default lr is 1e-3), base 1000 and momentum 10000
(MIMIC.py's weight_scheduler), the estimator's 200 epochs at Adam 1e-3, weight decay 1e-5, MI = mean of the last
10 epochs (scheduler.py). MIMIC reads 4% of the pre-training set; here it reads the distillation defense's subset,
so the two are compared on the same data. quick: 60 epochs (the distillation defense's 30 warm-up + 30
distillation epochs), 20 estimator epochs.
"""

from types import SimpleNamespace

from flax import nnx

from jaxpurify import encoders, parallel
from jaxpurify.defenses.distill import step as distill_step
from jaxpurify.defenses.distill import training
from jaxpurify.defenses.encoder import _mutual_information
from jaxpurify.pipeline import derived_config

CLEAN_DATA = True


def check(block, config) -> None:
  """The estimator's settings against the mesh (its batches are split over the devices)."""
  _mutual_information.check_block(block, parallel.make_mesh(config.mesh).devices.size)


def recipe(config, block):
  """config with the distillation set up as MIMIC's: the suspect as teacher, a random student, AT + clone, MIMIC's
  epochs and lr (the per-stage weights come later, from the MI estimates)."""
  return derived_config(config, {"defense.teacher.kind": "poisoned", "defense.student.init": "random",
                                 "defense.loss.name": "at", "defense.loss.clone_weight": block.clone_weight,
                                 "defense.ssl.train.epochs": block.epochs, "defense.ssl.optim.lr": block.lr})


def purify(run, block, config, suspect, images, mesh, backdoor):
  """MI weights of the random student's stages (stage `mimic_weights`), then its distillation from the suspect
  (stage `mimic`) -> (defended backbone, {mi, layer_weights} per tap)."""
  mimic = recipe(config, block)
  student = training.initial_student(run, mimic, suspect, images, mesh)
  graphdef, params, batch_stats = student
  taps = distill_step.loss_taps(mimic.defense.loss, nnx.merge(graphdef, params, batch_stats).backbone.tap_names)
  if (record := run.done("mimic_weights")) is None:
    backbone = encoders.backbone_of(graphdef, SimpleNamespace(params=params, batch_stats=batch_stats))
    mi = _mutual_information.layer_mi(backbone, mimic.model, images, taps, block, mesh, config.seed,
                                      config.limits.max_steps)
    weights = _mutual_information.layer_weights(mi, block.base_weight, block.momentum_weight)
    record = run.finish("mimic_weights", {"mi": mi, "layer_weights": dict(zip(taps, map(float, weights)))})
  mimic = derived_config(mimic, {"defense.loss.layer_weights": tuple(record["layer_weights"][t] for t in taps)})
  defended = training.distill_student(run, "mimic", mimic, suspect, student, images, mesh, backdoor)
  return defended, record
