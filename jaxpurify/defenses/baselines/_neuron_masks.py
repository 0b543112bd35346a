"""Neuron masks on BatchNorm channels, what ANP and RNP share (baselines.md 3.3).

Both methods give every channel of the classifier's backbone BatchNorms a multiplier (ANP's NoisyBatchNorm2d, RNP's
MaskBatchNorm2d in the official code). Here the multipliers are explicit arrays {layer name: float [C]} over the
layers of `channels.conv_bn_layers` ('stem', 'stage1.block0.conv1', ...), applied to the classifier's params before
`nnx.merge`, so the ResNet code stays as it is: a BatchNorm with scale γ, bias β and multipliers (s, b) computes
(x − μ) / sqrt(σ² + eps) · γ · s + β · b (`scaled`). ANP uses s = m + δ, b = 1 + ξ (mask m, noise δ, ξ); RNP s = m,
b = 1.

The learnt mask values then choose channels to prune: every channel whose value is <= a threshold, the thresholds
0, step, ..., max swept in order (the official `evaluate_by_threshold`), keeping the largest threshold whose accuracy
on the reserve's held-out split stays within `max_acc_drop` (relative) of the unpruned model's. The official code
and BackdoorBench read the test set there; this reads the held-out split. Pruning is `_repair.prune` (BatchNorm scale
and bias set to 0, as CLP and T-Core prune); the official code zeroes the scale alone, leaving the channel at its bias.
"""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx

from jaxpurify import augment, evaluation, parallel
from jaxpurify.defenses.baselines import _repair
from jaxpurify.defenses.baselines.inputs import Inputs
from jaxpurify.defenses.tcore import channels
from jaxpurify.train.state import TrainState, make_optimizer


def bn_paths(graphdef, state) -> dict[str, tuple]:
  """{layer name: the key path of its BatchNorm in the classifier's params} over the backbone's conv+BN layers."""
  return {layer.name: ("backbone",) + layer.bn_path
          for layer in channels.conv_bn_layers(_repair.backbone(graphdef, state))}


def ones(graphdef, state) -> dict[str, np.ndarray]:
  """{layer name: float32 ones [C]}: the multipliers that change nothing (the masks' start)."""
  return {layer.name: np.ones(layer.scale.shape, np.float32)
          for layer in channels.conv_bn_layers(_repair.backbone(graphdef, state))}


def _keys(path) -> tuple:
  return tuple(k.key if isinstance(k, jax.tree_util.DictKey) else k.idx for k in path
               if isinstance(k, (jax.tree_util.DictKey, jax.tree_util.SequenceKey)))


def scaled(params, paths: dict[str, tuple], scale: dict, bias: dict | None = None):
  """A classifier's params (nnx.State) with each layer's BatchNorm scale times scale[layer] [C] and its bias times
  bias[layer] [C] (None: bias unchanged); layers absent from a dict are unchanged. Pure: jit and grad go through."""
  factors = {paths[name] + ("scale",): s for name, s in scale.items()}
  factors |= {paths[name] + ("bias",): b for name, b in (bias or {}).items()}
  return jax.tree_util.tree_map_with_path(lambda path, x: x * factors[_keys(path)] if _keys(path) in factors else x,
                                          params)


def logits(graphdef, params, batch_stats, x: jax.Array) -> jax.Array:
  """The classifier's logits float32 [B, K] of normalised images x [B, H, W, 3] in inference mode: BatchNorm on its
  running statistics, the head without dropout (the papers' ResNets have none).

  The official code learns its masks in training mode (batch statistics). Here the masks are learnt on the model the
  pruning keeps and the evaluation runs: on batch statistics a downstream BatchNorm re-normalises a masked channel
  away, which inference does not (threat-2 BadNets quick, seed 0: the 33 channels ANP drove to 0 that way cost the
  reserve's fit part 44 points of accuracy in inference mode, 4 in training mode)."""
  model = nnx.merge(graphdef, params, batch_stats, copy=True)
  return model(x)


def augmented(key: jax.Array, images: jax.Array, config) -> jax.Array:
  """uint8 images [B, H, W, 3] -> float32 [B, H, W, 3] after the fine-tuning's crop and flip (the official code's
  training transform), normalised with config.model's mean and std."""
  aug = config.finetune.augment
  images = augment.crop_flip(key, images, aug.padding, aug.flip_prob)
  return augment.normalize(augment.to_float(images), jnp.asarray(config.model.mean), jnp.asarray(config.model.std))


def cross_entropy(logits_: jax.Array, labels: jax.Array) -> jax.Array:
  return optax.softmax_cross_entropy_with_integer_labels(logits_, labels).mean()


def mask_optimizer(lr: float) -> optax.GradientTransformation:
  """SGD with momentum 0.9 and no weight decay, the official mask optimiser of ANP and RNP."""
  return make_optimizer(ml_collections.ConfigDict(dict(name="sgd", lr=lr, weight_decay=0.0, momentum=0.9)))


def mask_state(masks: dict[str, np.ndarray], tx, mesh) -> TrainState:
  """A TrainState at step 0 whose params are the masks {layer: float32 [C]}, replicated over `mesh`."""
  def init():
    return TrainState(step=jnp.zeros((), jnp.int32), params=masks, batch_stats={}, opt_state=tx.init(masks))

  return jax.jit(init, out_shardings=parallel.replicated(mesh))()


def clipped(state: TrainState) -> TrainState:
  """The masks clamped to [0, 1] after an update (the official clip_mask)."""
  return state.replace(params=jax.tree.map(lambda m: jnp.clip(m, 0.0, 1.0), state.params))


def train_config(inputs: Inputs, block, batch_size: int) -> ml_collections.ConfigDict:
  """stages.train's settings: the protocol's checkpointing with `batch_size` and block.log_every."""
  train = inputs.config.finetune[inputs.protocol].train
  return ml_collections.ConfigDict({**train.to_dict(), "batch_size": batch_size, "log_every": block.log_every})


def with_model(dataset, model_state: TrainState):
  """-> batch_fn(step): the dataset's batch plus 'model', the classifier's params and statistics (replicated
  arrays on the mesh, passed as an argument rather than baked into the step as constants)."""
  model = {"params": model_state.params, "batch_stats": model_state.batch_stats}
  return lambda step: dataset.batch(step) | {"model": model}


def thresholds(step: float, maximum: float) -> np.ndarray:
  """The pruning thresholds 0, step, 2 step, ..., up to `maximum` inclusive: float64 [T]."""
  return np.round(np.arange(int(np.floor(maximum / step + 1e-9)) + 1) * step, 10)


def prune_masks(values: dict[str, np.ndarray], threshold: float) -> dict[str, np.ndarray]:
  """Mask values {layer: float [C]} -> keep masks {layer: bool [C]}: False where the value is <= threshold."""
  return {name: np.asarray(v) > threshold for name, v in values.items()}


def choose(accuracies, base: float, max_acc_drop: float) -> int | None:
  """Index of the last of `accuracies` (one per threshold, in sweep order) that is >= (1 - max_acc_drop) * base,
  the unpruned accuracy; None when none is."""
  within = [i for i, acc in enumerate(accuracies) if acc >= (1 - max_acc_drop) * base]
  return within[-1] if within else None


def sweep(values: dict[str, np.ndarray], levels: np.ndarray, accuracy_fn, max_acc_drop: float):
  """Prunes by each threshold of `levels`; accuracy_fn(keep masks) -> a held-out accuracy. -> (keep masks of the
  chosen threshold, that threshold or None for no pruning, {'held_out_acc': its accuracy, 'held_out_acc_unpruned':
  the unpruned one, 'sweep': [[threshold, pruned total, accuracy], ...]})."""
  base = accuracy_fn(prune_masks(values, -np.inf))
  tried, last = [], (None, None)
  for level in levels:
    keep = prune_masks(values, float(level))
    pruned = sum(channels.pruned_counts(keep).values())
    acc = last[1] if pruned == last[0] else accuracy_fn(keep)  # nothing new pruned: the same model
    tried.append([float(level), pruned, acc])
    last = (pruned, acc)
  index = choose([acc for _, _, acc in tried], base, max_acc_drop)
  threshold = None if index is None else tried[index][0]
  keep = prune_masks(values, -np.inf if threshold is None else threshold)
  return keep, threshold, {"held_out_acc": base if index is None else tried[index][2], "held_out_acc_unpruned": base,
                           "sweep": tried}


def held_out_accuracy(inputs: Inputs, graphdef, state, paths: dict[str, tuple], positions: np.ndarray):
  """-> accuracy_fn(keep masks {layer: bool [C]}) -> the accuracy of `state` with those channels pruned (scale and
  bias times keep: `_repair.prune`'s model) on the reserve at `positions`, in inference mode; one compile."""
  config, mesh = inputs.config, inputs.mesh
  mean, std = jnp.asarray(config.model.mean), jnp.asarray(config.model.std)

  @jax.jit
  def forward(params, batch_stats, keep, images):
    x = augment.normalize(augment.to_float(images), mean, std)
    return logits(graphdef, scaled(params, paths, keep, keep), batch_stats, x)

  images, labels = inputs.reserve_images[positions], inputs.reserve_labels[positions]

  def accuracy(keep: dict[str, np.ndarray]) -> float:
    multipliers = parallel.put_replicated({k: np.asarray(v, np.float32) for k, v in keep.items()}, mesh)
    out = evaluation.apply_batched(lambda x: forward(state.params, state.batch_stats, multipliers, x), images,
                                   config.evaluate.batch_size, mesh)
    return float(np.mean(np.argmax(out, -1) == labels))

  return accuracy


def prune_by_values(inputs: Inputs, block, values: dict[str, np.ndarray], held: np.ndarray):
  """inputs.model with the channels whose mask value is <= the swept threshold pruned (block.threshold_step,
  max_threshold, max_acc_drop; accuracy on the reserve positions `held`) -> (pruned state, diagnostics {'pruned':
  {layer: count}, 'threshold', 'held_out_acc', 'held_out_acc_unpruned', 'sweep'})."""
  graphdef, state = inputs.model
  accuracy_fn = held_out_accuracy(inputs, graphdef, state, bn_paths(graphdef, state), held)
  keep, threshold, record = sweep(values, thresholds(block.threshold_step, block.max_threshold), accuracy_fn,
                                  block.max_acc_drop)
  return _repair.prune(graphdef, state, keep), {"pruned": channels.pruned_counts(keep), "threshold": threshold,
                                                **record}
