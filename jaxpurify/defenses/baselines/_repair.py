"""What the model-repair baselines share (FT, FP, NAD, ANP, I-BAU, CLP, RNP; baselines.md 3.3).

- `held_out`: the reserve split into a part a method trains on and a held-out part that chooses its pruning level
  or stopping point (the no-oracle rule: never the test set, never the target), per class, drawn with the seed;
- `accuracy`: a classifier's accuracy on reserve positions;
- `backbone` / `with_backbone` / `prune`: a fine-tuned classifier's encoder as an `Encoder`, and channel masks
  ({layer name: keep bool [C]}, `defenses.tcore.channels`) applied to it;
- `finetune_on_reserve`: a given classifier state trained with cross-entropy on (part of) the reserve, pruned
  channels kept at 0 (stage `<stage>`, resumable).
"""

import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from jaxpurify import augment, evaluation, finetune, stages
from jaxpurify.defenses.baselines.inputs import Inputs
from jaxpurify.defenses.tcore import channels
from jaxpurify.encoders import Encoder


def held_out(labels: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
  """labels int [M] -> (fit, held) sorted int64 positions: round(fraction x class size) of each class held out,
  at least 1 where the class has 2 or more and never all of it."""
  rng, held = np.random.default_rng(seed), []
  for c in np.unique(labels):
    members = np.flatnonzero(labels == c)
    count = min(max(round(fraction * len(members)), 1), len(members) - 1)
    held.append(rng.permutation(members)[:count])
  held = np.sort(np.concatenate(held)) if held else np.zeros(0, np.int64)
  return np.setdiff1d(np.arange(len(labels)), held), held


def batch_size(examples: int, wanted: int, devices: int) -> int:
  """min(wanted, examples) rounded down to a multiple of `devices`; 0 when the examples cannot fill one batch."""
  return min(wanted, examples) // devices * devices


@functools.lru_cache(maxsize=8)
def _logits_fn(graphdef, mean: tuple, std: tuple):
  """One jitted (params, batch_stats, uint8 [B, H, W, 3]) -> logits [B, C] per classifier graph, so that a sweep
  over pruning levels compiles once."""

  @jax.jit
  def logits(params, batch_stats, images):
    model = nnx.merge(graphdef, params, batch_stats)
    return model(augment.normalize(augment.to_float(images), jnp.asarray(mean), jnp.asarray(std)))

  return logits


def accuracy(inputs: Inputs, graphdef, state, positions: np.ndarray) -> float:
  """The classifier's accuracy (a fraction) on the reserve images at `positions` (inference mode)."""
  config = inputs.config
  forward = _logits_fn(graphdef, tuple(config.model.mean), tuple(config.model.std))
  batch = min(config.evaluate.batch_size, -(-len(positions) // jax.device_count()) * jax.device_count())
  logits = evaluation.apply_batched(lambda x: forward(state.params, state.batch_stats, x),
                                    inputs.reserve_images[positions], batch, inputs.mesh)
  return float(np.mean(np.argmax(logits, -1) == inputs.reserve_labels[positions]))


def backbone(graphdef, state) -> Encoder:
  """A classifier's backbone (its encoder) as an Encoder."""
  model = nnx.merge(graphdef, state.params, state.batch_stats)
  return Encoder(*nnx.split(model.backbone, nnx.Param, nnx.BatchStat))


def with_backbone(graphdef, state, encoder: Encoder):
  """`state` with its backbone's params and statistics replaced by `encoder`'s (the head and optimiser kept)."""
  model = nnx.merge(graphdef, state.params, state.batch_stats, copy=True)
  nnx.update(model.backbone, encoder.params, encoder.batch_stats)
  _, params, batch_stats = nnx.split(model, nnx.Param, nnx.BatchStat)
  return state.replace(params=params, batch_stats=batch_stats)


def prune(graphdef, state, masks: dict[str, np.ndarray]):
  """`state` with the backbone channels False in `masks` pruned (their BatchNorm scale and bias set to 0)."""
  return with_backbone(graphdef, state, channels.apply_masks(backbone(graphdef, state), masks))


def finetune_on_reserve(inputs: Inputs, block, run, stage: str, state, positions: np.ndarray | None = None,
                        masks: dict[str, np.ndarray] | None = None):
  """The classifier `state` (of inputs.model's graphdef) trained with cross-entropy on the reserve (or its
  `positions`) for block.epochs with block.optim at batch min(block.batch_size, examples) over the devices, with
  the protocol's augmentation and trainable set; the channels False in `masks` stay 0 -> the final state. `state`
  itself is left intact."""
  config, protocol = inputs.config, inputs.protocol
  positions = np.arange(len(inputs.reserve_labels)) if positions is None else positions
  encoder_mask = None if masks is None else channels.param_mask(backbone(inputs.model[0], state), masks)
  repair = ml_collections.ConfigDict({"optim": block.optim.to_dict(), "train": {
      **config.finetune[protocol].train.to_dict(), "epochs": block.epochs, "log_every": block.log_every,
      "batch_size": batch_size(len(positions), block.batch_size, jax.device_count())}})
  _, fresh, step, dataset, num_steps = finetune.finetune_training(
      config, protocol, inputs.encoder, inputs.reserve_images[positions], inputs.reserve_labels[positions],
      inputs.num_classes, inputs.mesh, encoder_mask=encoder_mask, block=repair)
  # a fresh optimiser on copies of the given weights (the step donates its state; the caller keeps `state`)
  start = fresh.replace(params=jax.tree.map(jnp.copy, state.params),
                        batch_stats=jax.tree.map(jnp.copy, state.batch_stats))
  return stages.trained(run, stage, start, num_steps, lambda: stages.train(
      run, stage, start, step, dataset.batch, repair.train, num_steps, inputs.mesh, config.seed),
                        {"examples": dataset.num_examples})
