"""Config language, overrides and workdir identity: every bad input is one line and exit status 2."""

import contextlib
import io
import json
import os
import subprocess
import sys
import tempfile

import jax
from absl.testing import absltest

from configs import common, simclr, tcore
from helpers import ROOT
from helpers import config as load_config
from jaxpurify import cli
from jaxpurify.errors import UserError
from jaxpurify.pipeline import Run, results_table


class ParseArgTest(absltest.TestCase):

  def test_flags_values_and_types(self):
    arg = common.parse_arg("quick,n=3,name=svhn", quick=False, n=1, name="cifar10")
    self.assertEqual((arg.quick, arg.n, arg.name), (True, 3, "svhn"))
    self.assertEqual(common.parse_arg("svhn", name="cifar10").name, "svhn")  # bare value fills the first key

  def test_unknown_key_and_bad_type(self):
    with self.assertRaisesRegex(ValueError, "unknown config argument 'fast'"):
      common.parse_arg("fast", quick=False)
    with self.assertRaisesRegex(ValueError, "not a int"):
      common.parse_arg("n=x", n=1)


class CliTest(absltest.TestCase):

  def error_of(self, argv):
    """Runs cli.main in-process; returns (exit status, stderr lines)."""
    with _Capture() as cap:
      status = cli.main(argv)
    return status, cap.lines

  def test_overrides_are_typed_and_checked(self):
    args = cli.parse_argv(["--config", "configs/simclr.py:quick", "--config.pretrain.optim.lr=0.1",
                           "--config.pretrain.train.epochs", "3", "--config.evaluate.monitors=('knn',)",
                           "--config.data.name=gtsrb", "--config.model.width=16", "--workdir", "w"])
    self.assertEqual((args.config, args.arg, args.workdir, args.distributed),
                     ("configs/simclr.py", "quick", "w", False))
    config = cli.load_config(args.config, args.arg, args.overrides)
    self.assertEqual((config.pretrain.optim.lr, config.pretrain.train.epochs, config.evaluate.monitors,
                      config.data.name, config.model.width), (0.1, 3, ("knn",), "gtsrb", 16))
    self.assertEqual(cli.load_config("configs/simclr.py", "quick", ["--config.pretrain.optim.lr=1"]).pretrain.optim.lr,
                     1.0)  # an int where a float is expected
    with self.assertRaisesRegex(UserError, "^unknown config key 'pretrain.optim.lr_rate'; keys under "
                                "pretrain.optim: lr, momentum, name, schedule, warmup_epochs, weight_decay$"):
      cli.load_config("configs/simclr.py", "quick", ["--config.pretrain.optim.lr_rate=0.1"])
    with self.assertRaisesRegex(UserError, "^unknown config key 'pretrain.optim.lr.x'; pretrain.optim.lr is a value"):
      cli.load_config("configs/simclr.py", "quick", ["--config.pretrain.optim.lr.x=0.1"])
    with self.assertRaisesRegex(UserError, "^--config.pretrain.train.epochs='ten': .*; fix the value's type$"):
      cli.load_config("configs/simclr.py", "quick", ["--config.pretrain.train.epochs='ten'"])
    with self.assertRaisesRegex(UserError, "^--config.pretrain.train.epochs=2.5: .*; fix the value's type$"):
      cli.load_config("configs/simclr.py", "quick", ["--config.pretrain.train.epochs=2.5"])

  def test_loading_a_config_imports_no_jax(self):
    code = ("import sys; from jaxpurify import cli; c = cli.load_config('configs/tcore.py', "
            "'threat=3,attack=blended,quick', ['--config.seed=3']); assert c.seed == 3; "
            "print(sorted(m for m in sys.modules if m == 'jax' or m.startswith(('jax.', 'jaxlib', 'flax'))))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    self.assertEqual(out.stdout.strip(), "[]", out.stderr)

  def test_config_is_locked(self):
    config = cli.load_config("configs/simclr.py", None)
    with self.assertRaises(AttributeError):
      config.new_field = 1

  def test_bad_inputs_print_one_line_and_exit_2(self):
    cases = {
        ("--config", "configs/nope.py"): "does not exist",
        ("--config", "configs/simclr.py:fast"): "unknown config argument",
        ("--config", "configs/simclr.py:quick", "--config.pretrain.train.epochs=x"): "fix the value's type",
        ("--config", "configs/simclr.py:quick", "--config.data.name=mnist"): "unknown data set",
        ("--config", "configs/simclr.py:quick", "--config.model.name=vgg"): "unknown model",
        ("--config", "configs/simclr.py:quick", "--bogus"): "unknown argument",
        (): "--config is required",
    }
    for argv, message in cases.items():
      status, lines = self.error_of(list(argv))
      self.assertEqual(status, 2, argv)
      self.assertLen(lines, 1, argv)
      self.assertIn(message, lines[0].lower() if message.islower() else lines[0], argv)

  def test_help_prints_the_usage_and_the_configs(self):
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
      self.assertEqual(cli.main(["--help"]), 0)
    self.assertTrue(out.getvalue().startswith("usage: python main.py --config"))
    self.assertIn("configs/distill.py", out.getvalue())
    self.assertNotIn("configs/common.py", out.getvalue())  # it defines no get_config

  def test_default_workdir(self):
    self.assertEqual(cli.default_workdir("configs/simclr.py", None), os.path.join("runs", "simclr"))
    self.assertEqual(cli.default_workdir("configs/simclr.py", "quick,n=2"), os.path.join("runs", "simclr-quick-n=2"))


class _Capture:
  """Collects what is printed to stderr."""

  def __enter__(self):
    self._old, self._buf = sys.stderr, io.StringIO()
    sys.stderr = self._buf
    return self

  def __exit__(self, *exc):
    sys.stderr = self._old
    self.lines = [line for line in self._buf.getvalue().splitlines() if line.strip()]


class WorkdirTest(absltest.TestCase):

  def tempdir(self) -> str:
    tmp = tempfile.TemporaryDirectory()
    self.addCleanup(tmp.cleanup)
    return tmp.name

  def test_workdir_of_another_config_is_refused_and_untouched(self):
    workdir = self.tempdir()
    Run(simclr.get_config("quick"), workdir)
    with open(os.path.join(workdir, "config.json")) as f:
      saved = f.read()
    other = simclr.get_config("quick")
    other.pretrain.optim.lr = 0.5
    with self.assertRaisesRegex(UserError, r"different config \(differs in pretrain.optim.lr\)"):
      Run(other, workdir)
    with open(os.path.join(workdir, "config.json")) as f:
      self.assertEqual(f.read(), saved)
    Run(simclr.get_config("quick"), workdir)  # the same config resumes

  def test_a_run_from_before_the_compute_dtype_resumes_where_it_computes_in_float32(self):
    """config.json files written before config.model.dtype existed lack it: the run resumes under a dtype that
    computes in float32 (auto on this CPU, float32) and is refused under bfloat16."""
    workdir = self.tempdir()
    Run(simclr.get_config("quick"), workdir)
    path = os.path.join(workdir, "config.json")
    with open(path) as f:
      saved = json.load(f)
    del saved["model"]["dtype"]
    with open(path, "w") as f:
      json.dump(saved, f)
    other = simclr.get_config("quick")
    other.model.dtype = "bfloat16"
    with self.assertRaisesRegex(UserError, r"different config \(differs in model.dtype\)"):
      Run(other, workdir)
    for dtype in ("float32", "auto"):
      with open(path, "w") as f:
        json.dump(saved, f)
      same = simclr.get_config("quick")
      same.model.dtype = dtype
      Run(same, workdir)  # resumes, and config.json now names the dtype
      with open(path) as f:
        self.assertEqual(json.load(f)["model"]["dtype"], dtype)

  def test_a_run_from_before_the_vits_and_the_respelled_sift_layers_resumes(self):
    """config.json files written before config.model.vit and config.attack.batch_norm existed, and T-Core runs that
    listed the ResNet's sift depths (now `()`, the encoder's default depths), are the same runs; another depth list,
    or the new statistics mode, is not."""
    workdir = self.tempdir()
    Run(tcore.get_config("threat=3,tiny"), workdir)
    path = os.path.join(workdir, "config.json")
    with open(path) as f:
      saved = json.load(f)
    del saved["model"]["vit"]
    del saved["attack"]["batch_norm"]
    with open(path, "w") as f:
      json.dump(saved, f)
    clean_statistics = tcore.get_config("threat=3,tiny")
    clean_statistics.attack.batch_norm = "clean"
    with self.assertRaisesRegex(UserError, r"different config \(differs in attack.batch_norm\)"):
      Run(clean_statistics, workdir)
    saved["tcore"]["sift"]["layers"] = ["input", "layer1", "layer2", "layer3", "layer4"]
    with open(path, "w") as f:
      json.dump(saved, f)
    Run(tcore.get_config("threat=3,tiny"), workdir)  # resumes
    saved["tcore"]["sift"]["layers"] = ["input", "layer4"]
    with open(path, "w") as f:
      json.dump(saved, f)
    with self.assertRaisesRegex(UserError, r"different config \(differs in tcore.sift.layers\)"):
      Run(tcore.get_config("threat=3,tiny"), workdir)

  def test_a_baseline_cell_is_the_same_run_whatever_the_other_methods_blocks(self):
    """A comparison cell is its own defense's run: a cell written before config.baseline gained methods (their
    blocks and held_out_fraction) or before another method was retuned resumes; a change to its own block or to the
    setting is refused."""
    workdir = self.tempdir()
    config = load_config("baseline:defense=ss,threat=2,attack=badnets,tiny")
    Run(config, workdir)
    path = os.path.join(workdir, "config.json")
    with open(path) as f:
      saved = json.load(f)
    for key in ("ft", "fp", "rnp", "held_out_fraction"):
      del saved["baseline"][key]
    saved["baseline"]["anp"]["mask_lr"] = 0.2

    def claim(change=None):
      with open(path, "w") as f:
        json.dump(saved, f)
      other = load_config("baseline:defense=ss,threat=2,attack=badnets,tiny")
      if change:
        change(other.baseline)
      Run(other, workdir)

    claim()  # resumes
    with self.assertRaisesRegex(UserError, r"differs in baseline.ss.remove_fraction\)"):
      claim(lambda b: b.ss.update(remove_fraction=0.2))
    with self.assertRaisesRegex(UserError, r"differs in baseline.clean_fraction\)"):
      claim(lambda b: b.update(clean_fraction=0.1))

  def test_non_run_directory_is_refused(self):
    workdir = self.tempdir()
    with open(os.path.join(workdir, "notes.txt"), "w") as f:
      f.write("mine")
    with self.assertRaisesRegex(UserError, "holds no jaxpurify run"):
      Run(simclr.get_config("quick"), workdir)

  def test_stage_records_and_results(self):
    workdir = self.tempdir()
    run = Run(simclr.get_config("quick"), workdir)
    self.assertIsNone(run.done("pretrain"))
    run.finish("pretrain", {"steps": 3})
    self.assertEqual(run.done("pretrain"), {"steps": 3})
    run.write_results({"clean/digits": {"acc": 0.5, "asr": 0.25}})
    with open(os.path.join(workdir, "results.json")) as f:
      results = json.load(f)
    self.assertEqual(results["evaluations"], {"clean/digits": {"acc": 0.5, "asr": 0.25}})
    self.assertEqual(results["experiment"], "pretrain")
    self.assertIn("| clean/digits | 50.00 | 25.00 |", results_table(results["evaluations"]))


if __name__ == "__main__":
  absltest.main()


class CompilationCacheTest(absltest.TestCase):

  def test_runs_share_a_persistent_compilation_cache(self):
    """Where JAX_COMPILATION_CACHE_DIR sets none, the CLI puts XLA's cache under $XDG_CACHE_HOME/jaxpurify/xla;
    one the environment set (as tests/conftest.py does) is kept."""
    mine = jax.config.jax_compilation_cache_dir
    self.assertTrue(mine)
    cli.enable_compilation_cache()
    self.assertEqual(jax.config.jax_compilation_cache_dir, mine)
    with tempfile.TemporaryDirectory() as home:
      try:
        jax.config.update("jax_compilation_cache_dir", None)
        with absltest.mock.patch.dict(os.environ, {"XDG_CACHE_HOME": home}):
          cli.enable_compilation_cache()
        self.assertEqual(jax.config.jax_compilation_cache_dir, os.path.join(home, "jaxpurify", "xla"))
      finally:
        jax.config.update("jax_compilation_cache_dir", mine)

  def test_sweeps_and_comparisons_use_the_cache_too(self):
    """ablate and compare run many experiments in one process: each seed's or cell's steps are new jit functions,
    so only the persistent cache spares compiling them again."""
    from jaxpurify import ablate, compare  # pylint: disable=g-import-not-at-top
    for entry in (ablate.main, compare.main):
      with absltest.mock.patch.object(cli, "enable_compilation_cache") as enable:
        with contextlib.redirect_stderr(io.StringIO()):
          self.assertEqual(entry(["--config", "configs/nope.py"]), 2)
      enable.assert_called_once()
