"""The distillation defense (Han et al.): `step` (the jitted distillation step and its loss switches) and `training`
(the defender's clean subset, the teacher, the student's starting point and the distillation, as stages)."""

from jaxpurify.errors import moved

__getattr__ = moved(__name__, {name: f"jaxpurify.defenses.distill.step.{name}"
                               for name in ("make_step", "SWITCHES", "Switch", "loss_weights")})
