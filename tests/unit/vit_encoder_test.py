"""The ViT encoders: parameter counts against timm's, attention against NumPy, taps and pooling, bad options as
UserError, the recipe's config argument, and the SimCLR step of a tiny ViT on 8 devices against 1 (extended)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from helpers import assert_trees_close, config
from jaxpurify import models, validation
from jaxpurify.data.device import DeviceDataset
from jaxpurify.errors import UserError
from jaxpurify.models.vit import Attention, ViT
from jaxpurify.ssl import simclr
from jaxpurify.train.state import create_state, make_optimizer


def n_params(build) -> int:
  """Parameters of the module `build` makes, from shapes only."""
  return sum(leaf.size for leaf in jax.tree.leaves(nnx.state(nnx.eval_shape(build), nnx.Param)))


def tiny_vit(pool: str = "cls", seed: int = 0) -> ViT:
  """2 blocks, 2 heads of 4 channels (D = 8) on 16x16 images, patch 4: a 4x4 grid."""
  return ViT(2, 2, 4, patch=4, image_size=16, pool=pool, rngs=nnx.Rngs(seed))


@pytest.mark.parametrize("name, patch, image_size, count", [
    ("vit_tiny", 16, 224, 5_524_416),  # timm vit_tiny_patch16_224 without its head
    # the configs' CIFAR setting (64 patches + class token); at patch 16 on 224 it is timm's vit_small_patch16_224
    # without its head, 21,665,664: 276,480 more in the patch embedding, 50,688 more in the position embeddings
    ("vit_small", 4, 32, 21_338_496),
])
def test_parameter_counts(name, patch, image_size, count):
  build = lambda: models.build_encoder(name, 64, rngs=nnx.Rngs(0), patch=patch, image_size=image_size)
  assert n_params(build) == count


def test_attention_matches_numpy():
  """softmax(Q K^T / sqrt(d)) V per head, heads concatenated, then the output projection; Q, K, V cut from the qkv
  kernel as timm's reshape (3, heads, d)."""
  attention = Attention(8, 2, jnp.float32, rngs=nnx.Rngs(1))
  x = np.random.default_rng(0).normal(size=(2, 5, 8)).astype(np.float32)
  w, b = np.asarray(attention.qkv.kernel[...], np.float64), np.asarray(attention.qkv.bias[...], np.float64)
  q, k, v = np.moveaxis((x @ w + b).reshape(2, 5, 3, 2, 4), 2, 0)  # each [B, N, heads, d]
  logits = np.einsum("bqhc,bkhc->bhqk", q, k) / np.sqrt(4)
  weights = np.exp(logits - logits.max(-1, keepdims=True))
  weights /= weights.sum(-1, keepdims=True)
  heads = np.einsum("bhqk,bkhc->bqhc", weights, v).reshape(2, 5, 8)
  expected = heads @ np.asarray(attention.proj.kernel[...]) + np.asarray(attention.proj.bias[...])
  np.testing.assert_allclose(nnx.jit(lambda m, x: m(x))(attention, x), expected, rtol=1e-5, atol=1e-5)


@nnx.jit
def _forward_and_by_hand(model, mean_model, x):
  """Both models' outputs, and the blocks' outputs and both poolings recomputed from the model's parts."""
  tokens = model.patch_embed(x).reshape(x.shape[0], 16, 8)
  h = jnp.concatenate([tokens[:, :1] * 0 + model.cls_token[...], tokens], 1) + model.pos_embed[...]
  blocks = []
  for block in model.blocks:
    h = block(h)
    blocks.append(h)
  return model(x), mean_model(x)[0], blocks, model.norm(h[:, 0]), model.norm(h[:, 1:].mean(1))


def test_taps_are_the_patch_tokens_and_pooling_on_8_devices():
  """Each tap is its block's output without the class token, on the 4x4 grid; 'cls' pools the class token,
  'mean' the patch tokens' mean, both through the final LayerNorm (same parameters for the same seed). The batch
  is split over 8 devices (the class token joins data-sharded patch tokens). The sharded SimCLR step against the
  single-device one is the extended test below."""
  mesh = jax.make_mesh((8,), ("data",))
  x = np.random.default_rng(0).normal(size=(8, 16, 16, 3)).astype(np.float32)
  model = tiny_vit("cls")
  with jax.set_mesh(mesh):
    outputs = _forward_and_by_hand(model, tiny_vit("mean"), jax.device_put(x, jax.NamedSharding(mesh, jax.P("data"))))
  (feature, taps), mean_feature, blocks, cls_pooled, mean_pooled = jax.device_get(outputs)
  assert model.tap_names == tuple(taps) == ("block1", "block2") and feature.shape == (8, 8)
  for name, h in zip(model.tap_names, blocks):
    assert taps[name].shape == (8, 4, 4, 8)
    np.testing.assert_allclose(taps[name], h[:, 1:].reshape(8, 4, 4, 8), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(feature, cls_pooled, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(mean_feature, mean_pooled, rtol=1e-5, atol=1e-6)
  assert not np.allclose(feature, mean_feature)


@pytest.mark.parametrize("overrides, message", [
    (("model.vit.pool=max",), "unknown ViT pooling 'max'; set config.model.vit.pool to one of cls, mean"),
    (("model.vit.patch=5",), "config.model.vit.patch=5 does not divide config.model.vit.image_size=32"),
    (("model.vit.patch=0",), "config.model.vit.patch=0 does not divide"),
    (("model.vit.image_size=64",), r"config.model.vit.image_size=64 differs from config.data.image_size=32; set "
     r"--config.model.vit.image_size=32"),
])
def test_bad_vit_options_are_one_line(overrides, message):
  cfg = config("simclr:tiny", "model.name=vit_tiny", *overrides)
  with pytest.raises(UserError, match=message):
    validation.check(cfg)
  if "image_size" in overrides[0]:
    validation.check(config("simclr:tiny", *overrides))  # a ResNet takes any image size


def test_vit_recipe_config_argument():
  recipe = config("simclr:encoder=vit_tiny,quick")
  assert recipe.model.name == "vit_tiny"
  assert (recipe.pretrain.optim.name, recipe.pretrain.optim.weight_decay, recipe.pretrain.optim.schedule) == (
      "adamw", 0.05, "cosine")
  assert config("byol:encoder=vit_small").pretrain.optim.lr == pytest.approx(1.5e-4)  # batch 256
  assert config("simclr:quick", "model.name=vit_tiny").pretrain.optim.name == "adam"  # the method's own
  assert config("moco:encoder=vit_tiny,tiny").model.name == "vit_tiny"


@pytest.mark.extended  # 20-30 s on 2 cores (two compiles of the whole step, augmentation included)
def test_sharded_simclr_step_equals_single_device():
  """Two SimCLR steps (SGD) of a tiny ViT with SimCLR's head, batch 16 of 16x16 images, on 8 devices and on 1."""
  cfg = config("simclr:tiny")
  cfg.pretrain.optim.update(name="sgd", lr=0.05, momentum=0.9)
  tx = make_optimizer(cfg.pretrain.optim)
  build = lambda: models.SSLModel(tiny_vit(), 0, 8, rngs=nnx.Rngs(0))
  images = np.random.default_rng(0).integers(0, 256, (32, 16, 16, 3), dtype=np.uint8)
  results = []
  for mesh in (jax.make_mesh((1,), ("data",), devices=jax.devices()[:1]), jax.make_mesh((8,), ("data",))):
    graphdef, state = create_state(build, tx, mesh)
    dataset = DeviceDataset({"image": images}, mesh, batch_size=16, seed=0)
    step = jax.jit(simclr.make_step(graphdef, tx, cfg), donate_argnums=0)
    losses = []
    with jax.set_mesh(mesh):
      for i in range(2):
        state, metrics = step(state, dataset.batch(i), jax.random.key(3))
        losses.append(float(metrics["loss"]))
    results.append((losses, jax.device_get(state.params)))
  (losses_1, params_1), (losses_8, params_8) = results
  assert all(np.isfinite(losses_8)) and losses_8[0] != losses_8[1]
  np.testing.assert_allclose(losses_8, losses_1, rtol=1e-4)
  assert_trees_close(params_8, params_1)
