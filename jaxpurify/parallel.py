"""Device mesh and shardings: data parallelism with `jax.jit` over a `Mesh` (no pmap).

The global batch is split along the mesh axis `data`; parameters and optimiser state are replicated.
"""

from collections.abc import Sequence

import jax
import numpy as np

from jaxpurify.errors import UserError

P = jax.P
DATA = "data"


def make_mesh(axes: Sequence[tuple[str, int]] = ((DATA, -1),)) -> jax.sharding.Mesh:
  """A mesh over every device of every process; one axis size may be -1 ("the rest")."""
  names = tuple(name for name, _ in axes)
  sizes = [size for _, size in axes]
  n = jax.device_count()
  known = int(np.prod([s for s in sizes if s != -1]))
  sizes = [n // known if s == -1 else s for s in sizes]
  if int(np.prod(sizes)) != n:
    raise UserError(f"mesh {dict(zip(names, sizes))} does not cover the {n} devices; "
                    "fix config.mesh so that the sizes multiply to the device count (use -1 for one axis)")
  return jax.make_mesh(tuple(sizes), names)


def replicated(mesh: jax.sharding.Mesh) -> jax.NamedSharding:
  return jax.NamedSharding(mesh, P())


def batch_sharded(mesh: jax.sharding.Mesh) -> jax.NamedSharding:
  """Leading (batch) axis split over `data`, the other axes whole."""
  return jax.NamedSharding(mesh, P(DATA))


def check_global_batch(batch_size: int, what: str = "config.batch_size") -> None:
  if batch_size % jax.device_count():
    raise UserError(f"{what}={batch_size} is not divisible by the {jax.device_count()} devices; "
                    f"set it to a multiple of {jax.device_count()}")


def put_replicated(tree, mesh: jax.sharding.Mesh):
  """Host arrays (same on every process) -> arrays replicated over the mesh."""
  return jax.device_put(tree, replicated(mesh))


def put_batch(tree, mesh: jax.sharding.Mesh):
  """Host arrays holding the GLOBAL batch (same on every process) -> arrays sharded along `data`.

  Each process contributes only the rows its devices own, so this works on one host and on many.
  """
  sharding = batch_sharded(mesh)

  def put(x):
    x = np.asarray(x)
    n_proc, idx = jax.process_count(), jax.process_index()
    rows = x.shape[0] // n_proc
    return jax.make_array_from_process_local_data(sharding, x[idx * rows:(idx + 1) * rows], x.shape)

  return jax.tree.map(put, tree)
