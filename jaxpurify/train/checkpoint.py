"""Thin wrapper over orbax's CheckpointManager: periodic and preemption saves, the last N kept, and restores that
verify what they load: a step folder counts only with orbax's commit marker, and a finished stage restores exactly
the step its done.json records."""

import contextlib
import logging
import os

import jax
import orbax.checkpoint as ocp

from jaxpurify.errors import UserError


def manager(directory: str, *, every: int, keep: int) -> ocp.CheckpointManager:
  options = ocp.CheckpointManagerOptions(max_to_keep=keep, save_interval_steps=every,
                                         enable_async_checkpointing=True, create=True)
  with _quiet():
    return ocp.CheckpointManager(os.path.abspath(directory), options=options)


@contextlib.contextmanager
def _quiet():
  """orbax's own log lines about a damaged file silenced: the UserError that follows says it in one line."""
  logger = logging.getLogger("absl")
  level = logger.level
  logger.setLevel(logging.CRITICAL)
  try:
    yield
  finally:
    logger.setLevel(level)


def restore(mngr: ocp.CheckpointManager, step: int, like):
  """Restores `step` into the structure, shapes and shardings of `like` (a pytree of arrays)."""
  abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, like)
  try:
    with _quiet():
      return mngr.restore(step, args=ocp.args.StandardRestore(abstract))
  except Exception as err:  # orbax raises many types for a damaged or mismatched checkpoint
    where = os.path.join(str(mngr.directory), str(step))
    raise UserError(f"checkpoint {where} is corrupt or does not match this config ({type(err).__name__}: "
                    f"{str(err).splitlines()[0][:200]}); delete that folder to resume from an earlier one, "
                    "or use a new --workdir") from None


COMMIT_MARKER = "commit_success.txt"


def committed(directory: str, step: int) -> bool:
  """Whether step folder `step` of `directory` was written to the end (orbax's commit marker is there)."""
  return os.path.isfile(os.path.join(directory, str(step), COMMIT_MARKER))


def good_steps(directory: str) -> list[int]:
  """The committed steps in `directory`, ascending."""
  if not os.path.isdir(directory):
    return []
  return sorted(int(d) for d in os.listdir(directory) if d.isdigit() and committed(directory, int(d)))


def check_resumable(directory: str, step: int) -> None:
  """UserError when the latest step folder, which a resume would start from, lacks its commit marker."""
  if not committed(directory, step):
    earlier = [s for s in good_steps(directory) if s < step]
    where = f"step {earlier[-1]}" if earlier else "the start"
    raise UserError(f"checkpoint {os.path.join(directory, str(step))} is incomplete (no {COMMIT_MARKER}: its save "
                    f"was cut off); delete that folder and re-run: the stage resumes from {where}")


def load_step(directory: str, step: int, like, stage: str):
  """Step `step` of `directory` (a finished stage's, as its done.json records) restored like `like`.

  Never falls back to another step: a missing, incomplete or unreadable step is a UserError that says how to
  finish the stage again from its last good checkpoint.
  """
  problem = ("is missing" if not os.path.isdir(os.path.join(directory, str(step))) else
             f"is incomplete (no {COMMIT_MARKER})" if not committed(directory, step) else None)
  if problem is None:
    with _quiet():
      mngr = ocp.CheckpointManager(os.path.abspath(directory))
      try:
        return mngr.restore(step, args=ocp.args.StandardRestore(jax.tree.map(ocp.utils.to_shape_dtype_struct, like)))
      except Exception as err:  # orbax raises many types for a damaged or mismatched checkpoint
        problem = f"cannot be read ({type(err).__name__})"
      finally:
        mngr.close()
  earlier = [s for s in good_steps(directory) if s < step]
  stage_dir = os.path.dirname(os.path.abspath(directory))
  raise UserError(f"stage {stage!r} is marked done at step {step}, but its checkpoint {directory}/{step} {problem}; "
                  f"delete {stage_dir}/done.json (and that step folder, if it exists) and re-run: the stage "
                  f"resumes from {f'step {earlier[-1]}' if earlier else 'the start'} and finishes again")
