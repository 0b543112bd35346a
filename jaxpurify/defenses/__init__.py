"""Defenses, one package each: `distill` (the distillation defense: its step and its teacher, student and
distillation stages) and `tcore` (T-Core: sifting, confusion-training expansion, channel filtering, bootstrapping).
`uclc` and `uclc_dense` are CLP's per-channel Lipschitz bounds."""

from jaxpurify.defenses.tcore.channels import uclc, uclc_dense
from jaxpurify.errors import moved

__all__ = ["uclc", "uclc_dense"]
__getattr__ = moved(__name__, {"channels": "jaxpurify.defenses.tcore.channels",
                               "sift": "jaxpurify.defenses.tcore.sift",
                               "confusion": "jaxpurify.defenses.tcore.confusion",
                               "stages": "jaxpurify.defenses.distill.training"})
