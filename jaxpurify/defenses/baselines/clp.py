"""CLP: Channel Lipschitzness-based Pruning (Zheng et al., ECCV'22; baselines.md 3.3), data-free: a backdoor channel
reacts strongly to a small trigger, so its upper bound of the channel Lipschitz constant (UCLC: the largest singular
value of its conv kernel times |BN scale / std|) stands out in its layer. In every conv+BN layer, the channels above
mean + u * std of the layer's UCLCs get BatchNorm scale and bias 0 (`defenses.tcore.channels`, which T-Core's
channel filter shares). No data, no training: the pruned classifier is returned as it is.

It prunes the undefended classifier's backbone (`_repair.backbone`): under FT-head that is the victim's encoder, which
the head was trained on frozen (CLP as encoder purification before freezing); under FT-all the whole fine-tuned
classifier's conv+BN layers. The MLP head stays as trained: CLP's code prunes conv+BN channels only, its u was set
for UCLCs, and the head's Dense layers have no BatchNorm, so their score (`uclc_dense`, a weight norm) is another
statistic that neither the paper nor BackdoorBench thresholds; its last layer's outputs are the classes.

Defaults are BackdoorBench's (config/defense/clp/config.yaml with defense/clp.py's CLP_prune): u 3, torch's std
(ddof 1), no eps in the BN factor. quick uses them too (seconds of work). Deterministic: the masks are a function of
the weights alone.
"""

import math

import numpy as np

from jaxpurify.defenses.baselines import _repair
from jaxpurify.defenses.baselines.inputs import Inputs
from jaxpurify.defenses.tcore import channels
from jaxpurify.errors import UserError

KIND = "training"
CLEAN_DATA = False


def check(block, config, victim_counts: np.ndarray, reserve_counts: np.ndarray) -> None:
  """UserError for u below 0 (or NaN; inf prunes nothing), std_ddof other than 0 or 1, or bn_eps below 0."""
  del config, victim_counts, reserve_counts
  if math.isnan(block.u) or block.u < 0:
    raise UserError(f"config.baseline.clp.u is {block.u}; set it to 0 or more (channels above mean + u * std of "
                    "their layer's UCLCs are pruned; inf prunes none)")
  if block.std_ddof not in (0, 1):
    raise UserError(f"config.baseline.clp.std_ddof is {block.std_ddof}; set it to 1 (torch's std, CLP's code) or 0")
  if block.bn_eps < 0:
    raise UserError(f"config.baseline.clp.bn_eps is {block.bn_eps}; set it to 0 (CLP's code) or more")


def train(inputs: Inputs, block, run):
  """The undefended classifier with CLP's channels of its backbone pruned -> (graphdef, state, diagnostics: pruned
  {layer: count} over every conv+BN layer, u)."""
  del run  # nothing to train or keep: the masks take seconds and follow from the weights
  graphdef, undefended = inputs.model
  masks = channels.layer_masks(_repair.backbone(graphdef, undefended), block.u, block.std_ddof, block.bn_eps)
  return graphdef, _repair.prune(graphdef, undefended, masks), {"pruned": channels.pruned_counts(masks),
                                                                "u": block.u}
