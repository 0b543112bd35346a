"""Triggers: pure, jittable maps of uint8 images [B, H, W, 3] -> uint8 [B, H, W, 3].

`encoder`: the encoder attacks' triggers (BadEncoder's and DRUPE's patches, CTRL's frequency trigger) and
`make_trigger(config.attack.trigger, image_size)`. `dataset`: the dataset attacks' transforms with
BackdoorBench's arithmetic (BadNets, Blended, Trojan, WaNet, Adaptive-Blend, SIG).
"""

from jaxpurify.errors import moved
from jaxpurify.triggers.dataset import (
                                        adaptive_blend,
                                        badnets,
                                        bicubic_resize_align_corners,
                                        blend_pattern,
                                        blended,
                                        sig,
                                        trojan,
                                        trojan_patch,
                                        wanet,
                                        wanet_grid,
)
from jaxpurify.triggers.encoder import (
                                        KINDS,
                                        RGB_TO_YUV,
                                        YUV_TO_RGB,
                                        PatchTrigger,
                                        ctrl_stamp,
                                        load_patch_npz,
                                        make_trigger,
                                        patch_trigger,
                                        stamp,
)

__getattr__ = moved(__name__, {"default_config": "configs/common.py's trigger(kind)"})
__all__ = ["KINDS", "RGB_TO_YUV", "YUV_TO_RGB", "PatchTrigger", "adaptive_blend", "badnets",
           "bicubic_resize_align_corners", "blend_pattern", "blended", "ctrl_stamp", "load_patch_npz",
           "make_trigger", "patch_trigger", "sig", "stamp", "trojan", "trojan_patch", "wanet", "wanet_grid"]
