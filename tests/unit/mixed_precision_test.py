"""Mixed precision (config.model.dtype): bfloat16 convolutions and matmuls on float32 parameters, float32 outputs,
optimiser state and BatchNorm statistics; every training step in bfloat16 against float32 on the same state and
batch, and the sharded bfloat16 step against the single-device one."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from helpers import assert_trees_close, config
from jaxpurify import experiments, finetune, models, parallel, validation
from jaxpurify.errors import UserError

# One config per distinct training step (its experiment's `bench_step`, on synthetic images). CTRL's pre-training
# is the SimCLR step on a poisoned set, T-Core's expansion runs the confusion step. They run with `pytest -m
# extended` (7-23 s each on 2 cores), as the sharded bfloat16 test; the default run checks the models' dtypes.
STEPS = {
    "simclr": "simclr:tiny",
    "simclr_vit": "simclr:encoder=vit_tiny,tiny",
    "moco": "moco:tiny",
    "byol": "byol:tiny",
    "badencoder": "badencoder:tiny",
    "drupe": "drupe:tiny",
    "distill": "distill:tiny",
    "ft_all": "threat:threat=2,attack=badnets,tiny",
    "confusion": "tcore:threat=2,attack=badnets,tiny",
}


def _sgd(node) -> None:
  """Every optimiser block of a config (unlocked) as plain SGD at a constant rate: one step's update is then −lr ×
  the gradient, which compares across dtypes (Adam's first update is ±lr whatever the gradient's size)."""
  for value in node.values():
    if hasattr(value, "items"):
      if "name" in value and "lr" in value:
        value.name = "sgd"
        for field, plain in (("momentum", 0.0), ("weight_decay", 0.0), ("schedule", "constant"),
                             ("warmup_epochs", 0)):
          if field in value:
            value[field] = plain
      _sgd(value)


@functools.cache
def one_step(name_arg: str, dtype: str, devices: int):
  """(loss, update of the parameters, state after the step, the step's HLO text) of one SGD step of the config's
  training step on `devices` devices (made once per module: two tests read the single-device bfloat16
  distillation step)."""
  cfg = config(name_arg, f"model.dtype={dtype}")
  with cfg.unlocked():
    _sgd(cfg)
  mesh = jax.make_mesh((devices,), ("data",), devices=jax.devices()[:devices])
  with jax.set_mesh(mesh):
    state, step, batch_fn, _, _ = experiments.module(cfg.experiment).bench_step(cfg, mesh)
    before = jax.tree.map(np.asarray, state.params)
    key = jax.device_put(jax.random.key(0), parallel.replicated(mesh))
    hlo = step.lower(state, batch_fn(0), key).as_text()
    state, metrics = step(state, batch_fn(0), key)
  update = jax.tree.map(lambda a, b: np.asarray(a, np.float64) - b, state.params, before)
  return float(metrics["loss"]), update, state, hlo


def _flat(tree) -> np.ndarray:
  return np.concatenate([np.ravel(leaf) for leaf in jax.tree.leaves(tree)])


@pytest.mark.extended
@pytest.mark.parametrize("name", sorted(STEPS))
def test_bfloat16_step_against_float32(name):
  """The same step in float32 and bfloat16 from the same initial state and batch.

  bfloat16 keeps 8 significant bits (unit roundoff 2^-8 ≈ 0.4%); the losses reduce in float32 on float32 model
  outputs, so the loss moves by a few roundoffs (< 1%). The gradient is another matter at initialisation: an
  untrained encoder maps all images to nearly the same feature, so the contrastive and cross-entropy gradients are
  small differences of near-equal terms and the 0.4% input error becomes 5% at the head and 20-35% in the first
  layers (measured on the quick SimCLR step; cosine 0.95-0.99). The test bounds the direction (cosine > 0.9) and
  the size (within 50%): a loss or step broken by the dtype is far off either."""
  loss32, update32, _, _ = one_step(STEPS[name], "float32", 1)
  loss16, update16, state16, hlo16 = one_step(STEPS[name], "bfloat16", 1)
  assert "bf16" in hlo16 and "convolution" in hlo16
  assert loss16 != loss32  # bfloat16 was in effect
  assert abs(loss16 - loss32) <= 1e-2 * abs(loss32)
  a, b = _flat(update32), _flat(update16)
  assert a @ b / (np.linalg.norm(a) * np.linalg.norm(b)) > 0.9
  assert 0.5 < np.linalg.norm(b) / np.linalg.norm(a) < 1.5
  leaves = jax.tree.leaves((state16.params, state16.batch_stats, state16.opt_state))
  assert {leaf.dtype for leaf in leaves if jnp.issubdtype(leaf.dtype, jnp.floating)} == {jnp.dtype(jnp.float32)}


@pytest.mark.extended  # 13-29 s
def test_sharded_bfloat16_step_equals_single_device():
  """The distillation step (student SSL loss, attention transfer on the taps, a frozen teacher) on 8 devices against
  1, both bfloat16. Float32 runs of the two agree to ~1e-5 (helpers.assert_trees_close): other shard sizes pick other
  kernels, and the near-cancelling gradients at initialisation amplify last-bit differences ~100-fold. bfloat16's
  last bit is 2^16 times float32's, so the same amplification leaves updates ~13% apart as a whole (measured;
  20% for single arrays), while BatchNorm's statistics (no cancellation) agree to 6e-4. The test holds the
  statistics to 1e-2, the loss to 1%, and the update's direction (cosine > 0.95) and size (within 10%): a
  sharding bug (statistics per device, a missing all-reduce) moves these by O(1)."""
  loss1, update1, state1, _ = one_step(STEPS["distill"], "bfloat16", 1)
  loss8, update8, state8, _ = one_step(STEPS["distill"], "bfloat16", 8)
  assert abs(loss8 - loss1) <= 1e-2 * abs(loss1)
  assert_trees_close(state8.batch_stats, state1.batch_stats, rtol=1e-2)
  a, b = _flat(update8), _flat(update1)
  assert a @ b / (np.linalg.norm(a) * np.linalg.norm(b)) > 0.95
  assert 0.9 < np.linalg.norm(a) / np.linalg.norm(b) < 1.1


def test_models_compute_in_bfloat16_and_return_float32():
  """Parameters and BatchNorm statistics float32, every output (feature, taps, projection, logits) float32, the
  convolutions bfloat16 (float32 ones under model.dtype=float32)."""
  head = config("simclr:tiny").pretrain.head
  images = jax.ShapeDtypeStruct((2, 32, 32, 3), jnp.float32)

  def lowered(dtype: str):
    ssl = models.build_ssl_model(config("simclr:tiny", f"model.dtype={dtype}").model, head, 0)
    classifier = finetune.Classifier(ssl.backbone, 10, rngs=nnx.Rngs(0))
    graphdefs, states = zip(*(nnx.split(model) for model in (ssl, classifier)))
    forward = jax.jit(lambda s, x: [nnx.merge(g, st)(x) for g, st in zip(graphdefs, s)])
    return states, jax.eval_shape(forward, states, images), forward.lower(states, images).as_text()

  states, (ssl_out, logits), hlo = lowered("bfloat16")
  feature, projection, taps = ssl_out
  assert {x.dtype for x in (feature, projection, *taps.values(), logits)} == {jnp.dtype(jnp.float32)}
  assert {leaf.dtype for leaf in jax.tree.leaves(states)} == {jnp.dtype(jnp.float32)}
  assert "convolution" in hlo and "bf16" in hlo
  assert "bf16" not in lowered("float32")[2]


def test_vit_computes_in_bfloat16_near_float32():
  """A tiny ViT (2 blocks, D 8, 16x16 images) with bfloat16 matmuls on the float32 parameters of the float32 one:
  float32 parameters, feature and taps, within bfloat16's precision of the float32 model's."""
  x = np.random.default_rng(0).normal(size=(2, 16, 16, 3)).astype(np.float32)
  vits = [models.ViT(2, 2, 4, patch=4, image_size=16, dtype=dtype, rngs=nnx.Rngs(0))
          for dtype in (jnp.float32, jnp.bfloat16)]
  forward = nnx.jit(lambda vits, x: [vit(x) for vit in vits])
  (f32, taps32), (b16, taps16) = forward(vits, x)
  assert "bf16" in forward.lower(vits, x).lowered.as_text()
  assert {t.dtype for t in (b16, *taps16.values())} == {jnp.dtype(jnp.float32)}
  assert {leaf.dtype for leaf in jax.tree.leaves(nnx.state(vits[1]))} == {jnp.dtype(jnp.float32)}
  np.testing.assert_allclose(b16, f32, rtol=5e-2, atol=5e-2)
  np.testing.assert_allclose(taps16["block2"], taps32["block2"], rtol=5e-2, atol=5e-2)
  assert not np.array_equal(b16, f32)


def test_auto_is_float32_on_cpu_and_bfloat16_on_accelerators(monkeypatch):
  assert models.compute_dtype("auto") == jnp.float32
  assert models.compute_dtype("bfloat16") == jnp.bfloat16
  for backend in ("gpu", "tpu"):
    monkeypatch.setattr(jax, "default_backend", lambda backend=backend: backend)
    assert models.compute_dtype("auto") == jnp.bfloat16


@pytest.mark.parametrize("key", ["model.dtype", "poison.issba.dtype", "poison.input_aware.model.dtype"])
def test_unknown_dtype_is_one_line(key):
  cfg = config("threat:threat=2,attack=badnets,tiny", f"{key}=float16")
  with pytest.raises(UserError, match=f"set config.{key} to one of auto, float32, bfloat16"):
    validation.check(cfg)
