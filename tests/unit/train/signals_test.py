"""SIGTERM and SIGINT: recorded inside a training loop (which saves and stops after the step), acted on at once
elsewhere; and `run_steps` stopped by a signal resumes to the same final state."""

import os
import signal

import jax
import jax.numpy as jnp
import optax
import pytest

from jaxpurify.errors import Stopped
from jaxpurify.train import checkpoint, signals
from jaxpurify.train.loop import run_steps


def test_a_signal_in_a_loop_is_recorded_and_a_second_acts_at_once():
  with signals.installed(), signals.deferred():
    os.kill(os.getpid(), signal.SIGTERM)
    assert signals.pending() == signal.SIGTERM
    with pytest.raises(Stopped) as err:
      os.kill(os.getpid(), signal.SIGTERM)
  assert err.value.status == 143
  assert signals.pending() is None


def test_outside_a_loop_sigterm_stops_and_sigint_interrupts():
  with signals.installed():
    with pytest.raises(Stopped, match="stopped by SIGTERM outside a training step"):
      os.kill(os.getpid(), signal.SIGTERM)
    with pytest.raises(KeyboardInterrupt):
      os.kill(os.getpid(), signal.SIGINT)
  assert signal.getsignal(signal.SIGTERM) is not signals._handle


def sgd_steps(stage_dir, num_steps, kill_at=None):
  """run_steps of SGD on 0.5 ||w - 1||^2 from w = 0; sends SIGTERM to itself during step `kill_at`."""
  tx = optax.sgd(0.1)
  state = {"w": jnp.zeros((2,)), "opt": tx.init(jnp.zeros((2,))), "step": jnp.zeros((), jnp.int32)}

  def step_fn(state, batch, key):
    del batch, key
    if kill_at is not None and int(state["step"]) + 1 == kill_at:
      os.kill(os.getpid(), signal.SIGTERM)
    grads = state["w"] - 1.0
    updates, opt = tx.update(grads, state["opt"])
    return {"w": state["w"] + updates, "opt": opt, "step": state["step"] + 1}, {"loss": jnp.sum(grads ** 2)}

  return run_steps(stage_dir, "toy", state, step_fn, lambda step: {}, jax.random.key(0), num_steps=num_steps,
                   log_every=1, checkpoint_every=100, keep=2, images_per_step=1)


def test_sigterm_mid_stage_saves_that_step_and_the_rerun_ends_where_an_uninterrupted_run_does(tmp_path):
  straight = sgd_steps(str(tmp_path / "straight"), 6)
  with signals.installed(), pytest.raises(Stopped, match=r"stopped by SIGTERM: stage 'toy' saved step 3 of 6"):
    sgd_steps(str(tmp_path / "stopped"), 6, kill_at=3)
  assert checkpoint.good_steps(str(tmp_path / "stopped" / "ckpt"))[-1] == 3
  resumed = sgd_steps(str(tmp_path / "stopped"), 6)
  assert int(resumed["step"]) == 6 and jnp.array_equal(resumed["w"], straight["w"])
