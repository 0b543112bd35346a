"""What is loaded is verified: a step counts only with orbax's commit marker, a finished stage restores exactly the
step it recorded, and the advice for a damaged checkpoint never falls back to an older step."""

import os
import shutil

import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from jaxpurify.errors import UserError
from jaxpurify.train import checkpoint


@pytest.fixture
def ckpt(tmp_path):
  """A stage's ckpt folder with steps 4 and 8 of {'w': step}."""
  directory = str(tmp_path / "pretrain" / "ckpt")
  mngr = checkpoint.manager(directory, every=1, keep=5)
  for step in (4, 8):
    mngr.save(step, args=ocp.args.StandardSave({"w": jnp.full((3,), float(step))}))
  mngr.wait_until_finished()
  mngr.close()
  return directory


LIKE = {"w": jnp.zeros((3,))}


def test_finished_stage_restores_exactly_its_recorded_step(ckpt):
  assert checkpoint.good_steps(ckpt) == [4, 8]
  np.testing.assert_array_equal(checkpoint.load_step(ckpt, 4, LIKE, "pretrain")["w"], 4.0)
  np.testing.assert_array_equal(checkpoint.load_step(ckpt, 8, LIKE, "pretrain")["w"], 8.0)


def test_missing_recorded_step_is_refused_with_a_fix_that_loses_nothing(ckpt):
  shutil.rmtree(os.path.join(ckpt, "8"))
  with pytest.raises(UserError, match=r"stage 'pretrain' is marked done at step 8, but its checkpoint .*/8 is "
                                       r"missing; delete .*pretrain/done.json .* resumes from step 4"):
    checkpoint.load_step(ckpt, 8, LIKE, "pretrain")


def test_step_without_commit_marker_counts_as_incomplete(ckpt):
  os.remove(os.path.join(ckpt, "8", checkpoint.COMMIT_MARKER))
  assert checkpoint.good_steps(ckpt) == [4]
  with pytest.raises(UserError, match=r"8 is incomplete .*resumes from step 4"):
    checkpoint.load_step(ckpt, 8, LIKE, "pretrain")
  with pytest.raises(UserError, match=r"ckpt/8 is incomplete .*delete that folder and re-run: the stage resumes "
                                       r"from step 4"):
    checkpoint.check_resumable(ckpt, 8)
  checkpoint.check_resumable(ckpt, 4)


def test_unreadable_step_is_refused(ckpt):
  for root, _, files in os.walk(os.path.join(ckpt, "8", "default")):
    for name in files:
      if name != checkpoint.COMMIT_MARKER:
        with open(os.path.join(root, name), "wb") as f:
          f.write(b"\0garbage")
  with pytest.raises(UserError, match=r"8 cannot be read .*resumes from step 4"):
    checkpoint.load_step(ckpt, 8, LIKE, "pretrain")
