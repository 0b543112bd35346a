"""Dataset-poisoning attacks on downstream (supervised) data (attacks.md section 4).

`triggers`: pure, jittable uint8 trigger transforms (BadNets, Blended, Trojan, WaNet, Adaptive-Blend, SIG).
`selection`: deterministic choice of the poisoned (and WaNet cross / cover) positions.
"""

from jaxpurify.poisoning import selection, triggers
from jaxpurify.poisoning.selection import cross_indices, poison_indices
from jaxpurify.poisoning.triggers import (adaptive_blend, badnets, bicubic_resize_align_corners, blend_pattern,
                                         blended, sig, trojan, trojan_patch, wanet, wanet_grid)

__all__ = [
    "selection", "triggers", "cross_indices", "poison_indices", "adaptive_blend", "badnets",
    "bicubic_resize_align_corners", "blend_pattern", "blended", "sig", "trojan", "trojan_patch", "wanet",
    "wanet_grid",
]
