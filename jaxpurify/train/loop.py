"""The step loop shared by every trainer: resume, log, checkpoint, guard against divergence."""

import signal
import time
from collections.abc import Callable

import jax
import orbax.checkpoint as ocp
from tqdm import tqdm

from jaxpurify import timing
from jaxpurify.errors import UserError
from jaxpurify.train import checkpoint, signals
from jaxpurify.train.metrics import MetricWriter, non_finite, to_python


def run_steps(stage_dir: str, stage: str, state, step_fn: Callable, batch_fn: Callable[[int], dict],
              key: jax.Array, *, num_steps: int, log_every: int, checkpoint_every: int, keep: int,
              images_per_step: int, after_step: Callable[[int, object], None] | None = None):
  """Runs `state = step_fn(state, batch_fn(step), key)` until `state.step == num_steps`.

  Resumes from the latest checkpoint in `stage_dir/ckpt`; writes `stage_dir/metrics.jsonl` every
  `log_every` steps (loss, health metrics, images/s) and, at the end, prints the stage's compile and training
  time; stops with a UserError on a non-finite metric.
  `after_step(done, state)`, if given, runs after every step (e.g. a periodic evaluation). A SIGTERM or SIGINT
  (signals.py) or a preemption notice saves the step just finished and raises errors.Stopped.
  Returns the final state, which is also saved.
  """
  if num_steps < 1:
    raise ValueError(f"stage {stage!r} has {num_steps} steps; the config checks should have refused it")
  mngr = checkpoint.manager(f"{stage_dir}/ckpt", every=checkpoint_every, keep=keep)
  start = mngr.latest_step()
  if start is not None:
    checkpoint.check_resumable(f"{stage_dir}/ckpt", start)
    state = checkpoint.restore(mngr, start, state)
  start = start or 0
  writer = MetricWriter(f"{stage_dir}/metrics.jsonl", resume_step=start)
  bar = tqdm(total=num_steps, initial=start, desc=stage, disable=jax.process_index() != 0,
             dynamic_ncols=True, mininterval=1.0)
  tick = time.perf_counter()
  try:
    with signals.deferred():
      state, compile_s = _loop(mngr, writer, bar, stage, state, step_fn, batch_fn, key, start, num_steps,
                               log_every, images_per_step, after_step)
  finally:
    bar.close()
  if num_steps > start and jax.process_index() == 0:
    train_s = time.perf_counter() - tick - compile_s
    timing.record(stage, compile_s=compile_s, train_s=train_s)
    print(f"{stage}: {num_steps - start} steps, compile {compile_s:.1f} s, train {train_s:.1f} s "
          f"({images_per_step * (num_steps - start) / max(train_s, 1e-9):.0f} images/s)", flush=True)
  if num_steps > start and mngr.latest_step() != num_steps:
    mngr.save(num_steps, args=ocp.args.StandardSave(state), force=True)
  mngr.wait_until_finished()
  mngr.close()
  return state


def _loop(mngr, writer, bar, stage, state, step_fn, batch_fn, key, start, num_steps, log_every, images_per_step,
          after_step):
  """The steps start..num_steps-1 of run_steps; stops after a step on a signal or a preemption notice.
  -> (state, seconds until the first step was dispatched: its trace and compile)."""
  tick, tick_step = time.perf_counter(), start
  compile_s = 0.0
  for step in range(start, num_steps):
    with jax.profiler.StepTraceAnnotation("train_step", step_num=step):
      state, metrics = step_fn(state, batch_fn(step), key)
    if step == start:
      compile_s = time.perf_counter() - tick
    done = step + 1
    if done % log_every == 0 or done == num_steps:
      metrics = to_python(jax.device_get(metrics))
      bad = non_finite(metrics)
      if bad:
        mngr.close()
        raise UserError(f"stage {stage!r}: {', '.join(bad)} became non-finite at step {done}; lower the "
                        "learning rate (config.optim.lr) and re-run, or use a new --workdir")
      now = time.perf_counter()
      metrics["images_per_s"] = images_per_step * (done - tick_step) / max(now - tick, 1e-9)
      tick, tick_step = now, done
      writer.write(done, metrics)
      bar.set_postfix(loss=f"{metrics['loss']:.4f}", img_s=f"{metrics['images_per_s']:.0f}")
      bar.update(done - bar.n)
    if after_step is not None:
      after_step(done, state)
    received = signals.pending()
    mngr.save(done, args=ocp.args.StandardSave(state), force=done == num_steps or received is not None)
    if received is not None or mngr.reached_preemption(done):
      mngr.wait_until_finished()
      mngr.close()
      cause = "a preemption notice" if received is None else signal.Signals(received).name
      raise signals.stopped(f"stopped by {cause}: stage {stage!r} saved step {done} of {num_steps}; re-run the same "
                            "command to resume", received or signal.SIGTERM)
  return state, compile_s
