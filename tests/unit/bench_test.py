"""The benchmark command: its JSON numbers, XLA's FLOP count scaling with the batch, and bad input."""

import contextlib
import io
import json
import os
import tempfile

import pytest
from absl.testing import absltest

from jaxpurify import bench

SMALL = ["--config.model.name=resnet10", "--config.model.width=4"]  # one block per stage: fast compiles
TINY = ["--config", "configs/simclr.py:quick", *SMALL, "--config.pretrain.head.dim=8",
        "--steps", "2", "--warmup", "0"]


def run_bench(*argv):
  """-> (exit status, stdout, stderr) of the bench's main, run in-process."""
  out, err = io.StringIO(), io.StringIO()
  with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
    status = bench.main(list(argv))
  return status, out.getvalue(), err.getvalue()


class BenchTest(absltest.TestCase):

  def bench_json(self, batch: int) -> dict:
    """The tiny SimCLR step benched at global batch `batch` -> its --json numbers."""
    with tempfile.TemporaryDirectory() as tmp:
      path = os.path.join(tmp, f"b{batch}.json")
      status, out, _ = run_bench(*TINY, f"--config.pretrain.train.batch_size={batch}", "--json", path)
      self.assertEqual(status, 0)
      self.assertIn("images/s", out)
      self.assertIn("(pretrain step, float32)", out)  # config.model.dtype=auto on a CPU
      with open(path, encoding="utf-8") as f:
        return json.load(f)

  @pytest.mark.extended  # 32 s of CI time on 2 cores; the other bench tests read its output by default
  def test_json_numbers(self):
    small = self.bench_json(16)
    self.assertEqual((small["device_count"], small["global_batch"], small["width"]), (8, 16, 4))
    self.assertGreater(small["compile_s"], 0)
    self.assertGreater(small["step_ms"], 0)
    self.assertAlmostEqual(small["images_per_s"], 16 / (small["step_ms"] / 1e3), delta=1e-6)
    self.assertGreater(small["flops_per_step"], 0)
    self.assertEqual(small["flops_per_step"], 8 * small["flops_per_step_per_device"])
    self.assertGreater(small["achieved_tflops_per_device"], 0)
    for cpu_unknown in ("peak_memory_bytes", "peak_tflops_per_device", "peak_used", "utilisation"):
      self.assertIsNone(small[cpu_unknown], cpu_unknown)

  @pytest.mark.extended  # a second compile of the step (18 s)
  def test_flops_scale_with_batch(self):
    # Convolutions dominate, so XLA's count of an independent compile grows about linearly with the batch.
    small, large = self.bench_json(16), self.bench_json(32)
    self.assertBetween(large["flops_per_step"] / small["flops_per_step"], 1.6, 2.4)

  @pytest.mark.extended  # 16-25 s each: the other experiments' steps (the default run benches SimCLR)
  def test_attack_steps(self):
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
      for mode in ("badencoder", "drupe"):
        path = os.path.join(tmp, f"{mode}.json")
        status, out, _ = run_bench("--config", f"configs/{mode}.py:quick", *SMALL,
                                   "--config.attack.train.batch_size=16",
                                   f"--config.attack.num_references={3 if mode == 'drupe' else 1}",
                                   "--steps", "1", "--warmup", "0", "--json", path)
        self.assertEqual(status, 0)
        self.assertIn("(encoder_attack step, float32)", out)
        with open(path, encoding="utf-8") as f:
          results[mode] = json.load(f)
    for r in results.values():
      self.assertEqual(r["global_batch"], 16)
      self.assertAlmostEqual(r["images_per_s"], 16 / (r["step_ms"] / 1e3), delta=1e-6)
    # DRUPE (at its paper's 3 references; its quick config takes 1) embeds 3 references' augmented batches where
    # BadEncoder embeds 1: five batch forwards and
    # backwards (triggered, shadow, 3 x references) against three, plus DRUPE's extra augmentations and terms.
    self.assertBetween(results["drupe"]["flops_per_step"] / results["badencoder"]["flops_per_step"], 1.5, 2.2)

  @pytest.mark.extended  # 16-25 s each: the other experiments' steps (the default run benches SimCLR)
  def test_ft_head_step_costs_less_than_ft_all(self):
    """FT-head runs the encoder forward only (no backward through it): well under FT-all's FLOPs (ResNet-18: on
    ResNet-10 the head's share of the FLOPs lifts the ratio to the bound)."""
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
      for protocol in ("ft_head", "ft_all"):
        path = os.path.join(tmp, f"{protocol}.json")
        status, out, _ = run_bench("--config", "configs/threat.py:threat=2,attack=badnets,quick",
                                   "--config.model.width=4", f"--config.finetune.protocols=('{protocol}',)",
                                   f"--config.finetune.{protocol}.train.batch_size=16", "--steps", "1",
                                   "--json", path)
        self.assertEqual(status, 0)
        self.assertIn("(threat step, float32)", out)
        with open(path, encoding="utf-8") as f:
          results[protocol] = json.load(f)
    self.assertEqual(results["ft_all"]["global_batch"], 16)
    # A backward pass costs about twice the forward: FT-all ~ 3 forwards, FT-head ~ 1 (plus the head).
    self.assertBetween(results["ft_head"]["flops_per_step"] / results["ft_all"]["flops_per_step"], 0.2, 0.5)

  @pytest.mark.extended  # 16-25 s each: the other experiments' steps (the default run benches SimCLR)
  def test_confusion_step_costs_an_ft_all_step_of_both_batches(self):
    """T-Core's confusion step runs 16 suspect + 16 seed images through FT-all: one FT-all step at batch 32."""
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
      for name, argv in (("tcore", ["--config", "configs/tcore.py:threat=2,attack=badnets,quick",
                                    "--config.tcore.expand.batch_size=16", "--config.tcore.expand.seed_batch_size=16"]),
                         ("ft_all", ["--config", "configs/threat.py:threat=2,attack=badnets,quick",
                                     "--config.finetune.ft_all.train.batch_size=32"])):
        path = os.path.join(tmp, f"{name}.json")
        status, out, err = run_bench(*argv, *SMALL, "--steps", "1", "--json", path)
        self.assertEqual(status, 0, err)
        with open(path, encoding="utf-8") as f:
          results[name] = json.load(f)
    self.assertEqual(results["tcore"]["global_batch"], 32)
    self.assertBetween(results["tcore"]["flops_per_step"] / results["ft_all"]["flops_per_step"], 0.9, 1.15)

  @pytest.mark.extended  # 16-25 s each: the other experiments' steps (the default run benches SimCLR)
  def test_distill_step_costs_a_simclr_step_plus_a_teacher_forward(self):
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
      for name, argv in (("simclr", TINY + ["--config.pretrain.train.batch_size=16"]),
                         ("distill", ["--config", "configs/distill.py:quick", *SMALL,
                                      "--config.defense.ssl.head.dim=8", "--config.defense.ssl.train.batch_size=16",
                                      "--steps", "1", "--warmup", "0"])):
        path = os.path.join(tmp, f"{name}.json")
        status, out, _ = run_bench(*argv, "--json", path)
        self.assertEqual(status, 0)
        with open(path, encoding="utf-8") as f:
          results[name] = json.load(f)
    self.assertIn("(distill step, float32)", out)  # config.model.dtype=auto on a CPU
    self.assertEqual(results["distill"]["global_batch"], 16)
    # Two trained student views (forward + backward, about 3 forwards each) and one inference teacher view.
    self.assertBetween(results["distill"]["flops_per_step"] / results["simclr"]["flops_per_step"], 1.05, 1.4)

  def test_profile_writes_a_trace_of_the_extra_steps(self):
    with tempfile.TemporaryDirectory() as tmp:
      status, out, _ = run_bench(*TINY[:-4], "--steps", "1", "--warmup", "0", "--profile", tmp)
      self.assertEqual(status, 0)
      self.assertIn(f"profile      3 more steps traced in {tmp}", out)
      traces = [name for _, _, names in os.walk(tmp) for name in names if name.endswith(".xplane.pb")]
      self.assertLen(traces, 1)

  def test_bad_input_is_one_error_line(self):
    for argv in (["--config.model.depth=3"], ["--steps", "0"], ["--workdir", "x"],
                 ["--config", "configs/nope.py"], ["--profile", os.path.abspath(__file__)]):
      status, out, err = run_bench(*argv)
      self.assertEqual(status, 2, argv)
      self.assertEqual(out, "")
      self.assertTrue(err.startswith("error: ") and err.count("\n") == 1, err)

  def test_matmul_peak_convention(self):
    self.assertEqual(bench.matmul_peak("NVIDIA H100 80GB HBM3", None)[0], 494.7)  # TF32 tensor cores
    self.assertEqual(bench.matmul_peak("NVIDIA H200", "highest")[0], 67.0)  # fp32 CUDA cores
    self.assertEqual(bench.matmul_peak("NVIDIA A100-SXM4-80GB", None)[0], 156.0)
    self.assertEqual(bench.matmul_peak("TPU v5 lite", None)[0], 197.0)
    self.assertIsNone(bench.matmul_peak("cpu", None))
    self.assertEqual(bench.matmul_peak("NVIDIA H100 80GB HBM3", None, "bfloat16")[0], 989.0)  # bf16 tensor cores
    self.assertEqual(bench.matmul_peak("NVIDIA A100-SXM4-40GB", "highest", "bfloat16")[0], 312.0)
    self.assertEqual(bench.matmul_peak("TPU v4", None, "bfloat16")[0], 275.0)


if __name__ == "__main__":
  absltest.main()
