"""FP: Fine-Pruning (Liu et al., RAID'18; baselines.md 3.3): prune the feature channels clean data leaves dormant,
where a backdoor can hide, then fine-tune on the defender's clean reserve.

1. Rank: the mean activation of each feature channel on the fit part of the reserve (`_repair.held_out`), read at
   the head's input (the L2-normalised pooled feature, `Inputs.reserve_features`), least active first.
   BackdoorBench's defense/fp.py reads the same point (a hook on the input of the model's last child, the Linear).
2. Prune: levels of k * ceil(prune_step x channels) channels (fewer than all), tried in order on the held-out split;
   the chosen level is the last one before the first whose held-out accuracy drops by more than max_acc_drop
   (relative) below the unpruned model's. BackdoorBench measures that accuracy on the clean TEST set, an oracle
   leak not copied here (and stops on a relative rise too, which this does not).
3. Fine-tune the pruned classifier on the whole reserve (`_repair.finetune_on_reserve`), pruned channels kept at 0.

Realising a pruned feature channel: in a ResNet it is a channel of the last stage's residual stream, the sum of that
stage's projection shortcut and of every block's last conv+BN. Channel k is pruned in all of them (`stream_layers`:
their BatchNorm scale and bias set to 0, `defenses.tcore.channels` masks), so the pooled feature's channel k is
exactly 0, as the dropped neuron is in the paper's plain CNNs; masking the last conv+BN alone would leave the residual
path carrying it. (BackdoorBench's current fp.py masks the Linear's input columns; its older defense/FP/fineprune.py
cut the channel out of every layer4 conv of its ResNet-18, and out of layer4's last conv and residual sum of its
PreAct-ResNet-18.) Being encoder masks, they go through `_repair.prune` and `finetune_on_reserve`: under FT-head the
victim's frozen encoder is pruned and only the head re-trains; under FT-all the whole pruned classifier trains.

Defaults are BackdoorBench's (config/defense/fp/config.yaml): once_prune_ratio 0.01, acc_ratio 0.1, then 100 epochs
of SGD 0.01 (momentum 0.9, weight decay 5e-4, cosine) at batch 256, on 5% clean data (config.baseline.clean_fraction);
the held-out share is config.baseline.held_out_fraction. quick, as FT's: batch 64 (the digits reserve holds 70
images), logs every 20 steps. Stages: fp_prune_<protocol> (the chosen masks and the tried levels, so a resumed run
does not search again), fp_finetune_<protocol>.
"""

import math

import jax
import numpy as np

from jaxpurify.defenses.baselines import _repair
from jaxpurify.defenses.baselines.inputs import Inputs
from jaxpurify.defenses.tcore import channels
from jaxpurify.encoders import Encoder
from jaxpurify.errors import UserError

KIND = "training"
CLEAN_DATA = True
SLACK = 1e-9  # accuracies are ratios k / n: the budget's edge must not hinge on their last bit


def check(block, config, victim_counts: np.ndarray, reserve_counts: np.ndarray) -> None:
  """UserError for a reserve without a held-out split (no class with 2 images) or one smaller than a batch over the
  devices (prune_step's and max_acc_drop's ranges: `validation`'s rules)."""
  del config, victim_counts
  reserve, devices = int(reserve_counts.sum()), jax.device_count()
  if not (reserve_counts >= 2).any():
    raise UserError("FP chooses its pruning on a held-out part of the reserved clean set, which has no class with "
                    "2 images; raise config.baseline.clean_fraction")
  if _repair.batch_size(reserve, block.batch_size, devices) == 0:
    raise UserError(f"FP fine-tunes on the reserved clean set, which holds {reserve} images, fewer than one batch "
                    f"over the {devices} devices; raise config.baseline.clean_fraction")


def pruning_order(features: np.ndarray) -> np.ndarray:
  """features float [N, D] -> the D channels by mean activation over the N rows, least active first (ties: the lower
  index first), int64 [D]."""
  return np.argsort(np.mean(features, axis=0), kind="stable")


def prune_levels(num_channels: int, prune_step: float) -> list[int]:
  """The numbers of channels tried: multiples of ceil(prune_step x num_channels) below num_channels (BackdoorBench's
  step; pruning every channel is never tried)."""
  return list(range(math.ceil(prune_step * num_channels), num_channels, math.ceil(prune_step * num_channels)))


def largest_within_budget(levels, accuracy_at, base: float, max_acc_drop: float) -> tuple[int, float, list]:
  """levels: increasing numbers of pruned channels; accuracy_at(level) -> held-out accuracy; base: the unpruned
  model's -> (the chosen level, its accuracy, [[level, accuracy]] tried). Levels are tried in order up to the first
  whose relative drop (base - accuracy) / base exceeds max_acc_drop; the chosen one is the level before it (0 and
  `base` when the first already does)."""
  chosen, chosen_acc, tried = 0, base, []
  for level in levels:
    acc = accuracy_at(level)
    tried.append([level, acc])
    if base - acc > max_acc_drop * base + SLACK:
      break
    chosen, chosen_acc = level, acc
  return chosen, chosen_acc, tried


def stream_layers(encoder: Encoder) -> list[channels.ConvBN]:
  """The conv+BN layers that write the last ResNet stage's residual stream, whose channels the pooled feature
  averages: each block's last conv and its projection shortcut. ValueError when the stream enters the stage
  without one (an identity shortcut: no BatchNorm there to zero)."""
  layers = [layer for layer in channels.conv_bn_layers(encoder) if layer.bn_path[0] == "stages"]
  last = [layer for layer in layers if layer.bn_path[1] == max(lay.bn_path[1] for lay in layers)]
  writers = []
  for block in sorted({layer.bn_path[2] for layer in last}):
    members = [layer for layer in last if layer.bn_path[2] == block]
    shortcut = [layer for layer in members if "shortcut" in layer.bn_path]
    if not writers and not shortcut:
      raise ValueError("the last stage's first block has no projection shortcut; FP cannot zero a feature channel")
    writers += [[layer for layer in members if "shortcut" not in layer.bn_path][-1]] + shortcut
  return writers


def feature_masks(encoder: Encoder, pruned: np.ndarray) -> dict[str, np.ndarray]:
  """Feature channels int [K] -> channel masks {layer: keep bool [C]} over `stream_layers` that zero them."""
  masks = {}
  for layer in stream_layers(encoder):
    keep = np.ones(layer.scale.shape[0], bool)
    keep[np.asarray(pruned, np.int64)] = False
    masks[layer.name] = keep
  return masks


def choose_pruning(inputs: Inputs, block) -> dict:
  """The pruning search on the undefended classifier -> the stage record: masks {layer: [bool]}, pruned {layer:
  count}, pruned_fraction, held_out_acc (chosen level), held_out_acc_unpruned, tried [[level, accuracy]]."""
  config, (graphdef, undefended) = inputs.config, inputs.model
  fit, held = _repair.held_out(inputs.reserve_labels, config.baseline.held_out_fraction, config.seed)
  order, encoder = pruning_order(inputs.reserve_features[fit]), _repair.backbone(graphdef, undefended)

  def pruned_accuracy(level: int) -> float:
    pruned = _repair.prune(graphdef, undefended, feature_masks(encoder, order[:level]))
    return _repair.accuracy(inputs, graphdef, pruned, held)

  base = _repair.accuracy(inputs, graphdef, undefended, held)
  level, acc, tried = largest_within_budget(prune_levels(len(order), block.prune_step), pruned_accuracy, base,
                                            block.max_acc_drop)
  masks = feature_masks(encoder, order[:level])
  return {"masks": {name: keep.tolist() for name, keep in masks.items()}, "pruned": channels.pruned_counts(masks),
          "pruned_fraction": level / len(order), "held_out_acc": acc, "held_out_acc_unpruned": base, "tried": tried}


def train(inputs: Inputs, block, run):
  """The undefended classifier pruned (stage fp_prune_<protocol>), then fine-tuned on the reserve with the pruned
  channels held at 0 (stage fp_finetune_<protocol>) -> (graphdef, final state, diagnostics: pruned {layer: count},
  pruned_fraction, held_out_acc and held_out_acc_unpruned)."""
  graphdef, undefended = inputs.model
  stage = f"fp_prune_{inputs.protocol}"
  if (record := run.done(stage)) is None:
    record = run.finish(stage, choose_pruning(inputs, block))
  masks = {name: np.asarray(keep, bool) for name, keep in record["masks"].items()}
  state = _repair.finetune_on_reserve(inputs, block, run, f"fp_finetune_{inputs.protocol}",
                                      _repair.prune(graphdef, undefended, masks), masks=masks)
  return graphdef, state, {k: record[k] for k in ("pruned", "pruned_fraction", "held_out_acc",
                                                  "held_out_acc_unpruned")}
