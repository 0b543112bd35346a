"""`python -m jaxpurify.bench --compare torch`: one error line where torch or a reference is missing; with torch
installed (benchmarks/requirements.txt), the PyTorch reference's losses and models against jaxpurify's and the
compare report."""

import json
import os
import sys
import tempfile
from unittest import mock

import jax
import numpy as np
import pytest
from absl.testing import absltest, parameterized
from flax import nnx
from helpers import cli_main, config

from benchmarks import torch_reference
from jaxpurify import bench, losses, models

TINY = ["--config.model.name=resnet10", "--config.model.width=4", "--steps", "1", "--warmup", "0"]


def bench_main(*argv):
  """-> (exit status, non-empty stderr lines, stdout) of the bench's main, in-process."""
  return cli_main(*argv, main=bench.main)


def importorskip_torch():
  """The torch module, or the test skipped where it is not installed."""
  return pytest.importorskip("torch", reason="torch is not a jaxpurify requirement; benchmarks/requirements.txt")


class CompareErrorsTest(parameterized.TestCase):
  """Bad --compare input ends in one `error:` line and status 2, before anything is compiled."""

  def test_without_torch_the_line_names_the_install_command(self):
    with mock.patch.dict(sys.modules, {"torch": None, "torchvision": None}):  # `import torch` raises ImportError
      status, err, out = bench_main("--config", "configs/simclr.py:quick", "--compare", "torch")
    self.assertEqual((status, out), (2, ""))
    self.assertLen(err, 1)
    self.assertStartsWith(err[0], "error: --compare torch needs PyTorch and torchvision")
    self.assertIn(torch_reference.INSTALL, err[0])

  @parameterized.named_parameters(
      ("unknown_value", ["configs/simclr.py:quick", "--compare", "pytorch"], "unknown --compare 'pytorch'"),
      ("no_reference", ["configs/tcore.py:quick", "--compare", "torch"], "experiment 'tcore' has no PyTorch"),
      ("other_method", ["configs/moco.py:quick", "--compare", "torch"], "config.pretrain.method='simclr'"),
      ("other_attack", ["configs/drupe.py:quick", "--compare", "torch"], "config.attack.mode='badencoder'"),
      ("other_protocol", ["configs/threat.py:quick", "--config.finetune.protocols=('ft_head',)", "--compare",
                          "torch"], "config.finetune.protocols[-1]='ft_all'"))
  def test_one_line(self, argv, expected):
    status, err, out = bench_main("--config", *argv)
    self.assertEqual((status, out), (2, ""))
    self.assertLen(err, 1)
    self.assertStartsWith(err[0], "error: ")
    self.assertIn(expected, err[0])


def _nchw(x):
  """NHWC -> NCHW, contiguous."""
  return np.ascontiguousarray(np.transpose(x, (0, 3, 1, 2)))


class TorchReferenceTest(absltest.TestCase):
  """The reference computes what jaxpurify computes (needs torch)."""

  def setUp(self):
    super().setUp()
    self.torch = importorskip_torch()
    from benchmarks.torch_reference import losses as torch_losses  # pylint: disable=g-import-not-at-top
    self.torch_losses = torch_losses
    self.rng = np.random.default_rng(0)

  def close(self, actual, desired):
    np.testing.assert_allclose(np.asarray(actual.detach()), np.asarray(desired), rtol=1e-5, atol=1e-6)

  def normal(self, *shape):
    return self.rng.standard_normal(shape).astype(np.float32)

  def test_nt_xent_and_clone(self):
    z1, z2 = self.normal(16, 8), self.normal(16, 8)
    t = self.torch.from_numpy
    self.close(self.torch_losses.nt_xent(t(z1), t(z2), 0.5), jax.jit(losses.nt_xent, static_argnums=2)(z1, z2, 0.5))
    self.close(self.torch_losses.feature_clone(t(z1), t(z2)), jax.jit(losses.feature_clone)(z1, z2))

  def test_attention_transfer(self):
    student, teacher = self.normal(4, 8, 8, 6), self.normal(4, 8, 8, 10)  # NHWC; channel counts may differ
    actual = self.torch_losses.attention_transfer(self.torch.from_numpy(_nchw(student)),
                                                  self.torch.from_numpy(_nchw(teacher)))
    self.close(actual, jax.jit(losses.attention_transfer)(student, teacher))

  def test_badencoder_loss(self):
    batch, refs, dim = 8, 2, 16
    f_triggered, f_shadow, c_shadow = (self.normal(batch, dim) for _ in range(3))
    f_ref, c_ref, f_ref_aug = self.normal(refs, dim), self.normal(refs, dim), self.normal(refs, batch, dim)
    terms = jax.jit(losses.badencoder_terms)(f_triggered, f_shadow, c_shadow, f_ref, f_ref_aug, c_ref)
    repeat = lambda x: self.torch.from_numpy(np.repeat(x[:, None], batch, axis=1))  # the official per-item copies
    t = self.torch.from_numpy
    loss, torch_terms = self.torch_losses.badencoder_loss(t(f_triggered), t(f_shadow), t(c_shadow), repeat(f_ref),
                                                          t(f_ref_aug), repeat(c_ref), 0.5, 2.0)
    self.close(loss, losses.badencoder_loss(terms, 0.5, 2.0))
    for name in ("l0", "l1", "l2"):
      self.close(torch_terms[name], terms[name])

  def test_models_match_in_parameters_and_tap_shapes(self):
    from benchmarks.torch_reference import models as torch_models  # pylint: disable=g-import-not-at-top
    count = lambda module: sum(p.numel() for p in module.parameters())
    jax_count = lambda build: sum(x.size for x in jax.tree.leaves(nnx.state(nnx.eval_shape(build), nnx.Param)))
    for name in ("resnet10", "resnet18", "resnet50", "resnet18_imagenet"):
      encoder = torch_models.ResNet(name, 8)
      build = lambda name=name: models.build_encoder(name, 8, rngs=nnx.Rngs(0))  # Rngs inside eval_shape's trace
      self.assertEqual(count(encoder), jax_count(build), name)
      _, taps = encoder(self.torch.zeros(2, 3, 64, 64))
      shapes = models.describe(config("simclr:quick", f"model.name={name}").model, 64)[1]
      self.assertEqual({k: (v.shape[2], v.shape[3], v.shape[1]) for k, v in taps.items()}, shapes, name)
    c = config("simclr:quick", "model.width=8")
    self.assertEqual(count(torch_models.SSLModel(c.model, c.pretrain.head)),
                     jax_count(lambda: models.build_ssl_model(c.model, c.pretrain.head, 0)))
    head = config("threat:quick").finetune.head
    mlp = jax_count(lambda: models.MLPHead(64, 10, hidden=tuple(head.hidden), dropout=head.dropout,
                                           rngs=nnx.Rngs(0)))
    self.assertEqual(count(torch_models.Classifier(c.model, 10, head)), count(torch_models.ResNet("resnet18", 8)) + mlp)


class CompareReportTest(absltest.TestCase):
  """The compare report and its JSON (needs torch); each reference pipeline runs a step."""

  def test_report_and_json(self):
    importorskip_torch()
    with tempfile.TemporaryDirectory() as tmp:
      path = os.path.join(tmp, "bench.json")
      status, _, out = bench_main("--config", "configs/simclr.py:quick", *TINY, "--config.pretrain.train.batch_size=16",
                                  "--compare", "torch", "--json", path)
      with open(path, encoding="utf-8") as f:
        result = json.load(f)
    self.assertEqual(status, 0)
    self.assertIn("torch        SimCLR pre-training in PyTorch", out)
    self.assertIn("ratio        ", out)
    t = result["torch"]
    self.assertEqual((t["global_batch"], t["workers"], t["steps"]), (16, 2, 1))
    self.assertAlmostEqual(t["images_per_s"], 16 / (t["step_ms"] / 1e3), delta=1e-6)
    self.assertAlmostEqual(result["ratio_vs_torch"], result["images_per_s"] / t["images_per_s"], delta=1e-9)

  def test_every_pipeline_steps(self):
    importorskip_torch()
    for name, batch in (("badencoder:quick", "attack.train"), ("distill:quick", "defense.ssl.train"),
                        ("threat:quick", "finetune.ft_all.train")):
      c = config(name, "model.name=resnet10", "model.width=4", f"{batch}.batch_size=8")
      result = torch_reference.measure(c, 1, 0)
      self.assertEqual(result["global_batch"], 8, name)
      self.assertGreater(result["images_per_s"], 0, name)


if __name__ == "__main__":
  absltest.main()
