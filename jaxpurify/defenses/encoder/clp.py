"""CLP on the encoder (Zheng et al., ECCV'22; baselines.md 3.3-3.4): data-free pruning of the suspect encoder's
channels before anyone fine-tunes it. In every conv+BN layer, the channels whose UCLC (largest singular value of
the conv kernel times |BN scale / std|) lies above mean + u * std of the layer get BatchNorm scale and bias 0
(`defenses.tcore.channels`, shared with T-Core's filter and the classifier-level CLP). Defaults are
BackdoorBench's (u 3, torch's std, no eps), the same block as the threat harness's CLP."""

from jaxpurify.defenses.baselines import clp as classifier_clp
from jaxpurify.defenses.tcore import channels

CLEAN_DATA = False


def check(block, config) -> None:
  """The classifier-level CLP's checks of u, std_ddof and bn_eps."""
  classifier_clp.check(block, config, None, None)


def purify(run, block, config, suspect, images, mesh, backdoor):
  """-> (the suspect with its high-UCLC channels pruned, {pruned: {layer: count}, u})."""
  del run, config, images, mesh, backdoor
  masks = channels.layer_masks(suspect, block.u, block.std_ddof, block.bn_eps)
  return channels.apply_masks(suspect, masks), {"pruned": channels.pruned_counts(masks), "u": block.u}
