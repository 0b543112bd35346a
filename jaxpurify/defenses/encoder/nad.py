"""NAD on the encoder (Li et al., ICLR'21, without labels): the poisoned encoder is the student, distilled from its
self-supervised fine-tuned copy with attention transfer on the defender's images. This is the distillation
defense with its `poisoned_copy` student (config.defense otherwise as set: teacher, loss, epochs), a named row of
the encoder-side comparison (baselines.md 3.4)."""

from jaxpurify.defenses.distill import training
from jaxpurify.pipeline import derived_config

CLEAN_DATA = True


def purify(run, block, config, suspect, images, mesh, backdoor):
  """fine-tuned teacher -> the suspect as student -> distillation -> (defended backbone, {})."""
  del block
  nad = derived_config(config, {"defense.student.init": "poisoned_copy"})
  return training.purify(run, nad, suspect, images, mesh, backdoor)[1], {}
