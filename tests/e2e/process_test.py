"""`python main.py` as a process, where the process boundary is the point: SIGTERM and SIGKILL mid-stage and resume,
the workdir lock, two processes, 1 vs 8 devices, fast failure without data. The uninterrupted reference is the
session's in-process tiny SimCLR run (the two processes' is one process over their 2 devices); the processes inherit
the session's JAX settings and compilation cache."""

import json
import os
import re
import signal
import socket
import time

import pytest

from helpers import main_py

pytestmark = pytest.mark.integration
TINY = "configs/simclr.py:tiny"


def run_to_end(workdir, *overrides, devices=8):
  proc = main_py("--config", TINY, "--workdir", workdir, *overrides, devices=devices)
  out, err = proc.communicate(timeout=600)
  assert proc.returncode == 0, err[-3000:]
  return out


def read(workdir, name):
  with open(os.path.join(workdir, name)) as f:
    return json.load(f) if name.endswith(".json") else [json.loads(line) for line in f]


def wait_for_checkpoint(proc, ckpt, after=0, timeout=300):
  """Waits until `ckpt` holds a step folder beyond `after` (the process still running)."""
  deadline = time.time() + timeout
  while not (os.path.isdir(ckpt) and any(d.isdigit() and int(d) > after for d in os.listdir(ckpt))):
    assert proc.poll() is None and time.time() < deadline, f"no checkpoint after step {after} appeared"
    time.sleep(0.1)


@pytest.mark.extended  # 75-120 s; SIGTERM saving: train/signals_test.py; a busy workdir: cli_errors_test
def test_sigterm_then_sigkill_mid_stage_and_a_second_copy_refused_then_the_rerun_gives_the_same_results(
    clean_run, tmp_path):
  workdir = str(tmp_path / "interrupted")
  ckpt = os.path.join(workdir, "pretrain", "ckpt")
  proc = main_py("--config", TINY, "--workdir", workdir)
  deadline = time.time() + 300
  while not os.path.exists(os.path.join(workdir, "config.json")):
    assert proc.poll() is None and time.time() < deadline, "the run did not claim its workdir"
    time.sleep(0.1)
  second = main_py("--config", TINY, "--workdir", workdir)
  _, err = second.communicate(timeout=120)
  assert second.returncode == 2 and f"is in use by pid {proc.pid} on " in err, err
  # SIGTERM after the first checkpoint: the step in progress is saved, one line, exit 143.
  wait_for_checkpoint(proc, ckpt)
  proc.send_signal(signal.SIGTERM)
  _, err = proc.communicate(timeout=120)
  assert proc.returncode == 143, err[-2000:]
  saved = re.search(r"stopped by SIGTERM: stage 'pretrain' saved step (\d+) of 44", err)
  assert saved and "Traceback" not in err, err[-2000:]
  # SIGKILL of the resumed run after its next checkpoint: nothing is saved, the last checkpoint stays.
  proc = main_py("--config", TINY, "--workdir", workdir)
  wait_for_checkpoint(proc, ckpt, after=int(saved.group(1)))
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  assert not os.path.exists(os.path.join(workdir, "results.json"))
  out = run_to_end(workdir)
  assert "| clean/digits |" in out
  assert read(workdir, "results.json") == read(clean_run[0], "results.json")
  resumed, straight = read(workdir, "pretrain/metrics.jsonl"), read(clean_run[0], "pretrain/metrics.jsonl")
  assert [m["step"] for m in resumed] == [m["step"] for m in straight]
  assert [m["loss"] for m in resumed] == [m["loss"] for m in straight]


@pytest.mark.extended  # 26-32 s; every step's sharded-vs-single-device unit test runs by default
def test_one_device_ends_with_the_same_loss_as_eight(clean_run, tmp_path):
  workdir = str(tmp_path / "one_device")
  run_to_end(workdir, "--config.pretrain.train.epochs=1", "--config.evaluate.monitors=()",
             "--config.evaluate.mlp.epochs=1", devices=1)  # losses only: the session run's first 22 steps
  one = read(workdir, "pretrain/metrics.jsonl")
  eight = {m["step"]: m["loss"] for m in read(clean_run[0], "pretrain/metrics.jsonl")}
  assert [m["step"] for m in one] == [4, 8, 12, 16, 20, 22]
  # Step by step the sharded and single-device steps agree to float precision (train_test.py). Over a
  # run, Adam turns last-bit differences of near-zero gradients into +-lr updates, so the trajectories
  # drift apart slowly: equal at the first log, within 1% sixteen steps later.
  assert abs(one[0]["loss"] - eight[4]) <= 1e-4 * abs(eight[4])
  assert abs(one[-2]["loss"] - eight[20]) <= 1e-2 * abs(eight[20])


# 8 steps (the tiny run's first 8), a checkpoint every 4, and kNN's evaluation (no head to train).
SHORT = ("--config.limits.max_steps=8", "--config.pretrain.train.checkpoint_every=4", "--config.evaluate.monitors=()",
         "--config.evaluate.protocol=knn")


def two_processes(workdir):
  """Two `main.py --distributed` processes on localhost, one CPU device each, with the standard JAX variables (one
  device a process: with 4 each, 8 gloo ranks exchange every step's collectives, 1.5-3x slower on 2 cores)."""
  with socket.socket() as probe:
    probe.bind(("localhost", 0))
    port = probe.getsockname()[1]
  env = {"JAX_COORDINATOR_ADDRESS": f"localhost:{port}", "JAX_NUM_PROCESSES": "2"}
  return [main_py("--config", TINY, "--workdir", workdir, "--distributed", *SHORT, devices=1,
                  env=env | {"JAX_PROCESS_ID": str(i)}) for i in range(2)]


@pytest.fixture
def reaped():
  """A list for the processes a test starts: those still running at its end, passed or failed, are killed."""
  procs = []
  yield procs
  for proc in procs:
    if proc.poll() is None:
      proc.kill()
      proc.communicate()


def killed(procs) -> list[str]:
  """Kills the processes still running -> each one's last 2,000 characters of stderr (a failure's message)."""
  for proc in procs:
    if proc.poll() is None:
      proc.kill()
  return [proc.communicate()[1][-2000:] for proc in procs]


def test_two_processes_run_one_experiment_resume_after_both_are_killed_and_match_one_process(tmp_path, reaped):
  workdir, reference = str(tmp_path / "two"), str(tmp_path / "one")
  # One process over the same 2 devices, beside the two (it fills their waits on each other).
  one_process = main_py("--config", TINY, "--workdir", reference, *SHORT, devices=2)
  procs = two_processes(workdir)
  reaped.extend([one_process, *procs])
  ckpt = os.path.join(workdir, "pretrain", "ckpt")
  deadline = time.time() + 300
  while not (os.path.isdir(ckpt) and any(d.isdigit() for d in os.listdir(ckpt))):
    if not (all(p.poll() is None for p in procs) and time.time() < deadline):
      pytest.fail(f"no checkpoint from the two processes: {killed(procs)}")
    time.sleep(0.1)
  killed(procs)
  procs = two_processes(workdir)
  reaped.extend(procs)
  outs = [proc.communicate(timeout=600) for proc in procs]
  assert [proc.returncode for proc in procs] == [0, 0], [err[-2000:] for _, err in outs]
  assert "| clean/digits |" in outs[0][0] and "| clean/digits |" not in outs[1][0]  # process 0 reports
  _, err = one_process.communicate(timeout=600)
  assert one_process.returncode == 0, err[-3000:]
  two, one = read(workdir, "pretrain/metrics.jsonl"), read(reference, "pretrain/metrics.jsonl")
  assert [m["step"] for m in two] == [m["step"] for m in one] == [4, 8]  # resumed, each step logged once
  # The cross-process (gloo) sums run in another order than one process's: equal at the first log to float
  # precision, then Adam's drift as in the 1-vs-8 test above.
  assert abs(two[0]["loss"] - one[0]["loss"]) <= 1e-4 * abs(one[0]["loss"])
  assert abs(two[1]["loss"] - one[1]["loss"]) <= 1e-2 * abs(one[1]["loss"])
  assert read(workdir, "results.json")["evaluations"].keys() == {"clean/digits"}
  steps = sorted(int(d) for d in os.listdir(ckpt) if d.isdigit())
  assert steps[-1] == 8 and all(
      os.path.exists(os.path.join(ckpt, str(s), "commit_success.txt")) for s in steps)


def test_missing_cifar10_fails_fast_with_the_prepare_command(tmp_path):
  start = time.time()
  proc = main_py("--config", "configs/simclr.py", "--workdir", str(tmp_path / "full"),
                 env={"JAXPURIFY_DATA_DIR": str(tmp_path / "no_data")})
  _, err = proc.communicate(timeout=120)
  assert proc.returncode == 2
  assert time.time() - start < 60  # seconds of imports, no training
  lines = [line for line in err.splitlines() if line.strip()]
  assert len(lines) == 1 and "Traceback" not in err, err
  assert "python -m jaxpurify.data.prepare cifar10" in lines[0]
  assert not os.path.exists(tmp_path / "full")
