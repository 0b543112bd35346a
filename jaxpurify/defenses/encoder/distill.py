"""The distillation defense (Han et al.; docs/distillation.md) as one row of the encoder-side comparison: the
config's own recipe (config.defense: by default a fine-tuned teacher, a warmed-up student, attention transfer),
the stages `teacher`, `warmup` and `distill` of configs/distill.py."""

from jaxpurify.defenses.distill import training

CLEAN_DATA = True


def purify(run, block, config, suspect, images, mesh, backdoor):
  """teacher -> student -> distillation on the defender's `images` -> (defended backbone, {})."""
  del block
  return training.purify(run, config, suspect, images, mesh, backdoor)[1], {}
