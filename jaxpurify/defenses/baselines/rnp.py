"""RNP: Reconstructive Neuron Pruning (Li et al., ICML 2023; baselines.md 3.3).

Unlearning a backdoored model on clean data destroys its clean features but leaves its backdoor features working;
recovering clean accuracy with channel masks on the unlearned model then leaves the backdoor channels with low masks.
RNP, on `fraction` of the reserve (per class, drawn from the reserve's fit part; BackdoorBench's 1% of the training
data is 0.2 of a 5% reserve):
1. unlearns the undefended classifier by gradient ascent on cross-entropy (`unlearn_optim`) until an epoch's
   accuracy on those images, as the training steps measure it, is <= clean_threshold, at most `unlearn_epochs`
   (stage rnp_unlearn_<protocol>; the stopping point is this clean subset's, as in the official code, never test
   data);
2. learns masks m in [0, 1] on the BatchNorm scales of the unlearned model's backbone (γ·m; `_neuron_masks`) that
   recover its accuracy: SGD (momentum 0.9) at recover_lr on alpha · cross-entropy, masks clipped to [0, 1], for
   `recover_epochs` (stage rnp_recover_<protocol>);
3. prunes the channels whose mask is <= a threshold in the ORIGINAL undefended classifier, the threshold swept from
   0 to max_threshold in threshold_step and chosen on the reserve's held-out split (`_neuron_masks`; BackdoorBench
   keeps the pruning with the lowest test ASR whose test accuracy is within 10%: an oracle not used here).

Defaults: BackdoorBench defense/rnp.py and config/defense/rnp/config.yaml, the official bboylyg/RNP main.py: SGD 0.01
(momentum 0.9, weight decay 5e-4) for at most 20 epochs, clean_threshold 0.2, recovering lr 0.2 for 20 epochs,
alpha 0.2, thresholds up to 0.9 in steps of 0.05, 10% relative accuracy drop, batch 128. The official learning-rate
milestones (x0.1 at epochs 10 and 20) are not kept: the unlearning stopped by epoch 10 on the quick cells. Its clipping
(norm 20) is not either: the official code clips before the backward pass, which leaves the gradient as it is.
Unlearning trains the whole classifier under both protocols (it only serves to find the masks). Both phases run in
inference mode, BatchNorm on its running statistics (`_neuron_masks.logits`; the official code runs model.train()):
masks learnt on batch statistics did not carry over to the pruned classifier (threat-2 BadNets quick, seed 0: pruning
its 10 zero-mask channels left the held-out accuracy at 0.25). Under FT-head RNP prunes the victim's encoder
channels and keeps its head. quick: recover_epochs 500 (the 10-image subset is one batch and an epoch one mask step;
after 20 the recovery's accuracy on the subset was still at chance, from about 300 it is 0.9-1; configs/baseline.py).
"""

import jax
import jax.numpy as jnp
import numpy as np

from jaxpurify import parallel, stages
from jaxpurify.data.device import DeviceDataset
from jaxpurify.defenses.baselines import _neuron_masks, _repair
from jaxpurify.defenses.baselines.inputs import Inputs
from jaxpurify.errors import UserError
from jaxpurify.train.state import TrainState, apply_gradients, make_optimizer

KIND = "training"
CLEAN_DATA = True


def subset(labels: np.ndarray, fit: np.ndarray, fraction: float, seed: int) -> np.ndarray:
  """Reserve labels int [M] and its fit positions -> sorted int64 positions: per class, round(fraction x the class's
  reserve size) (at least 1, at most its fit positions) of its fit positions, drawn with the seed."""
  rng, chosen = np.random.default_rng(seed), []
  for c in np.unique(labels[fit]):
    members = fit[labels[fit] == c]
    count = min(max(round(fraction * int(np.sum(labels == c))), 1), len(members))
    chosen.append(rng.permutation(members)[:count])
  return np.sort(np.concatenate(chosen)).astype(np.int64) if chosen else np.zeros(0, np.int64)


def _positions(labels: np.ndarray, config, block) -> np.ndarray:
  """The reserve positions RNP unlearns and recovers on."""
  fit, _ = _repair.held_out(labels, config.baseline.held_out_fraction, config.seed)
  return subset(labels, fit, block.fraction, config.seed)


def check(block, config, victim_counts: np.ndarray, reserve_counts: np.ndarray) -> None:
  """UserError when RNP's subset is smaller than one batch (the ranges: `validation`'s rules)."""
  del victim_counts
  count, devices = len(_positions(np.repeat(np.arange(len(reserve_counts)), reserve_counts), config, block)), \
      jax.device_count()
  if _repair.batch_size(count, block.batch_size, devices) == 0:
    raise UserError(f"config.baseline.rnp.fraction={block.fraction} gives RNP {count} reserve images, fewer than one "
                    f"batch over the {devices} devices; raise it or config.baseline.clean_fraction")


def make_unlearn_step(graphdef, tx, config):
  """-> step(state, batch, key) -> (state, metrics): one gradient-ascent step on the mean cross-entropy of the batch
  ('image' uint8 [B, H, W, 3], 'label' int32 [B]) over all the classifier's params, in inference mode
  (`_neuron_masks.logits`). metrics: loss (-CE), ce, accuracy (the batch's, before the step), health norms."""

  def step(state: TrainState, batch, key):
    x = _neuron_masks.augmented(jax.random.fold_in(key, state.step), batch["image"], config)

    def loss_fn(params):
      logits = _neuron_masks.logits(graphdef, params, state.batch_stats, x)
      ce = _neuron_masks.cross_entropy(logits, batch["label"])
      return -ce, (ce, logits)

    (loss, (ce, logits)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    state, health = apply_gradients(state, tx, grads, state.batch_stats)
    return state, {"loss": loss, "ce": ce, "accuracy": jnp.mean(jnp.argmax(logits, -1) == batch["label"]), **health}

  return step


def unlearn_extra() -> dict:
  """The unlearning's bookkeeping in state.extra: the current epoch's sum of batch accuracies, the finished epochs,
  the last finished epoch's accuracy, and whether the unlearning has stopped."""
  return {"accuracy_sum": jnp.zeros((), jnp.float32), "epochs": jnp.zeros((), jnp.int32),
          "epoch_accuracy": jnp.ones((), jnp.float32), "stopped": jnp.zeros((), bool)}


def until_unlearned(step_fn, steps_per_epoch: int, clean_threshold: float):
  """step_fn (state, batch, key) -> (state, metrics with the batch's 'accuracy') -> the same step that, once an
  epoch's accuracy (the mean over its equal batches) is <= clean_threshold, stops: later calls return the state
  unchanged (state.step included) and zero metrics. state.extra holds `unlearn_extra`; metrics gain 'stopped'."""

  def train(state, batch, key):
    new, metrics = step_fn(state, batch, key)
    extra = state.extra
    total = jnp.where(state.step % steps_per_epoch == 0, 0.0, extra["accuracy_sum"]) + metrics["accuracy"]
    ends_epoch = (state.step + 1) % steps_per_epoch == 0
    accuracy = jnp.where(ends_epoch, total / steps_per_epoch, extra["epoch_accuracy"])
    stopped = ends_epoch & (accuracy <= clean_threshold)
    extra = {"accuracy_sum": total, "epochs": extra["epochs"] + ends_epoch.astype(jnp.int32),
             "epoch_accuracy": accuracy, "stopped": stopped}
    return new.replace(extra=extra), {**metrics, "stopped": stopped.astype(jnp.float32)}

  def step(state, batch, key):
    _, shapes = jax.eval_shape(train, state, batch, key)

    def skip(state):
      zeros = {k: jnp.zeros(s.shape, s.dtype) for k, s in shapes.items()}
      return state, {**zeros, "stopped": jnp.ones((), jnp.float32)}

    return jax.lax.cond(state.extra["stopped"], skip, lambda state: train(state, batch, key), state)

  return step


def make_recover_step(masked_logits, tx, alpha: float):
  """-> step(state, batch, key) -> (state, metrics): one mask step of RNP's recovery; pure, jit it with the state
  donated. state: a TrainState whose params are the masks {layer: float32 [C]}; masked_logits(masks, batch, key) ->
  the unlearned model's logits [B, K] of the batch under those masks; batch 'label' int32 [B]. Minimises alpha x
  the mean cross-entropy, then clips the masks to [0, 1]. metrics: loss, ce, accuracy, mask_mean, health norms."""

  def step(state: TrainState, batch, key):
    key = jax.random.fold_in(key, state.step)

    def loss_fn(masks):
      logits = masked_logits(masks, batch, key)
      ce = _neuron_masks.cross_entropy(logits, batch["label"])
      return alpha * ce, (ce, logits)

    (loss, (ce, logits)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    state, health = apply_gradients(state, tx, grads, state.batch_stats)
    state = _neuron_masks.clipped(state)
    mask_mean = jnp.mean(jnp.concatenate([m.ravel() for m in jax.tree.leaves(state.params)]))
    accuracy = jnp.mean(jnp.argmax(logits, -1) == batch["label"])
    return state, {"loss": loss, "ce": ce, "accuracy": accuracy, "mask_mean": mask_mean, **health}

  return step


def classifier_masked_logits(graphdef, paths: dict[str, tuple], config):
  """-> masked_logits(masks, batch, key) for `make_recover_step`: the logits [B, K] of the classifier batch['model']
  ({'params', 'batch_stats'}) with its BatchNorm scales times the masks, on the batch's augmented images."""

  def masked_logits(masks, batch, key):
    x = _neuron_masks.augmented(key, batch["image"], config)
    params = _neuron_masks.scaled(batch["model"]["params"], paths, masks)
    return _neuron_masks.logits(graphdef, params, batch["model"]["batch_stats"], x)

  return masked_logits


def _dataset(inputs: Inputs, block, positions: np.ndarray) -> DeviceDataset:
  batch_size = _repair.batch_size(len(positions), block.batch_size, jax.device_count())
  return DeviceDataset({"image": inputs.reserve_images[positions],
                        "label": inputs.reserve_labels[positions].astype(np.int32)}, inputs.mesh, batch_size,
                       inputs.config.seed)


def unlearn(inputs: Inputs, block, run, positions: np.ndarray) -> TrainState:
  """Phase 1 (stage rnp_unlearn_<protocol>): the undefended classifier after gradient ascent on the reserve
  `positions` until an epoch's accuracy is <= block.clean_threshold -> its TrainState (extra: `unlearn_extra`)."""
  config, protocol, mesh = inputs.config, inputs.protocol, inputs.mesh
  stage = f"rnp_unlearn_{protocol}"
  graphdef, model = inputs.model
  dataset = _dataset(inputs, block, positions)
  num_steps = block.unlearn_epochs * dataset.steps_per_epoch
  tx = make_optimizer(block.unlearn_optim, num_steps, dataset.steps_per_epoch)

  def init():
    return TrainState(step=jnp.zeros((), jnp.int32), params=model.params, batch_stats=model.batch_stats,
                      opt_state=tx.init(model.params), extra=unlearn_extra())

  state = jax.jit(init, out_shardings=parallel.replicated(mesh))()
  step = jax.jit(until_unlearned(make_unlearn_step(graphdef, tx, config), dataset.steps_per_epoch,
                                 block.clean_threshold), donate_argnums=0)
  train = _neuron_masks.train_config(inputs, block, dataset.batch_size)
  return stages.trained(run, stage, state, num_steps, lambda: stages.train(
      run, stage, state, step, dataset.batch, train, num_steps, mesh, config.seed), {"examples": dataset.num_examples})


def recover(inputs: Inputs, block, run, positions: np.ndarray, unlearned: TrainState) -> dict[str, np.ndarray]:
  """Phase 2 (stage rnp_recover_<protocol>): masks on the unlearned classifier's BatchNorm scales that recover its
  cross-entropy on the reserve `positions` -> {layer: float32 [C]} in [0, 1]."""
  config, protocol, mesh = inputs.config, inputs.protocol, inputs.mesh
  stage = f"rnp_recover_{protocol}"
  graphdef, model = inputs.model
  paths = _neuron_masks.bn_paths(graphdef, model)
  dataset = _dataset(inputs, block, positions)
  num_steps = block.recover_epochs * dataset.steps_per_epoch
  tx = _neuron_masks.mask_optimizer(block.recover_lr)
  state = _neuron_masks.mask_state(_neuron_masks.ones(graphdef, model), tx, mesh)
  step = jax.jit(make_recover_step(classifier_masked_logits(graphdef, paths, config), tx, block.alpha),
                 donate_argnums=0)
  train = _neuron_masks.train_config(inputs, block, dataset.batch_size)
  state = stages.trained(run, stage, state, num_steps, lambda: stages.train(
      run, stage, state, step, _neuron_masks.with_model(dataset, unlearned), train, num_steps, mesh, config.seed),
                         {"examples": dataset.num_examples})
  return {name: np.asarray(v) for name, v in jax.device_get(state.params).items()}


def train(inputs: Inputs, block, run):
  """RNP on the undefended classifier -> (graphdef, the ORIGINAL classifier with its low-mask channels pruned,
  {'pruned': {layer: count}, 'threshold', 'held_out_acc', 'held_out_acc_unpruned', 'sweep', 'unlearn_epochs',
  'unlearn_acc', 'unlearned'})."""
  config = inputs.config
  _, held = _repair.held_out(inputs.reserve_labels, config.baseline.held_out_fraction, config.seed)
  positions = _positions(inputs.reserve_labels, config, block)
  unlearned = unlearn(inputs, block, run, positions)
  masks = recover(inputs, block, run, positions, unlearned)
  state, diagnostics = _neuron_masks.prune_by_values(inputs, block, masks, held)
  extra = jax.device_get(unlearned.extra)
  return inputs.model[0], state, {**diagnostics, "unlearn_epochs": int(extra["epochs"]),
                                  "unlearn_acc": float(extra["epoch_accuracy"]), "unlearned": bool(extra["stopped"])}
