"""Pure, jittable losses for other JAX projects. Imports nothing from jaxpurify's CLI or data code.

Batch axes may be sharded over a mesh axis (`jax.make_mesh` uses explicit sharding): functions that
need every row of a batch gather it themselves with `all_rows`.
"""

from jaxpurify.losses.byol import byol_loss
from jaxpurify.losses.contrastive import moco_infonce, nt_xent
from jaxpurify.losses.core import all_rows, l2_normalize
from jaxpurify.losses.distillation import (
                                            afd,
                                            attention_transfer,
                                            correlation_congruence,
                                            feature_clone,
                                            fitnet,
                                            kd,
                                            similarity_preserving,
)
from jaxpurify.losses.encoder_attacks import (
                                            badencoder_loss,
                                            badencoder_terms,
                                            drupe_loss,
                                            drupe_terms,
                                            init_drupe_costs,
                                            random_projections,
                                            sliced_wasserstein,
                                            update_drupe_costs,
)

__all__ = ["afd", "all_rows", "attention_transfer", "badencoder_loss", "badencoder_terms", "byol_loss",
           "correlation_congruence", "drupe_loss", "drupe_terms", "feature_clone", "fitnet", "init_drupe_costs", "kd",
           "l2_normalize", "moco_infonce", "nt_xent", "random_projections", "similarity_preserving",
           "sliced_wasserstein", "update_drupe_costs"]
