"""Pure, jittable losses for other JAX projects. Imports nothing from jaxpurify's CLI or data code.

Batch axes may be sharded over a mesh axis (`jax.make_mesh` uses explicit sharding): functions that
need every row of a batch gather it themselves with `all_rows`.
"""

from jaxpurify.losses.contrastive import nt_xent
from jaxpurify.losses.core import all_rows, l2_normalize

__all__ = ["all_rows", "l2_normalize", "nt_xent"]
