"""An encoder-side defense (docs/baselines.md; `jaxpurify.defenses.encoder`) on the distillation defense's setting:
the clean and the BadEncoder/DRUPE-poisoned encoder (the stages `pretrain` and `attack` that configs/distill.py
runs give them), then the method: a detector judges both encoders, a mitigator cleans the suspect on the defender's
subset (config.defense.clean_fraction of the pre-training set, unlabelled). Rows clean, poisoned and defended
(a mitigator's), evaluated like the distillation defense (frozen encoder: acc, asr, asr_all); diagnostics: each
detection ('detect/clean', 'detect/poisoned': score, flagged), the mitigator's own ('purify'), the clean images
the method read and its wall time.

  python main.py --config configs/baseline.py:defense=mimic,attack=badencoder,quick
  python -m jaxpurify.compare --config configs/distill.py:quick --defenses distill,mimic,ssl_cleanse,clp,nad,decree
"""

import time

from jaxpurify import encoders, stages
from jaxpurify.defenses import encoder as methods
from jaxpurify.defenses.distill import training
from jaxpurify.errors import UserError
from jaxpurify.experiments import baseline, encoder_attack
from jaxpurify.experiments import distill as distill_experiment

bench_step = distill_experiment.bench_step  # the distillation step: distill's, NAD's and MIMIC's trained part


def check(config) -> None:
  """The distillation setting's checks (attack, defender subset, the defense block the distill-based methods read),
  then every method's check of its block: a comparison's cells fail together, before any work."""
  if "baseline" not in config:
    raise UserError("config.baseline is missing; build the config with configs/baseline.py")
  methods.module(config.baseline.defense)
  distill_experiment.check(config)
  for name in methods.names():
    method = methods.module(name)
    if hasattr(method, "check"):
      method.check(config.baseline.get(name), config)


def run(run, mesh):
  """clean and poisoned encoders (or config.defense.suspect_encoder), the method's detections and cleaned encoder ->
  (rows 'clean|poisoned|defended/<dataset>', diagnostics)."""
  config = run.config
  name = config.baseline.defense
  method, block = methods.module(name), config.baseline.get(name)
  backdoor = encoder_attack.backdoor(config)
  rows = {}
  if config.defense.suspect_encoder:
    suspect = encoders.load_backbone(config.defense.suspect_encoder, config.model, mesh, encoders.FINAL_STAGES,
                                     "config.defense.suspect_encoder")
  else:
    rows["clean"] = stages.clean_encoder(run, config, mesh, config.attack.clean_encoder)
    suspect = stages.attack_encoder(run, "attack", config, rows["clean"], mesh)
  rows["poisoned"] = suspect
  images = training.defender_images(config, stages.load_data(config, config.data.name, config.data.split).images)
  evaluations = stages.evaluate_encoders(run, "evaluate_setting", rows, config, mesh, backdoor)
  start, diagnostics = time.perf_counter(), {}
  if hasattr(method, "detect"):
    for row, encoder in rows.items():
      diagnostics[f"detect/{row}"] = method.detect(run, f"{name}_detect_{row}", block, config, encoder, images, mesh)
  if hasattr(method, "purify"):
    defended, diagnostics["purify"] = method.purify(run, block, config, suspect, images, mesh, backdoor)
    evaluations |= stages.evaluate_encoders(run, "evaluate_defended", {"defended": defended}, config, mesh, backdoor)
  diagnostics.update(clean_used=len(images) if method.CLEAN_DATA else 0,
                     defense_seconds=baseline.defense_seconds(run, time.perf_counter() - start))
  return evaluations, diagnostics
