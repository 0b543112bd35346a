"""T-Core on a ViT: the MLP units' UCLC with the LayerNorm scale folded in (against NumPy), pruning a unit at fc1
(the block's MLP no longer reads it, nothing else moves), the mask kept through an update, the default sifting
depths; one tiny T-Core run end to end (extended)."""

import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from helpers import run_experiment
from jaxpurify.defenses.tcore import channels, sift
from jaxpurify.encoders import Encoder
from jaxpurify.models import ViT, build_encoder

UNITS = [3, 17]  # pruned hidden units of block2's MLP (32 wide)


def _abstract(build) -> Encoder:
  """The Encoder `build()` makes, shapes only (no weights drawn)."""
  return Encoder(*nnx.split(nnx.eval_shape(build), nnx.Param, nnx.BatchStat))


@functools.cache
def _vit() -> Encoder:
  """A ViT of 2 blocks, 2 heads of 4 channels (D = 8, MLPs 32 wide) on 16x16 images, every parameter (LayerNorm
  scales and biases too) drawn from N(0, 0.5²) with NumPy."""
  encoder, rng = _abstract(lambda: ViT(2, 2, 4, patch=4, image_size=16, rngs=nnx.Rngs(0))), np.random.default_rng(3)
  return encoder._replace(params=jax.tree.map(lambda x: jnp.asarray(rng.normal(0, 0.5, x.shape), jnp.float32),
                                              encoder.params))


def _pure(params) -> dict:
  return jax.tree.map(np.array, nnx.to_pure_dict(params))


def test_mlp_unit_uclc_folds_the_layernorm_scale():
  encoder = _vit()
  params, scores = _pure(encoder.params), channels.layer_uclc(encoder)
  assert list(scores) == ["block1.mlp", "block2.mlp"]
  for i, name in enumerate(scores):
    w, gamma = params["blocks"][i]["fc1"]["kernel"], params["blocks"][i]["norm2"]["scale"]
    want = np.array([np.linalg.norm(gamma * w[:, k]) for k in range(w.shape[1])])
    np.testing.assert_allclose(scores[name], want, rtol=1e-5)
    assert np.abs(scores[name] - np.linalg.norm(w, axis=0)).max() > 1e-2  # the fold changes the scores
  # The identity behind the fold: fc1(LN(x)) = x_hat (diag(gamma) W) + (beta W + b), x_hat the normalised x.
  block = nnx.merge(encoder.graphdef, encoder.params, encoder.batch_stats).blocks[1]
  x = jnp.asarray(np.random.default_rng(0).normal(size=(5, 8)), jnp.float32)
  x_hat = (x - x.mean(-1, keepdims=True)) / jnp.sqrt(x.var(-1, keepdims=True) + block.norm2.epsilon)
  p = params["blocks"][1]
  folded = x_hat @ (p["norm2"]["scale"][:, None] * p["fc1"]["kernel"]) + p["norm2"]["bias"] @ p["fc1"]["kernel"]
  np.testing.assert_allclose(block.fc1(block.norm2(x)), folded + p["fc1"]["bias"], atol=1e-5)


def test_pruning_a_unit_zeroes_fc1_column_and_bias_only_and_fc2_stops_reading_it():
  encoder = _vit()
  keep = np.ones(32, bool)
  keep[UNITS] = False
  pruned = channels.apply_masks(encoder, {"block2.mlp": keep})
  want = _pure(encoder.params)
  want["blocks"][1]["fc1"]["kernel"][:, UNITS] = 0
  want["blocks"][1]["fc1"]["bias"][UNITS] = 0
  jax.tree.map(np.testing.assert_array_equal, _pure(pruned.params), want)
  block = nnx.merge(pruned.graphdef, pruned.params, pruned.batch_stats).blocks[1]
  x = jnp.asarray(np.random.default_rng(1).normal(size=(2, 17, 8)), jnp.float32)
  mlp = lambda b: b.fc2(jax.nn.gelu(b.fc1(b.norm2(x)), approximate=False))
  assert np.all(np.asarray(jax.nn.gelu(block.fc1(block.norm2(x)), approximate=False))[..., UNITS] == 0)
  before = mlp(block)
  block.fc2.kernel.value = block.fc2.kernel[...].at[np.array(UNITS)].set(7.0)  # fc2's rows for the pruned units
  np.testing.assert_array_equal(mlp(block), before)
  with pytest.raises(ValueError, match=r"channel mask of block1.mlp has shape \(8,\), the layer \(32,\)"):
    channels.apply_masks(encoder, {"block1.mlp": np.ones(8, bool)})


def test_param_mask_keeps_pruned_units_at_zero_after_an_update():
  encoder = _vit()
  keep = np.ones(32, bool)
  keep[UNITS] = False
  multipliers = channels.param_mask(encoder, {"block1.mlp": np.ones(32, bool), "block2.mlp": keep})
  mask = nnx.to_pure_dict(multipliers)["blocks"]
  assert mask[1]["fc1"]["kernel"].shape == mask[1]["fc1"]["bias"].shape == (32,)  # broadcast along the last axis
  assert mask[0]["fc1"]["kernel"].shape == ()  # nothing pruned in block1
  revived = jax.tree.map(lambda p: p + 1.0, encoder.params)  # as after an update that moved every parameter
  out = _pure(jax.tree.map(lambda a, b: a * b, revived, multipliers))  # finetune's step applies it so
  want = _pure(revived)
  want["blocks"][1]["fc1"]["kernel"][:, UNITS] = want["blocks"][1]["fc1"]["bias"][UNITS] = 0
  jax.tree.map(np.testing.assert_array_equal, out, want)


def test_default_sifting_depths():
  resnet = _abstract(lambda: build_encoder("resnet18", 2, rngs=nnx.Rngs(0)))
  assert sift.default_layers(resnet) == ("input", "layer1", "layer2", "layer3", "layer4")
  vit12 = _abstract(lambda: ViT(12, 1, 2, patch=4, image_size=8, rngs=nnx.Rngs(0)))
  assert sift.default_layers(vit12) == ("input", "block3", "block6", "block9", "block12")
  assert sift.default_layers(_vit()) == ("input", "block1", "block2")
  assert sift.resolve_layers(_vit(), ()) == ("input", "block1", "block2")
  assert sift.resolve_layers(_vit(), ["pooled"]) == ("pooled",)


@pytest.mark.extended  # a width-2 ViT-Tiny through SimCLR, the threat-2 setting and every T-Core stage (~6 min)
def test_tcore_runs_end_to_end_on_a_tiny_vit(tmp_path):
  evaluations, _ = run_experiment("tcore:threat=2,attack=badnets,tiny", str(tmp_path), "model.name=vit_tiny",
                                  "model.width=2")
  assert {"clean/ft_all", "poisoned/ft_all", "defended/ft_all"} <= set(evaluations)
  with open(tmp_path / "tcore.json") as f:
    diagnostics = json.load(f)
  assert set(diagnostics["filter"]["pruned"]) == {f"block{i}.mlp" for i in range(1, 13)}
  with open(tmp_path / "tcore_sift" / "done.json") as f:
    assert json.load(f)["layers"] == ["input", "block3", "block6", "block9", "block12"]
