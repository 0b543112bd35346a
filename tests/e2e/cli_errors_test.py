"""Bad input, damaged files and a busy workdir at the command line (in-process): one `error:` line, exit status 2,
nothing trained before a config error, and the workdir left usable for the corrected command."""

import json
import os
import shutil

import numpy as np
import pytest

from helpers import cli_main, config
from jaxpurify import experiments
from jaxpurify.experiments import pretrain
from jaxpurify.pipeline import LOCK_FILE, claimed
from jaxpurify.train import checkpoint

pytestmark = pytest.mark.integration
TINY = "configs/simclr.py:tiny"


def one_error(status, lines, match):
  assert status == 2 and len(lines) == 1 and lines[0].startswith("error: "), lines
  assert match in lines[0], lines[0]


@pytest.mark.parametrize("argv, match", [
    ((TINY, "--config.pretrain.train.epochs=-1"), "config.pretrain.train.epochs must be an integer of at least 1"),
    ((TINY, "--config.pretrain.train.epochs=0"), "config.pretrain.train.epochs must be an integer of at least 1"),
    (("configs/threat.py:threat=2,attack=badnets,tiny", "--config.finetune.ft_all.train.epochs=0"),
     "config.finetune.ft_all.train.epochs must be"),
    ((TINY, "--config.pretrain.train.batch_size=0"), "config.pretrain.train.batch_size must be an integer of at"),
    ((TINY, "--config.pretrain.train.batch_size=4096"), "config.pretrain.train.batch_size=4096 is larger than the "
                                                        "1437 digits train images"),
    ((TINY, "--config.pretrain.optim.name=foo"), "unknown optimizer 'foo'; set config.pretrain.optim.name"),
    ((TINY, "--config.mesh=(('data', 3),)"), "mesh {'data': 3} does not cover the 8 devices"),
    ((TINY, "--config.evaluate.protocol=foo"), "unknown evaluation protocol 'foo'; set config.evaluate.protocol"),
    (("configs/distill.py:attack=foo,tiny",), "unknown encoder attack 'foo'"),
])
@pytest.mark.parametrize("existing", [False, True], ids=["new", "empty"])
def test_config_errors_stop_before_any_work_and_leave_the_workdir_as_it_was(tmp_path, argv, match, existing):
  workdir = tmp_path / "run"
  if existing:
    workdir.mkdir()
  status, lines, _ = cli_main("--config", *argv, "--workdir", str(workdir))
  one_error(status, lines, match)
  assert os.listdir(workdir) == [] if existing else not workdir.exists()


def test_a_flag_without_value_does_not_swallow_the_next_flag(tmp_path):
  status, lines, _ = cli_main("--config", TINY, "--config.pretrain.train.epochs", "--workdir", str(tmp_path / "w"))
  one_error(status, lines, "--config.pretrain.train.epochs needs a value; write --config.pretrain.train.epochs=")


def test_workdir_that_is_a_file_or_cannot_be_made_is_refused(tmp_path):
  (tmp_path / "file").write_text("mine")
  one_error(*cli_main("--config", TINY, "--workdir", str(tmp_path / "file"))[:2], "is a file")
  assert (tmp_path / "file").read_text() == "mine"
  one_error(*cli_main("--config", TINY, "--workdir", "/proc/jaxpurify/run")[:2], "cannot write workdir")


def test_reference_file_of_non_pixel_values_is_refused_before_training(tmp_path):
  path = str(tmp_path / "ref.npz")
  np.savez(path, x=np.full((1, 32, 32, 3), 2.5, np.float32))
  status, lines, _ = cli_main("--config", "configs/badencoder.py:tiny", f"--config.attack.reference_file={path}",
                              "--workdir", str(tmp_path / "run"))
  one_error(status, lines, "holds float32 values in [2.5, 2.5] that are not pixel values")
  assert not (tmp_path / "run").exists()


def test_a_busy_workdir_is_refused_naming_the_holder_and_a_dead_holder_is_taken_over(tmp_path, clean_run):
  workdir = str(tmp_path / "run")
  with claimed(config("simclr:tiny"), workdir):
    status, lines, _ = cli_main("--config", TINY, "--workdir", workdir)
  one_error(status, lines, f"workdir {workdir} is in use by pid {os.getpid()} on ")
  # A lock file left by a process that died: its lock went with it, so the next run takes over.
  done = str(tmp_path / "done")
  shutil.copytree(clean_run[0], done, symlinks=True)
  with open(os.path.join(done, LOCK_FILE), "w", encoding="utf-8") as f:
    f.write("pid 999999 on elsewhere")
  status, _, out = cli_main("--config", TINY, "--workdir", done)
  assert status == 0 and "| clean/digits |" in out


def test_an_unexpected_exception_is_one_line_and_a_log_and_the_workdir_is_given_back(tmp_path, monkeypatch):
  def broken(run, mesh):
    run.stage_dir("pretrain")  # an empty stage folder: nothing to keep
    raise RuntimeError("boom")

  monkeypatch.setattr(pretrain, "run", broken)
  for existing in (False, True):
    workdir = tmp_path / f"run{existing}"
    if existing:
      workdir.mkdir()
    status, lines, _ = cli_main("--config", TINY, "--workdir", str(workdir))
    assert status == 1 and len(lines) == 1 and lines[0].startswith("error: unexpected RuntimeError: boom (a bug"), lines
    log = lines[0].split("the traceback is in ")[1].split(",")[0]
    with open(log, encoding="utf-8") as f:
      assert "Traceback" in f.read()
    assert os.listdir(workdir) == [] if existing else not workdir.exists()


def test_deleted_final_checkpoint_is_refused_and_the_advice_resumes_to_the_same_result(tmp_path, clean_run):
  workdir = str(tmp_path / "run")
  shutil.copytree(clean_run[0], workdir, symlinks=True)
  ckpt = os.path.join(workdir, "pretrain", "ckpt")
  last, *_ = sorted(checkpoint.good_steps(ckpt), reverse=True)
  shutil.rmtree(os.path.join(ckpt, str(last)))
  status, lines, _ = cli_main("--config", TINY, "--workdir", workdir)
  one_error(status, lines, f"stage 'pretrain' is marked done at step {last}, but its checkpoint")
  assert "delete" in lines[0] and "pretrain/done.json" in lines[0]
  os.remove(os.path.join(workdir, "pretrain", "done.json"))
  status, _, _ = cli_main("--config", TINY, "--workdir", workdir)
  assert status == 0
  with open(os.path.join(workdir, "results.json")) as a, open(os.path.join(clean_run[0], "results.json")) as b:
    assert json.load(a) == json.load(b)


def test_clean_encoder_without_commit_marker_is_refused_before_training(tmp_path, clean_run):
  encoder = str(tmp_path / "clean")
  shutil.copytree(clean_run[0], encoder, symlinks=True)
  ckpt = os.path.join(encoder, "pretrain", "ckpt")
  os.remove(os.path.join(ckpt, str(max(checkpoint.good_steps(ckpt))), checkpoint.COMMIT_MARKER))
  status, lines, _ = cli_main("--config", "configs/badencoder.py:tiny", f"--config.attack.clean_encoder={encoder}",
                              "--workdir", str(tmp_path / "run"))
  one_error(status, lines, "is missing or incomplete (no commit_success.txt)")
  assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("damage", ["truncated", "float_images"])
def test_damaged_poisoned_set_is_refused_in_one_line(tmp_path, clean_run, threat2_run, damage):
  workdir = str(tmp_path / "run")
  shutil.copytree(threat2_run, workdir, symlinks=True)
  path = os.path.join(workdir, "poison", "poisoned_train.npz")
  if damage == "truncated":
    with open(path, "rb") as f:
      data = f.read()
    with open(path, "wb") as f:
      f.write(data[:1000])
  else:
    with np.load(path) as f:
      arrays = dict(f)
    np.savez(path, **arrays | {"images": arrays["images"] / 255.0})
  status, lines, _ = cli_main("--config", "configs/threat.py:threat=2,attack=badnets,tiny", "--workdir", workdir,
                              f"--config.clean_encoder={clean_run[0]}", "--config.finetune.protocols=('ft_all',)")
  one_error(status, lines, "poisoned_train.npz ")
  assert ("cannot be read" if damage == "truncated" else "images are float64") in lines[0]


def test_patch_file_trigger_is_reachable_from_the_command_line(tmp_path):
  t = np.zeros((1, 32, 32, 3))
  t[0, 21:31, 21:31] = 255
  path = str(tmp_path / "trigger.npz")
  np.savez(path, t=t, tm=(t == 0).astype(np.float64))  # tm: 1 where the image is kept
  cfg = config("badencoder:tiny", "attack.trigger.kind=patch_file", f"attack.trigger.path={path}")
  experiments.check(cfg)
  status, lines, _ = cli_main("--config", "configs/badencoder.py:tiny", f"--config.attack.trigger.path={path}",
                              "--workdir", str(tmp_path / "run"))
  one_error(status, lines, "config.attack.trigger.path is set, but config.attack.trigger.kind is 'patch'")
