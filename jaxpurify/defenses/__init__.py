"""Defenses: the distillation defense (its step in `distill`, its stages in `stages`) and T-Core (`tcore`, with
its components `sift`, `confusion`, `channels`). `uclc` is CLP's per-channel Lipschitz bound."""

from jaxpurify.defenses.channels import uclc, uclc_dense

__all__ = ["uclc", "uclc_dense"]
