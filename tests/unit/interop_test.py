"""PyTorch interop: fixtures saved by torch itself (tests/data/make_torch_fixtures.py) import with the features
torch computed, exports round-trip through both file formats and all three key maps (and, where torch is installed,
into the PyTorch models with strict loading), and hostile or damaged files stop with one line, nothing run."""

import importlib.util
import os
import pickle
import tempfile
import zipfile

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from absl.testing import absltest, parameterized
from flax import nnx

from helpers import ROOT, cli_main
from jaxpurify import encoders, export, interop, parallel
from jaxpurify.errors import UserError
from jaxpurify.interop import torchfile
from jaxpurify.models import ProjectionHead, build_encoder, build_ssl_model
from jaxpurify.train.state import create_state, make_optimizer

DATA = os.path.join(ROOT, "tests", "data")
# (file, jaxpurify model, width): every architecture and format the fixtures cover
FIXTURES = (("badencoder_resnet18_w8.pth", "resnet18", 8), ("torchvision_resnet18_w8.pth", "resnet18_imagenet", 8),
            ("torchvision_resnet50_w4.safetensors", "resnet50_imagenet", 4),
            ("prefix_resnet10_w4_legacy.pt", "resnet10", 4), ("ctrl_simclr_resnet18_w4.pth.tar", "resnet18", 4))
# per export map: the fixture whose key names and order an export must have, its jaxpurify model and width
MAP_FIXTURES = {"badencoder": ("badencoder_resnet18_w8.pth", "resnet18", 8),
                "torchvision": ("torchvision_resnet18_w8.pth", "resnet18_imagenet", 8),
                "ctrl": ("ctrl_simclr_resnet18_w4.pth.tar", "resnet18", 4)}
# float32 features computed by two libraries: max |difference| <= TOLERANCE * max(1, max |feature|) (measured: <= 7e-7
# on the fixtures, features up to ~1.4; 1e-6 relative on the exports)
TOLERANCE = 1e-5


def assert_features_close(actual, desired):
  np.testing.assert_allclose(actual, desired, rtol=0, atol=TOLERANCE * max(1.0, float(np.abs(desired).max())))


def features(backbone, x):
  """Eval-mode (pooled [B, D], taps) of an NNX backbone, jitted."""
  graphdef, state = nnx.split(backbone)
  return jax.jit(lambda s, images: nnx.merge(graphdef, s)(images, train=False))(state, x)


def randomize_batchnorm(module, seed: int):
  """Every BatchNorm in `module` with non-trivial scale, bias and statistics (so eval mode tests them), as the
  fixture script does."""
  rng = np.random.default_rng(seed)
  for _, bn in nnx.iter_graph(module):
    if isinstance(bn, nnx.BatchNorm):
      n = bn.scale.value.shape[0]
      for variable, values in ((bn.scale, rng.uniform(0.5, 1.5, n)), (bn.bias, rng.normal(0, 0.1, n)),
                               (bn.mean, rng.normal(0, 0.1, n)), (bn.var, rng.uniform(0.5, 1.5, n))):
        variable.value = jax.numpy.asarray(values, jax.numpy.float32)
  return module


def random_backbone(name: str, width: int, seed: int):
  return randomize_batchnorm(build_encoder(name, width, rngs=nnx.Rngs(seed)), seed)


def pure(module, kind):
  return nnx.to_pure_dict(nnx.state(module, kind))


def assert_same_backbone(test, a, b):
  for kind in (nnx.Param, nnx.BatchStat):
    leaves_a, leaves_b = jax.tree.leaves(pure(a, kind)), jax.tree.leaves(pure(b, kind))
    test.assertEqual(len(leaves_a), len(leaves_b))
    for x, y in zip(leaves_a, leaves_b):
      np.testing.assert_array_equal(x, y)


def assert_one_line(test, err: UserError):
  test.assertNotIn("\n", str(err))


class FixtureTest(parameterized.TestCase):
  """The fixtures PyTorch wrote, read back against the features PyTorch computed."""

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.expected = dict(np.load(os.path.join(DATA, "torch_features.npz")))

  @parameterized.parameters(*FIXTURES)
  def test_features_match_torch(self, filename, model, width):
    backbone = interop.load_torch(os.path.join(DATA, filename), model, width)  # import_map auto
    self.assert_matches(backbone, filename.split(".")[0])

  def assert_matches(self, backbone, stem: str):
    """`backbone`'s eval features on `stem`'s input are torch's."""
    pooled, taps = features(backbone, self.expected[f"{stem}/x"])
    assert_features_close(pooled, self.expected[f"{stem}/pooled"])
    assert_features_close(taps["layer4"], self.expected[f"{stem}/layer4"])

  def test_ctrl_byol_online_and_target_encoders(self):
    path = os.path.join(DATA, "ctrl_byol_resnet18_w2.pth.tar")
    with self.assertRaisesRegex(UserError, r"import_map=auto finds several backbones \(ctrl:backbone\., "
                                r"ctrl:backbone_k\., ctrl:encoder_k\.0\., ctrl:encoder_q\.0\.\)") as caught:
      interop.load_torch(path, "resnet18", 2)
    assert_one_line(self, caught.exception)
    online = interop.load_torch(path, "resnet18", 2, "ctrl")
    self.assert_matches(online, "ctrl_byol_resnet18_w2")
    self.assert_matches(interop.load_torch(path, "resnet18", 2, "ctrl:backbone_k."), "ctrl_byol_resnet18_w2_target")
    assert_same_backbone(self, interop.load_torch(path, "resnet18", 2, "ctrl:encoder_q.0."), online)

  def test_explicit_maps_and_mismatches(self):
    path = os.path.join(DATA, "badencoder_resnet18_w8.pth")
    assert_same_backbone(self, interop.load_torch(path, "resnet18", 8, "badencoder"),
                         interop.load_torch(path, "resnet18", 8, "badencoder:f.f."))
    legacy = os.path.join(DATA, "prefix_resnet10_w4_legacy.pt")
    self.assertEqual(sorted({k.split(".")[0] for k in interop.read_state_dict(legacy)}), ["backbone", "head"])
    interop.load_torch(legacy, "resnet10", 4, "torchvision:backbone.")
    cases = (
        (path, "resnet18", 8, "torchvision", r"missing: conv1.weight, bn1.weight, bn1.bias \.\.\.; unexpected: "
         r"f\.f\.0\.weight, f\.f\.1\.weight, f\.f\.1\.bias \.\.\."),
        (path, "resnet34", 8, "auto", r"missing: f\.f\.3\.2\.conv1\.weight, .*; unexpected: none"),
        (path, "resnet18", 16, "auto", r"f\.f\.0\.weight has shape \(8, 3, 3, 3\), the resnet18 width 16 needs "
         r"\(16, 3, 3, 3\)"),
        (os.path.join(DATA, "torchvision_resnet18_w8.pth"), "resnet18", 8, "auto", r"conv1\.weight has shape "
         r"\(8, 3, 7, 7\), .*needs \(8, 3, 3, 3\) \(a 7×7 first conv is torchvision's ImageNet stem"),
        (path, "resnet18", 8, "timm", r"unknown import map 'timm'"),
        (os.path.join(DATA, "ctrl_simclr_resnet18_w4.pth.tar"), "resnet18", 4, "torchvision:backbone.",
         (r"missing: backbone\.layer2\.0\.downsample\.0\.weight, .*; unexpected: "
          r"backbone\.layer2\.0\.shortcut\.0\.weight")),
        (os.path.join(DATA, "torch_features.npz"), "resnet18", 8, "auto", r"not a readable PyTorch checkpoint"),
    )
    for file, model, width, import_map, message in cases:
      with self.assertRaisesRegex(UserError, message) as caught:
        interop.load_torch(file, model, width, import_map)
      assert_one_line(self, caught.exception)

  def test_load_backbone_imports_torch_files(self):
    config = interop_config()
    mesh = jax.make_mesh((1,), ("data",), devices=jax.devices()[:1])
    path = os.path.join(DATA, "badencoder_resnet18_w8.pth")
    encoder = encoders.load_backbone(path, config, mesh, encoders.FINAL_STAGES, "config.defense.suspect_encoder")
    assert_same_backbone(self, nnx.merge(encoder.graphdef, encoder.params, encoder.batch_stats),
                         interop.load_torch(path, "resnet18", 8))
    with self.assertRaisesRegex(UserError, "missing.pth does not exist; set config.defense.suspect_encoder"):
      encoders.load_backbone("missing.pth", config, mesh, encoders.FINAL_STAGES, "config.defense.suspect_encoder")


def interop_config():
  import ml_collections  # pylint: disable=g-import-not-at-top
  return ml_collections.ConfigDict(dict(name="resnet18", width=8, import_map="auto", dtype="float32"))


class RoundTripTest(parameterized.TestCase):
  """jaxpurify -> file -> jaxpurify, the key names those of the PyTorch models (taken from the fixtures)."""

  @parameterized.product(fmt=("torch", "safetensors"), import_map=tuple(MAP_FIXTURES))
  def test_export_then_import_is_exact(self, fmt, import_map):
    filename, model, width = MAP_FIXTURES[import_map]
    backbone = random_backbone(model, width, seed=1)
    head = ProjectionHead(width * 8, width * 8, 128, rngs=nnx.Rngs(2))  # written by badencoder only
    tensors = interop.state_dict(backbone, import_map, head, batches=3)
    fixture = interop.read_state_dict(os.path.join(DATA, filename))
    self.assertEqual(list(tensors), [k for k in fixture if not k.startswith(("fc.", "proj_head."))])  # torch's order
    for key, value in tensors.items():
      self.assertEqual(value.shape, fixture[key].shape, key)
    with tempfile.TemporaryDirectory() as tmp:
      path = os.path.join(tmp, "encoder." + ("pth" if fmt == "torch" else "safetensors"))
      interop.write(path, tensors, fmt, wrap={"epoch": 3} if import_map == "badencoder" else None)
      for key, value in interop.read_state_dict(path).items():
        np.testing.assert_array_equal(value, tensors[key])
      assert_same_backbone(self, interop.load_torch(path, model, width), backbone)

  def test_torch_writer_keeps_plain_values(self):
    obj = {"epoch": 2**40, "lr": 0.5, "flags": [True, False, None], "pair": (1, "a"),
           "w": np.arange(6, dtype=np.int64).reshape(2, 3), "empty": {}}
    with tempfile.TemporaryDirectory() as tmp:
      path = os.path.join(tmp, "plain.pt")
      torchfile.write(path, obj)
      back = torchfile.read(path)
    np.testing.assert_array_equal(back.pop("w"), obj.pop("w"))
    self.assertEqual(back, obj)


def save_run(workdir: str, stage: str, config, state) -> None:
  """A finished-looking run: config.json and one orbax step of `state` in workdir/stage/ckpt."""
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, "config.json"), "w", encoding="utf-8") as f:
    f.write(config.to_json_best_effort())
  mngr = ocp.CheckpointManager(os.path.join(workdir, stage, "ckpt"))
  mngr.save(4, args=ocp.args.StandardSave(state))
  mngr.wait_until_finished()
  mngr.close()


def distill_run(tmp: str):
  """A distillation run whose student (ResNet-18 width 4, head 32 -> 32 -> 8) is saved as its stage 'distill'
  -> (workdir, backbone, head)."""
  config = cli_config()
  mesh = jax.make_mesh((1,), ("data",), devices=jax.devices()[:1])
  graphdef, state = create_state(lambda: build_ssl_model(config.model, config.defense.ssl.head, 0),
                                 make_optimizer(config.defense.ssl.optim), mesh)
  model = randomize_batchnorm(nnx.merge(graphdef, state.params, state.batch_stats), 3)  # backbone and head
  _, params, batch_stats = nnx.split(model, nnx.Param, nnx.BatchStat)
  state = state.replace(params=parallel.put_replicated(params, mesh),
                        batch_stats=parallel.put_replicated(batch_stats, mesh))
  workdir = os.path.join(tmp, "run")
  save_run(workdir, "distill", config, state)
  return workdir, model.backbone, model.head


def cli_config():
  from helpers import config as load  # pylint: disable=g-import-not-at-top
  return load("distill:quick", "model.width=4", "defense.ssl.head.dim=8")


class ExportCommandTest(absltest.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.tmp = tempfile.mkdtemp()
    cls.workdir, cls.backbone, cls.head = distill_run(cls.tmp)

  def test_writes_the_runs_encoder_and_head(self):
    out = os.path.join(self.tmp, "defended.pth")
    status, err, stdout = cli_main("--workdir", self.workdir, "--map", "badencoder", out, main=export.main)
    self.assertEqual((status, err), (0, []))
    self.assertIn("distill/ckpt step 4", stdout)
    saved = torchfile.read(out)
    self.assertEqual(list(saved), ["state_dict"])
    expected = interop.state_dict(self.backbone, "badencoder", self.head, batches=4)
    self.assertEqual(list(saved["state_dict"]), list(expected))
    for key, value in expected.items():
      np.testing.assert_array_equal(saved["state_dict"][key], value)
    assert_same_backbone(self, interop.load_torch(out, "resnet18", 4), self.backbone)

  def test_ctrl_checkpoint_layout(self):
    out = os.path.join(self.tmp, "last.pth.tar")
    self.assertEqual(cli_main("--workdir", self.workdir, "--map", "ctrl", out, main=export.main)[:2], (0, []))
    saved = torchfile.read(out)
    self.assertEqual(saved["epoch"], 4)
    self.assertEqual(list(saved["state_dict"]), list(interop.state_dict(self.backbone, "ctrl", batches=4)))
    assert_same_backbone(self, interop.load_torch(out, "resnet18", 4), self.backbone)  # auto finds ctrl

  def test_bad_input(self):
    out = os.path.join(self.tmp, "x.safetensors")
    cases = ((["--map", "badencoder", out], "--workdir is required"),
             (["--workdir", self.workdir, "--map", "badencoder"], "OUT .* is missing"),
             (["--workdir", self.workdir, out], "--map is required"),
             (["--workdir", self.workdir, "--map", "auto", out], "--map auto has nothing to detect"),
             (["--workdir", self.workdir, "--map", "badencoder", "--format", "torch", out], "cannot tell the format"),
             (["--workdir", self.workdir, "--stage", "attack", "--map", "badencoder", out],
              "has no stage 'attack' with a checkpoint; pass one of distill"),
             (["--workdir", self.tmp, "--map", "badencoder", out], "holds no jaxpurify run"))
    for argv, message in cases:
      status, err, _ = cli_main(*argv, main=export.main)
      self.assertEqual(status, 2, argv)
      self.assertLen(err, 1)
      self.assertRegex(err[0], message)


class Evil:
  """Unpickling this would call `action(*args)`."""

  def __init__(self, action, *args):
    self.action, self.args = action, args

  def __reduce__(self):
    return self.action, self.args


def zip_checkpoint(path: str, payload: bytes) -> None:
  """A torch zip archive around the pickle `payload`."""
  with zipfile.ZipFile(path, "w") as archive:
    archive.writestr("archive/data.pkl", payload)
    archive.writestr("archive/byteorder", "little")
    archive.writestr("archive/version", "3\n")


class SafetyTest(parameterized.TestCase):
  """Hostile and damaged files: one UserError line, nothing of theirs run."""

  def refused(self, path: str, message: str):
    with self.assertRaisesRegex(UserError, message) as caught:
      interop.read_state_dict(path)
    assert_one_line(self, caught.exception)

  @parameterized.parameters("zip", "legacy")
  def test_code_in_the_pickle_is_never_run(self, layout):
    with tempfile.TemporaryDirectory() as tmp:
      marker = os.path.join(tmp, "pwned")
      for evil, name in ((Evil(os.system, f"touch {marker}"), r"(posix|os)\.system"),
                         (Evil(open, marker, "w"), r"(io|builtins)\.open"),
                         (Evil(eval, f"open({marker!r}, 'w')"), r"builtins\.eval")):
        payload = pickle.dumps({"state_dict": {"w": 1}, "x": evil}, protocol=2)
        path = os.path.join(tmp, "model.pth")
        if layout == "zip":
          zip_checkpoint(path, payload)
        else:
          with open(path, "wb") as f:
            f.write(pickle.dumps(torchfile.LEGACY_MAGIC) + pickle.dumps(1001) + pickle.dumps({}) + payload)
        self.refused(path, rf"{tmp}/model.pth asks to run {name} when loaded, .*nothing was run")
        self.assertFalse(os.path.exists(marker))

  def test_unknown_global_is_named(self):
    import argparse  # pylint: disable=g-import-not-at-top
    with tempfile.TemporaryDirectory() as tmp:
      path = os.path.join(tmp, "model.pth")
      zip_checkpoint(path, pickle.dumps({"state_dict": {}, "args": argparse.Namespace(lr=0.1)}, protocol=2))
      self.refused(path, r"asks to run argparse\.Namespace when loaded")

  @parameterized.parameters(("badencoder_resnet18_w8.pth", "zip archive is truncated or corrupt"),
                            ("prefix_resnet10_w4_legacy.pt", "truncated|ends early|damaged"),
                            ("torchvision_resnet50_w4.safetensors", "truncated"))
  def test_truncated_files(self, filename, message):
    with open(os.path.join(DATA, filename), "rb") as f:
      data = f.read()
    with tempfile.TemporaryDirectory() as tmp:
      path = os.path.join(tmp, filename)
      for cut in (len(data) // 2, len(data) - 100):
        with open(path, "wb") as f:
          f.write(data[:cut])
        self.refused(path, message)

  def test_a_tensor_past_its_storage_is_refused(self):
    with tempfile.TemporaryDirectory() as tmp:
      path = os.path.join(tmp, "model.pth")
      torchfile.write(path, {"w": np.zeros(4, np.float32)})
      with zipfile.ZipFile(path) as archive:
        members = {name: archive.read(name) for name in archive.namelist()}
      members["archive/data/0"] = members["archive/data/0"][:8]  # 2 of the tensor's 4 floats
      with zipfile.ZipFile(path, "w") as archive:
        for name, data in members.items():
          archive.writestr(name, data)
      self.refused(path, "a tensor reaches past the end of storage 0")


class TorchRoundTripTest(absltest.TestCase):
  """Exports load into the PyTorch models with strict=True and compute the same features (needs torch)."""

  def test_exports_load_into_pytorch_with_the_same_features(self):
    torch = pytest.importorskip("torch", reason="torch is not a jaxpurify requirement; install it to run this test")
    spec = importlib.util.spec_from_file_location("make_torch_fixtures", os.path.join(DATA, "make_torch_fixtures.py"))
    models = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(models)
    x = np.random.default_rng(0).standard_normal((4, 64, 64, 3)).astype(np.float32)
    with tempfile.TemporaryDirectory() as tmp:
      workdir, backbone, _ = distill_run(tmp)
      ctrl = torch.nn.Module()  # CTRL's utils/util.py load_model keeps `backbone.*` for its ResNet, strict
      ctrl.backbone = models.CtrlResNet(4)
      torch_models = {"badencoder": models.SimCLR("resnet18", 4, feature_dim=8),
                      "torchvision": models.ResNet("resnet18", 4), "ctrl": ctrl}
      torch_models["torchvision"].fc = torch.nn.Identity()
      jax_models = {"badencoder": backbone, "torchvision": random_backbone("resnet18_imagenet", 4, seed=5),
                    "ctrl": backbone}
      for name, torch_model in torch_models.items():
        out = os.path.join(tmp, f"{name}.pth")
        if name != "torchvision":  # the run's defended encoder, through the export command
          self.assertEqual(cli_main("--workdir", workdir, "--map", name, out, main=export.main)[0], 0)
        else:
          interop.write(out, interop.state_dict(jax_models[name], name), "torch")
        saved = torch.load(out, weights_only=True)
        torch_model.load_state_dict(saved if name == "torchvision" else saved["state_dict"], strict=True)
        pooled, layer4 = models.features(torch_model.backbone if name == "ctrl" else torch_model, x)
        expected_pooled, taps = features(jax_models[name], x)
        for actual, desired in ((pooled, expected_pooled), (layer4, taps["layer4"])):
          print(f"{name}: max feature difference {np.abs(actual - desired).max():.2e}, features up to "
                f"{np.abs(desired).max():.1f}")
          assert_features_close(actual, desired)


if __name__ == "__main__":
  absltest.main()
