"""Thin wrapper over orbax's CheckpointManager: periodic and preemption saves, the last N kept."""

import os

import jax
import orbax.checkpoint as ocp

from jaxpurify.errors import UserError


def manager(directory: str, *, every: int, keep: int) -> ocp.CheckpointManager:
  options = ocp.CheckpointManagerOptions(max_to_keep=keep, save_interval_steps=every,
                                         enable_async_checkpointing=True, create=True)
  return ocp.CheckpointManager(os.path.abspath(directory), options=options)


def restore(mngr: ocp.CheckpointManager, step: int, like):
  """Restores `step` into the structure, shapes and shardings of `like` (a pytree of arrays)."""
  abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, like)
  try:
    return mngr.restore(step, args=ocp.args.StandardRestore(abstract))
  except Exception as err:  # orbax raises many types for a damaged or mismatched checkpoint
    where = os.path.join(str(mngr.directory), str(step))
    raise UserError(f"checkpoint {where} is corrupt or does not match this config ({type(err).__name__}: "
                    f"{str(err).splitlines()[0][:200]}); delete that folder to resume from an earlier one, "
                    "or use a new --workdir") from None


def load_latest(directory: str, like):
  """The latest checkpoint in `directory` restored like `like`; UserError when there is none."""
  if not os.path.isdir(directory):
    raise UserError(f"no checkpoint at {directory}; give the path of a finished stage's ckpt folder")
  mngr = ocp.CheckpointManager(os.path.abspath(directory))
  step = mngr.latest_step()
  if step is None:
    raise UserError(f"no checkpoint at {directory}; give the path of a finished stage's ckpt folder")
  state = restore(mngr, step, like)
  mngr.close()
  return state
