"""T-Core's progressive bootstrapping (tcore.md sections 4.4 and 5.4; a reconstruction): a model trained on the
trusted core, grown stage by stage with the samples it predicts confidently as their own label."""

import functools

import numpy as np

from jaxpurify import finetune, stages
from jaxpurify.encoders import Encoder
from jaxpurify.evaluation.metrics import poison_counts
from jaxpurify.threats import Setting


def bootstrap(run, config, protocol: str, encoder: Encoder, encoder_mask, images, labels, seeds: np.ndarray,
              trusted: np.ndarray, suspected: np.ndarray, setting: Setting, mesh):
  """Progressive bootstrapping with `protocol`: train on the seeds the expansion kept trusted, then per stage
  admit, per class, samples the current model predicts as their label with confidence >= conf_threshold (most
  confident first) up to the schedule's fraction of the class, and train on. The pool widens: stage 1 admits
  from the expanded trusted set, middle stages from every sample outside the suspected set, the last stage
  from every sample. Skipped ('boot'): one training on the trusted set.
  -> (evaluation of the final model, per stage the core's size and poison count)."""
  b, num_classes = config.tcore.boot, setting.test.num_classes
  schedule = () if "boot" in config.tcore.skip else tuple(b.schedule)
  core = trusted if "boot" in config.tcore.skip else np.intersect1d(seeds, trusted)
  outside = np.setdiff1d(np.arange(len(labels)), suspected)
  block = config.finetune[protocol].copy_and_resolve_references()
  history, graphdef, state = [], None, None
  for k in range(len(schedule) + 1):
    if k:
      pool = trusted if k == 1 else outside if k < len(schedule) else np.arange(len(labels))
      core = admit(finetune.logits(config, graphdef, state, images, mesh), labels, core, pool, schedule[k - 1],
                   b.conf_threshold)
    history.append(poison_counts(core, setting.poison))
    block.train.epochs = max(1, -(-b.steps_per_stage * block.train.batch_size // len(core)))
    graphdef, fresh, step, dataset, num_steps = finetune.finetune_training(
        config, protocol, encoder, images[core], labels[core], num_classes, mesh, encoder_mask, block=block)
    if state is not None:  # warm start from the previous stage's model
      fresh = fresh.replace(params=state.params, batch_stats=state.batch_stats)
    stage = f"boot{k}_{protocol}"
    state = stages.trained(run, stage, fresh, num_steps, functools.partial(
        stages.train, run, stage, fresh, step, dataset.batch, block.train, num_steps, mesh, config.seed + k),
                           {"core": len(core)})
  evaluation = finetune.evaluate_classifier(config, graphdef, state, setting.test, setting.trigger, setting.target,
                                            mesh)
  return evaluation, history


def admit(logits: np.ndarray, labels: np.ndarray, core: np.ndarray, pool: np.ndarray, fraction: float,
          conf_threshold: float) -> np.ndarray:
  """The core grown per class to `fraction` of the class with samples of `pool` predicted as their label with
  softmax confidence >= conf_threshold, most confident first; logits [N, C] -> sorted indices."""
  probs = np.exp(logits - logits.max(1, keepdims=True))
  probs /= probs.sum(1, keepdims=True)
  confidence = probs[np.arange(len(labels)), labels]
  eligible = np.zeros(len(labels), bool)
  eligible[pool] = True
  eligible &= (np.argmax(logits, 1) == labels) & (confidence >= conf_threshold)
  in_core = np.zeros(len(labels), bool)
  in_core[core] = True
  grown = set(core.tolist())
  for c in np.unique(labels):
    members = np.where(labels == c)[0]
    room = int(fraction * len(members)) - int(in_core[members].sum())
    candidates = members[eligible[members] & ~in_core[members]]
    candidates = candidates[np.argsort(-confidence[candidates], kind="stable")]
    grown.update(candidates[:max(room, 0)].tolist())
  return np.array(sorted(grown), dtype=np.int64)
