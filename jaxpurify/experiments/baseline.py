"""A baseline defense (docs/baselines.md; `jaxpurify.defenses.baselines`) against one threat: the threat's setting
with the defender's clean reserve held out, its undefended rows, then the defense. Rows clean/<protocol>,
poisoned/<protocol>, defended/<protocol>; diagnostics: a filter's removals (count, TPR, FPR against the true poison
positions, which only this evaluator reads), the clean images the defense used, its wall time.

A filter removes its suspects and the undefended row's fine-tuning runs on the rest (stage
`<name>_retrain_<protocol>`); a training defense's own classifier is evaluated. `defense=tcore` runs T-Core on the
same victim set, so that `python -m jaxpurify.compare` holds every defense to one setting.
"""

import json
import os
import time

import jax
import numpy as np

from jaxpurify import finetune, stages, threats
from jaxpurify.defenses import baselines, tcore
from jaxpurify.defenses.baselines import inputs as baseline_inputs
from jaxpurify.errors import UserError
from jaxpurify.evaluation.metrics import removal_rates
from jaxpurify.experiments import tcore as tcore_experiment
from jaxpurify.experiments import threat

TIME_FILE = "defense_time.json"
bench_step = threat.bench_step  # a filter's cost beyond the shared stages is the fine-tuning on what it keeps


def check(config) -> None:
  """The threat's and T-Core's checks (the reserve's split among them), then every method's check of its block:
  the whole config is valid whichever defense runs, so a comparison's cells fail together, before any work."""
  if "baseline" not in config:
    raise UserError("config.baseline is missing; build the config with configs/baseline.py")
  if config.baseline.defense != "tcore":
    baselines.module(config.baseline.defense)
  tcore_experiment.check(config)
  train = stages.load_data(config, config.finetune.dataset, "train")
  kept, reserved = threats.clean_reserve(train.labels, config.baseline.clean_fraction, config.seed)
  victim_counts, reserve_counts = (np.bincount(train.labels[p], minlength=train.num_classes) for p in (kept, reserved))
  for name in baselines.names():
    method = baselines.module(name)
    if hasattr(method, "check"):
      method.check(config.baseline[name], config, victim_counts, reserve_counts)


def run(run, mesh):
  """The setting and undefended rows, then the defense -> (rows with 'defended/<protocol>', diagnostics)."""
  setting = threats.setting(run, mesh)
  rows = threats.undefended_rows(run, setting, mesh)
  name, start = run.config.baseline.defense, time.perf_counter()
  if name == "tcore":
    defended, diagnostics = tcore.defend(run, setting, mesh)
    clean_used = 0
  else:
    defended, diagnostics = defend(run, setting, mesh)
    clean_used = len(setting.reserve.labels) if baselines.module(name).CLEAN_DATA else 0
  diagnostics.update(clean_used=clean_used, defense_seconds=defense_seconds(run, time.perf_counter() - start))
  return rows | defended, diagnostics


def defense_seconds(run, seconds: float) -> float:
  """The defense's wall time, as the run that finished it measured it (a resumed defense: that run's share); a later
  run, which finds everything done, reports the same number."""
  path = os.path.join(run.workdir, TIME_FILE)
  if os.path.exists(path):
    with open(path, encoding="utf-8") as f:
      return json.load(f)["seconds"]
  seconds = round(seconds, 1)
  if jax.process_index() == 0:
    with open(path, "w", encoding="utf-8") as f:
      json.dump({"seconds": seconds}, f)
  return seconds


def defend(run, setting: threats.Setting, mesh) -> tuple[dict, dict]:
  """The method config.baseline.defense, per protocol, on the undefended classifier's features and logits ->
  ({'defended/<protocol>': {acc, asr, asr_all}}, {'removed/<protocol>': {removed, tpr, fpr}}, the latter only for
  a method that removes or isolates samples; 'repair/<protocol>': a training method's other diagnostics). Stage
  `<name>_defended_<protocol>` keeps each protocol's evaluation and removals, so a finished defense is not loaded
  again."""
  config, s = run.config, setting
  rows, diagnostics = {}, {}
  for protocol in config.finetune.protocols:
    stage = f"{config.baseline.defense}_defended_{protocol}"
    if (record := run.done(stage)) is None:
      record = run.finish(stage, _defend_protocol(run, s, protocol, mesh))
    rows[f"defended/{protocol}"] = record["evaluation"]
    if record["removed"] is not None:
      diagnostics[f"removed/{protocol}"] = removal_rates(np.asarray(record["removed"], np.int64), s.poison,
                                                         len(s.victim_labels))
    if record.get("repair"):
      diagnostics[f"repair/{protocol}"] = record["repair"]
  return rows, diagnostics


def _defend_protocol(run, s: threats.Setting, protocol: str, mesh) -> dict:
  """One protocol's defense -> {'evaluation': {acc, asr, asr_all}, 'removed': the removed (a filter) or isolated
  (ABL) positions in the victim set, None for a method that sets no samples apart (FT), and for a training method
  'repair': the rest of its diagnostics (a pruning method's channels pruned per layer, its chosen level)}."""
  config = run.config
  name = config.baseline.defense
  method, block = baselines.module(name), config.baseline[name]
  model = finetune.trained_classifier(run, f"finetune_poisoned_{protocol}", config, protocol, s.encoder,
                                      s.victim_images, s.victim_labels, s.test.num_classes, mesh)
  inputs = baseline_inputs.gather(config, mesh, protocol, s.encoder, s.victim_images, s.victim_labels,
                                  s.test.num_classes, s.reserve.images, s.reserve.labels, model)
  if method.KIND == "filter":
    removed = _suspects(run, f"{name}_detect_{protocol}", method, inputs, block)
    kept = np.setdiff1d(np.arange(len(s.victim_labels)), removed)
    evaluation = finetune.finetune_stage(run, f"{name}_retrain_{protocol}", config, protocol, s.encoder,
                                         s.victim_images[kept], s.victim_labels[kept], s.test, s.trigger, s.target,
                                         mesh)
    return {"evaluation": evaluation, "removed": removed.tolist()}
  graphdef, state, extra = method.train(inputs, block, run)
  evaluation = finetune.evaluate_classifier(config, graphdef, state, s.test, s.trigger, s.target, mesh)
  isolated = extra.pop("isolated", None)
  return {"evaluation": evaluation, "removed": None if isolated is None else np.asarray(isolated, np.int64).tolist(),
          "repair": extra}


def _suspects(run, stage: str, method, inputs, block) -> np.ndarray:
  """The filter's suspects, found once (stage `stage` keeps them) -> sorted int64 positions in the victim set."""
  if (record := run.done(stage)) is not None:
    return np.asarray(record["removed"], np.int64)
  removed = np.unique(np.asarray(method.suspects(inputs, block, run), np.int64))
  run.finish(stage, {"removed": removed.tolist()})
  return removed
