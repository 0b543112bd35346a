"""End-to-end runs of `main.py` in subprocesses: the quick path, resume after SIGKILL, 1 vs 8 devices.

The quick config is shrunk further here (width 4, 2 epochs, short evaluation) to keep CI fast.
"""

import json
import math
import os
import signal
import subprocess
import sys
import tempfile
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--config.model.width=4", "--config.pretrain.train.epochs=2", "--config.pretrain.train.batch_size=64",
        "--config.pretrain.train.log_every=4", "--config.pretrain.train.checkpoint_every=8",
        "--config.evaluate.mlp.epochs=20", "--config.evaluate.monitors=('knn',)"]
pytestmark = pytest.mark.integration


def main_py(*args, devices=8, env=None, **kwargs):
  env = {**os.environ, "JAX_NUM_CPU_DEVICES": str(devices), "JAX_PLATFORMS": "cpu", **(env or {})}
  return subprocess.Popen([sys.executable, "main.py", *args], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True, **kwargs)


def run_to_end(workdir, devices=8):
  proc = main_py("--config", "configs/simclr.py:quick", "--workdir", workdir, *TINY, devices=devices)
  out, err = proc.communicate(timeout=600)
  assert proc.returncode == 0, err[-3000:]
  return out


def read(workdir, name):
  with open(os.path.join(workdir, name)) as f:
    return json.load(f) if name.endswith(".json") else [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def tmp():
  with tempfile.TemporaryDirectory() as path:
    yield path


@pytest.fixture(scope="module")
def uninterrupted(tmp):
  workdir = os.path.join(tmp, "uninterrupted")
  out = run_to_end(workdir)
  return workdir, out


def test_quick_run_writes_results(uninterrupted):
  workdir, out = uninterrupted
  results = read(workdir, "results.json")
  assert results["experiment"] == "pretrain"
  row = results["evaluations"]["clean/digits"]
  assert set(row) == {"acc", "acc_knn"}
  assert 0.3 < row["acc"] <= 1.0  # well above the 0.1 of chance, even for this tiny run
  assert "| clean/digits |" in out
  metrics = read(workdir, "pretrain/metrics.jsonl")
  assert [m["step"] for m in metrics] == list(range(4, 45, 4))  # 1437 // 64 = 22 steps per epoch
  assert {"loss", "l2_grads", "l2_params", "l2_updates", "images_per_s"} <= set(metrics[-1])
  assert read(workdir, "config.json")["pretrain"]["train"]["epochs"] == 2


def test_rerun_of_a_finished_run_recomputes_nothing(uninterrupted):
  workdir, _ = uninterrupted
  before = os.path.getmtime(os.path.join(workdir, "pretrain", "metrics.jsonl"))
  run_to_end(workdir)
  assert os.path.getmtime(os.path.join(workdir, "pretrain", "metrics.jsonl")) == before


def test_sigkill_after_first_checkpoint_then_rerun_gives_the_same_results(uninterrupted, tmp):
  workdir = os.path.join(tmp, "killed")
  proc = main_py("--config", "configs/simclr.py:quick", "--workdir", workdir, *TINY)
  ckpt = os.path.join(workdir, "pretrain", "ckpt")
  deadline = time.time() + 300
  while not (os.path.isdir(ckpt) and any(d.isdigit() for d in os.listdir(ckpt))):
    assert proc.poll() is None and time.time() < deadline, "no checkpoint appeared"
    time.sleep(0.2)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  assert not os.path.exists(os.path.join(workdir, "results.json"))
  run_to_end(workdir)
  assert read(workdir, "results.json") == read(uninterrupted[0], "results.json")
  resumed, straight = read(workdir, "pretrain/metrics.jsonl"), read(uninterrupted[0], "pretrain/metrics.jsonl")
  assert [m["step"] for m in resumed] == [m["step"] for m in straight]
  assert [m["loss"] for m in resumed] == [m["loss"] for m in straight]


def test_one_device_ends_with_the_same_loss_as_eight(uninterrupted, tmp):
  workdir = os.path.join(tmp, "one_device")
  run_to_end(workdir, devices=1)
  one, eight = read(workdir, "pretrain/metrics.jsonl"), read(uninterrupted[0], "pretrain/metrics.jsonl")
  assert [m["step"] for m in one] == [m["step"] for m in eight]
  # Step by step the sharded and single-device steps agree to float precision (train_test.py). Over a
  # run, Adam turns last-bit differences of near-zero gradients into +-lr updates, so the trajectories
  # drift apart slowly: equal at the first log, within 1% at the end.
  assert abs(one[0]["loss"] - eight[0]["loss"]) <= 1e-4 * abs(eight[0]["loss"])
  assert abs(one[-1]["loss"] - eight[-1]["loss"]) <= 1e-2 * abs(eight[-1]["loss"])


def test_missing_cifar10_fails_fast_with_the_prepare_command(tmp):
  start = time.time()
  proc = main_py("--config", "configs/simclr.py", "--workdir", os.path.join(tmp, "full"),
                 env={"JAXPURIFY_DATA_DIR": os.path.join(tmp, "no_data")})
  _, err = proc.communicate(timeout=120)
  assert proc.returncode == 2
  assert time.time() - start < 60  # seconds of imports, no training
  lines = [line for line in err.splitlines() if line.strip()]
  assert len(lines) == 1 and "Traceback" not in err, err
  assert "python -m jaxpurify.data.prepare cifar10" in lines[0]
  assert not os.path.exists(os.path.join(tmp, "full"))


def test_corrupt_checkpoint_is_one_line(uninterrupted, tmp):
  workdir = os.path.join(tmp, "corrupt")
  subprocess.run(["cp", "-r", uninterrupted[0], workdir], check=True)
  os.remove(os.path.join(workdir, "evaluate", "done.json"))
  ckpt = os.path.join(workdir, "pretrain", "ckpt")
  for step in os.listdir(ckpt):
    for dirpath, _, files in os.walk(os.path.join(ckpt, step)):
      for name in files:
        with open(os.path.join(dirpath, name), "wb") as f:
          f.write(b"garbage")
  proc = main_py("--config", "configs/simclr.py:quick", "--workdir", workdir, *TINY)
  _, err = proc.communicate(timeout=300)
  assert proc.returncode == 2, err[-2000:]
  lines = [line for line in err.splitlines() if line.startswith("error:")]
  assert len(lines) == 1 and "corrupt" in lines[0] and "Traceback" not in err, err[-2000:]


def attack_run(config, workdir, clean_workdir, *extra):
  """A tiny attack run on the encoder that `uninterrupted` pre-trained (no pre-training of its own)."""
  proc = main_py("--config", config, "--workdir", workdir, "--config.model.width=4",
                 f"--config.attack.clean_encoder={clean_workdir}", "--config.evaluate.mlp.epochs=20",
                 "--config.evaluate.monitors=('knn',)", *extra)
  out, err = proc.communicate(timeout=600)
  assert proc.returncode == 0, err[-3000:]
  return read(workdir, "results.json"), out


@pytest.mark.parametrize("mode", ["badencoder", "drupe"])
def test_encoder_attack_on_a_pretrained_encoder(uninterrupted, tmp, mode):
  workdir = os.path.join(tmp, mode)
  results, out = attack_run(f"configs/{mode}.py:quick", workdir, uninterrupted[0],
                            "--config.attack.train.epochs=2", "--config.attack.train.batch_size=128",
                            "--config.attack.train.log_every=5")
  assert results["experiment"] == mode
  clean, poisoned = results["evaluations"]["clean/digits"], results["evaluations"]["poisoned/digits"]
  assert set(clean) == set(poisoned) == {"acc", "asr", "asr_all", "acc_knn", "asr_knn", "asr_all_knn"}
  # The clean row is the pre-training run's encoder, evaluated the same way.
  assert clean["acc"] == read(uninterrupted[0], "results.json")["evaluations"]["clean/digits"]["acc"]
  assert "| poisoned/digits |" in out
  assert not os.path.exists(os.path.join(workdir, "pretrain"))
  metrics = read(workdir, "attack/metrics.jsonl")
  assert {"loss", "l0", "l1", "l2"} <= set(metrics[-1])
  assert metrics[-1]["step"] == 2 * (1437 // 128)


def test_ctrl_poisons_the_target_class_and_pretrains_on_it(uninterrupted, tmp):
  workdir = os.path.join(tmp, "ctrl")
  results, _ = attack_run("configs/ctrl.py:quick", workdir, uninterrupted[0], *TINY[1:5])
  positions = read(workdir, "poison/done.json")["poisoned_positions"]
  assert len(positions) == int(0.05 * 1437)
  assert set(results["evaluations"]) == {"clean/digits", "poisoned/digits"}
  assert os.path.exists(os.path.join(workdir, "pretrain_poisoned", "done.json"))


@pytest.mark.parametrize("method", ["moco", "byol"])
def test_quick_pretraining_with_another_ssl_method(tmp, method):
  workdir = os.path.join(tmp, method)
  proc = main_py("--config", f"configs/{method}.py:quick", "--workdir", workdir, *TINY,
                 "--config.pretrain.train.epochs=1")
  _, err = proc.communicate(timeout=600)
  assert proc.returncode == 0, err[-3000:]
  results = read(workdir, "results.json")
  assert results["experiment"] == "pretrain"
  assert read(workdir, "config.json")["pretrain"]["method"] == method
  assert 0.3 < results["evaluations"]["clean/digits"]["acc"] <= 1.0
  metrics = read(workdir, "pretrain/metrics.jsonl")
  assert [m["step"] for m in metrics] == [4, 8, 12, 16, 20, 22]  # one epoch of 1437 // 64 steps
  assert all(math.isfinite(m["loss"]) for m in metrics)


def test_distillation_defense_end_to_end(uninterrupted, tmp):
  workdir = os.path.join(tmp, "distill")
  tiny_defense = ["--config.attack.train.epochs=1", "--config.defense.teacher.epochs=1",
                  "--config.defense.student.warmup_epochs=1", "--config.defense.ssl.train.epochs=2",
                  "--config.defense.monitor.every_epochs=1", "--config.defense.ssl.head.dim=8"]
  results, out = attack_run("configs/distill.py:quick", workdir, uninterrupted[0], *tiny_defense)
  assert results["experiment"] == "distill"
  assert set(results["evaluations"]) == {"clean/digits", "poisoned/digits", "teacher/digits", "defended/digits"}
  assert all({"acc", "asr", "asr_all"} <= set(row) for row in results["evaluations"].values())
  assert "| defended/digits |" in out
  for stage in ("attack", "teacher", "warmup", "distill", "evaluate"):
    assert os.path.exists(os.path.join(workdir, stage, "done.json")), stage
  steps_per_epoch = int(0.2 * 1437) // 64
  monitor = read(workdir, "distill/monitor.jsonl")
  assert [m["step"] for m in monitor] == [0, steps_per_epoch, 2 * steps_per_epoch]
  assert [m["epoch"] for m in monitor] == [0.0, 1.0, 2.0]
  metrics = read(workdir, "distill/metrics.jsonl")
  assert {"loss", "nt_xent", "at_layer1", "at_layer4"} <= set(metrics[-1])
  with open(os.path.join(workdir, "distill.png"), "rb") as f:
    assert f.read(8) == b"\x89PNG\r\n\x1a\n"
