"""ABL: Anti-Backdoor Learning (Li et al., NeurIPS 2021), in the transfer-learning setting (baselines.md 3.2).

Poisons are learnt faster than clean samples. ABL
1. fine-tunes a fresh classifier (the victim's encoder + a new head, `inputs.protocol`) for `isolation_epochs`
   with the flooding loss |CE - b| + b on each batch's mean CE (BackdoorBench's), which keeps the loss from
   falling below b (stage abl_isolate_<protocol>);
2. isolates the lowest-loss `isolation_fraction` of the victim set under that model (per-sample CE, inference
   mode) as suspected poisons, kept in the isolation stage's folder;
3. continues from that model with plain CE on the rest (stage abl_finetune_<protocol>);
4. unlearns the isolated samples by gradient ascent, minimising -CE, for `unlearn_epochs` with `unlearn_optim`
   (stage abl_unlearn_<protocol>).
Every training phase is `finetune.finetune_training`'s step with its objective of the mean CE (flooding, the CE, its
negation). Phases 1 and 3 use config.finetune[protocol]'s optimiser and batch, phase 3 also its epochs
(BackdoorBench: SGD 0.1 for 60 epochs), so that ABL's classifier trains like the undefended one. Defaults are
BackdoorBench's (config/defense/abl/config.yaml): flooding 0.5, isolation of 1% after 20 epochs, unlearning 20
epochs with SGD 5e-4 (momentum 0.9, weight decay 1e-4). Under FT-head only the head moves, in every phase
(baselines.md section 6, pitfall 5: expect little effect on an encoder backdoor).
"""

import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from jaxpurify import finetune, stages
from jaxpurify.defenses.baselines.inputs import Inputs
from jaxpurify.defenses.tcore.confusion import sample_losses
from jaxpurify.errors import UserError
from jaxpurify.train.state import TrainState

KIND = "training"
CLEAN_DATA = False


def check(block, config, victim_counts: np.ndarray, reserve_counts: np.ndarray) -> None:
  """UserError when the isolation would leave nothing to train on, or isolate less than one unlearning batch over
  the devices (the config's range rules check the rest)."""
  del reserve_counts
  if not block.isolation_fraction < 1:
    raise UserError(f"config.baseline.abl.isolation_fraction must be below 1, got {block.isolation_fraction}; "
                    "fix --config.baseline.abl.isolation_fraction")
  n, devices = int(victim_counts.sum()), jax.device_count()
  count = isolated_count(n, block.isolation_fraction)
  for protocol in config.finetune.protocols:
    if unlearn_batch_size(count, config.finetune[protocol].train.batch_size, devices) == 0:
      raise UserError(f"config.baseline.abl.isolation_fraction={block.isolation_fraction} isolates {count} of {n} "
                      f"samples, fewer than one batch over the {devices} devices; raise it to at least "
                      f"{devices / n:.3g}")


def flooded(loss: jax.Array, level: float) -> jax.Array:
  """Flooding (Ishida et al., 2020) of a scalar mean loss: |loss - level| + level. Its gradient is the loss's
  above `level` and the negated loss's below it (ascent), so the loss hovers at `level`."""
  return jnp.abs(loss - level) + level


def isolated_count(n: int, fraction: float) -> int:
  """How many of n samples the isolation takes: int(fraction * n), BackdoorBench's int(N * ratio)."""
  return int(fraction * n)


def isolate(losses: np.ndarray, fraction: float) -> np.ndarray:
  """The isolated_count lowest of losses float [N] (ties by position) -> sorted int64 indices."""
  order = np.argsort(losses, kind="stable")
  return np.sort(order[:isolated_count(len(losses), fraction)]).astype(np.int64)


def unlearn_batch_size(isolated: int, batch_size: int, devices: int) -> int:
  """The unlearning batch: min(the fine-tuning batch, the isolated count), rounded down to a multiple of
  `devices` so that it splits over the mesh (each shuffled epoch drops the rest); 0 when the isolated set
  cannot fill one batch."""
  return min(batch_size, isolated) // devices * devices


def _train_config(train, **changes) -> ml_collections.ConfigDict:
  """config.finetune[protocol].train with `changes` (a phase's batch, epochs and logging)."""
  return ml_collections.ConfigDict({**train.to_dict(), **changes})


def isolation_phase(inputs: Inputs, block, run):
  """Flooding fine-tuning (stage abl_isolate_<protocol>), then the isolated positions: the lowest per-sample CE
  in inference mode, kept in the stage's folder. -> (graphdef, state, sorted int64 indices)."""
  config, protocol, mesh = inputs.config, inputs.protocol, inputs.mesh
  stage = f"abl_isolate_{protocol}"
  ft = config.finetune[protocol]
  iso = ml_collections.ConfigDict({"optim": ft.optim.to_dict(), "train": _train_config(
      ft.train, epochs=block.isolation_epochs, log_every=block.log_every)})
  graphdef, state, step, dataset, num_steps = finetune.finetune_training(
      config, protocol, inputs.encoder, inputs.images, inputs.labels, inputs.num_classes, mesh, block=iso,
      objective=lambda ce: flooded(ce, block.flooding))
  state = stages.trained(run, stage, state, num_steps, lambda: stages.train(
      run, stage, state, step, dataset.batch, iso.train, num_steps, mesh, config.seed),
                         {"examples": dataset.num_examples})
  path = os.path.join(run.stage_dir(stage), "isolated.npy")
  if os.path.exists(path):
    return graphdef, state, np.load(path)
  losses = sample_losses(finetune.logits(config, graphdef, state, inputs.images, mesh), inputs.labels)
  isolated = isolate(losses, block.isolation_fraction)
  if jax.process_index() == 0:
    np.save(path, isolated)
  return graphdef, state, isolated


def finetune_phase(inputs: Inputs, run, isolation_state: TrainState, rest: np.ndarray) -> TrainState:
  """Plain cross-entropy on the samples `rest` from the isolation model, with config.finetune[protocol]'s
  optimiser (fresh), batch and epochs (stage abl_finetune_<protocol>)."""
  config, protocol, mesh = inputs.config, inputs.protocol, inputs.mesh
  stage = f"abl_finetune_{protocol}"
  _, fresh, step, dataset, num_steps = finetune.finetune_training(
      config, protocol, inputs.encoder, inputs.images[rest], inputs.labels[rest], inputs.num_classes, mesh)
  # the fresh classifier's optimiser state fits the isolation model's weights: its init depends on shapes only
  state = fresh.replace(params=isolation_state.params, batch_stats=isolation_state.batch_stats)
  return stages.trained(run, stage, state, num_steps, lambda: stages.train(
      run, stage, state, step, dataset.batch, config.finetune[protocol].train, num_steps, mesh, config.seed),
                        {"examples": dataset.num_examples})


def unlearn_phase(inputs: Inputs, block, run, state: TrainState, isolated: np.ndarray) -> TrainState:
  """Gradient ascent on the isolated samples (minimising -CE) from `state` with block.unlearn_optim (fresh) for
  block.unlearn_epochs (stage abl_unlearn_<protocol>)."""
  config, protocol, mesh = inputs.config, inputs.protocol, inputs.mesh
  stage = f"abl_unlearn_{protocol}"
  ft_train = config.finetune[protocol].train
  batch_size = unlearn_batch_size(len(isolated), ft_train.batch_size, jax.device_count())
  unlearn = ml_collections.ConfigDict({"optim": block.unlearn_optim.to_dict(), "train": _train_config(
      ft_train, batch_size=batch_size, epochs=block.unlearn_epochs, log_every=block.log_every)})
  _, fresh, step, dataset, num_steps = finetune.finetune_training(
      config, protocol, inputs.encoder, inputs.images[isolated], inputs.labels[isolated], inputs.num_classes, mesh,
      block=unlearn, objective=jnp.negative)
  state = fresh.replace(params=state.params, batch_stats=state.batch_stats)  # as in finetune_phase
  return stages.trained(run, stage, state, num_steps, lambda: stages.train(
      run, stage, state, step, dataset.batch, unlearn.train, num_steps, mesh, config.seed),
                        {"examples": dataset.num_examples})


def train(inputs: Inputs, block, run):
  """ABL on the victim set: isolate, train on the rest, unlearn the isolated -> (graphdef, final state,
  {'isolated': sorted positions of the isolated samples})."""
  n = len(inputs.labels)
  graphdef, state, isolated = isolation_phase(inputs, block, run)
  state = finetune_phase(inputs, run, state, np.setdiff1d(np.arange(n), isolated))
  state = unlearn_phase(inputs, block, run, state, isolated)
  return graphdef, state, {"isolated": isolated.tolist()}
