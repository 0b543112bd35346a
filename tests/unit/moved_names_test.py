"""Names that moved in the restructuring: importing one from its old home raises an ImportError naming the new."""

import importlib

import pytest

MOVED = [
    ("jaxpurify.defenses", "channels", "jaxpurify.defenses.tcore.channels"),
    ("jaxpurify.defenses", "sift", "jaxpurify.defenses.tcore.sift"),
    ("jaxpurify.defenses", "confusion", "jaxpurify.defenses.tcore.confusion"),
    ("jaxpurify.defenses", "stages", "jaxpurify.defenses.distill.training"),
    ("jaxpurify.defenses.distill", "make_step", "jaxpurify.defenses.distill.step.make_step"),
    ("jaxpurify.defenses.tcore", "admit", "jaxpurify.defenses.tcore.bootstrap.admit"),
    ("jaxpurify.defenses.tcore.channels", "classifier_param_mask", "jaxpurify.defenses.tcore.channels.param_mask"),
    ("jaxpurify.defenses.tcore.sift", "DEPTHS", "jaxpurify.defenses.tcore.sift.depths"),
    ("jaxpurify.poisoning", "badnets", "jaxpurify.triggers.badnets"),
    ("jaxpurify.poisoning", "attacks", "jaxpurify.poisoning.registry"),
    ("jaxpurify.triggers", "default_config", "configs/common.py's trigger"),
    ("jaxpurify.finetune", "crop_flip", "jaxpurify.augment.crop_flip"),
    ("jaxpurify.threats", "finetune_training", "jaxpurify.finetune.finetune_training"),
    ("jaxpurify.models", "ARCHS", "jaxpurify.models.ENCODERS"),
]


@pytest.mark.parametrize("module, name, new", MOVED)
def test_a_moved_name_says_where_it_went(module, name, new):
  with pytest.raises(ImportError, match=f"^{module}.{name} moved to {new}"):
    exec(f"from {module} import {name}", {})  # pylint: disable=exec-used
  with pytest.raises(ImportError, match="moved to"):
    getattr(importlib.import_module(module), name)


def test_an_unknown_name_is_still_an_attribute_error():
  with pytest.raises(AttributeError, match="has no attribute 'nothing'"):
    getattr(importlib.import_module("jaxpurify.poisoning"), "nothing")
