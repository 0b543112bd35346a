"""Dataset-poisoning attacks on downstream (supervised) data (attacks.md section 4).

`defaults`: the attacks by name and their config blocks (no JAX). `registry`: every attack by name: its checks,
the poisoned training set (`poison` -> `PoisonedSet`), the test trigger, save/load of the artefact.
`selection`: deterministic choice of the poisoned (and WaNet cross / cover) positions. `label_consistent`,
`issba`, `input_aware`: the attacks with an auxiliary model (an adversarially trained classifier, a StegaStamp
encoder, a generator and mask network), each trained by jaxpurify. The trigger transforms are in
`jaxpurify.triggers.dataset`.
"""

from jaxpurify.errors import moved
from jaxpurify.poisoning.selection import cross_indices, poison_indices

__all__ = ["cross_indices", "poison_indices"]
__getattr__ = moved(__name__, {
    **{name: f"jaxpurify.triggers.{name}" for name in (
        "adaptive_blend", "badnets", "bicubic_resize_align_corners", "blend_pattern", "blended", "sig", "trojan",
        "trojan_patch", "wanet", "wanet_grid")},
    "triggers": "jaxpurify.triggers.dataset", "attacks": "jaxpurify.poisoning.registry",
    "ATTACKS": "jaxpurify.poisoning.defaults.ATTACKS", "PoisonedSet": "jaxpurify.poisoning.registry.PoisonedSet"})
