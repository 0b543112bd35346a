"""Dataset-poisoning attacks on downstream (supervised) data (attacks.md section 4).

`triggers`: pure, jittable uint8 trigger transforms (BadNets, Blended, Trojan, WaNet, Adaptive-Blend, SIG).
`selection`: deterministic choice of the poisoned (and WaNet cross / cover) positions.
`label_consistent`, `issba`, `input_aware`: the attacks with an auxiliary model (an adversarially trained
classifier, a StegaStamp encoder, a generator and mask network), each trained by jaxpurify.
`attacks`: every attack by name: its config block, checks, the poisoned training set and the test trigger.
"""

from jaxpurify.poisoning import attacks, input_aware, issba, label_consistent, selection, triggers
from jaxpurify.poisoning.attacks import ATTACKS, PoisonedSet
from jaxpurify.poisoning.selection import cross_indices, poison_indices
from jaxpurify.poisoning.triggers import (adaptive_blend, badnets, bicubic_resize_align_corners, blend_pattern,
                                         blended, sig, trojan, trojan_patch, wanet, wanet_grid)

__all__ = [
    "ATTACKS", "PoisonedSet", "attacks", "input_aware", "issba", "label_consistent", "selection", "triggers",
    "cross_indices", "poison_indices", "adaptive_blend", "badnets", "bicubic_resize_align_corners",
    "blend_pattern", "blended", "sig", "trojan", "trojan_patch", "wanet", "wanet_grid",
]
