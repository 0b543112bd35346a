"""DECREE: the tanh trigger maps and the loss against NumPy formulas, the lambda bookkeeping against a line-by-line
transcription of the official loop, the inversion finding a planted patch on a toy encoder (and no small trigger
on a toy without one), and bad input; `-m extended`: the step on 8 devices against 1 on a tiny ResNet, and `detect`
end to end with its stage reused."""

import json
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from helpers import assert_trees_close
from helpers import config as load_config
from jaxpurify import parallel, stages, validation
from jaxpurify.defenses.encoder import decree
from jaxpurify.encoders import build_backbone
from jaxpurify.errors import UserError
from jaxpurify.pipeline import Run

SIZE, DIM, PATCH = 8, 16, 2  # toy images 8 x 8, embeddings 16 wide, the planted patch 2 x 2 in the bottom right


def _block(**overrides):
  """The official defaults (configs/baseline.py) at toy size."""
  block = load_config("baseline:defense=decree,attack=badencoder,quick").baseline.decree.to_dict()
  return ml_collections.ConfigDict({**block, "shadow_images": 64, "batch_size": 64, "epochs": 400, **overrides})


def _toy_embed(planted: bool):
  """embed(frozen, x): a random linear map of x - 0.5; with `planted`, gated towards the fixed point frozen['c']
  as the bottom-right 2 x 2 patch turns bright (sigmoid(8 (patch mean - 0.6)))."""

  def embed(frozen, x):
    flat = (x - 0.5).reshape(x.shape[0], -1) @ frozen["A"]
    if not planted:
      return flat
    gate = jax.nn.sigmoid(8.0 * (jnp.mean(x[:, -PATCH:, -PATCH:, :], axis=(1, 2, 3)) - 0.6))[:, None]
    return (1 - gate) * flat + gate * frozen["c"]

  return embed


def _toy_frozen(seed=0):
  rng = np.random.default_rng(seed)
  return {"A": jnp.asarray(rng.normal(size=(SIZE * SIZE * 3, DIM)) / np.sqrt(SIZE * SIZE * 3 / 6), jnp.float32),
          "c": jnp.asarray(rng.normal(size=DIM), jnp.float32)}


def test_trigger_maps_are_the_tanh_squash_and_its_inverse():
  rng = np.random.default_rng(0)
  params = {"mask": rng.normal(0, 2, (4, 5)).astype(np.float32), "pattern": rng.normal(0, 2, (4, 5, 3)).astype(
      np.float32)}
  mask, pattern = decree.trigger_from_params(params)
  squash = lambda p: np.clip(np.tanh(p.astype(np.float64)) / (2 - 1e-6) + 0.5, 0, 1)
  np.testing.assert_allclose(mask, squash(params["mask"]), atol=1e-6)
  np.testing.assert_allclose(pattern, squash(params["pattern"]), atol=1e-6)
  wanted_mask, wanted_pattern = rng.uniform(0.01, 0.99, (4, 5)), rng.uniform(0.01, 0.99, (4, 5, 3))
  back = decree.trigger_from_params(decree.params_from_trigger(wanted_mask, wanted_pattern))
  np.testing.assert_allclose(back[0], wanted_mask, atol=1e-5)
  np.testing.assert_allclose(back[1], wanted_pattern, atol=1e-5)
  corners = decree.params_from_trigger(np.array([[0.0, 1.0]]), np.zeros((1, 2, 3)))  # the official init's range
  assert np.all(np.isfinite(corners["mask"])) and np.all(np.isfinite(corners["pattern"]))


def test_loss_is_one_minus_the_mean_off_diagonal_cosine_plus_lambda_times_the_channel_l1():
  rng = np.random.default_rng(1)
  params = {"mask": rng.normal(size=(SIZE, SIZE)).astype(np.float32),
            "pattern": rng.normal(size=(SIZE, SIZE, 3)).astype(np.float32)}
  x = rng.uniform(size=(6, SIZE, SIZE, 3)).astype(np.float32)
  weights = rng.normal(size=(SIZE * SIZE * 3, DIM)).astype(np.float32)
  embed = lambda v: v.reshape(v.shape[0], -1) @ weights
  loss, aux = decree.decree_loss(params, embed, jnp.asarray(x), 0.01)
  mask = np.tanh(params["mask"].astype(np.float64)) / (2 - 1e-6) + 0.5
  pattern = np.tanh(params["pattern"].astype(np.float64)) / (2 - 1e-6) + 0.5
  stamped = np.clip((1 - mask[..., None]) * x + mask[..., None] * pattern, 0, 1)
  z = stamped.reshape(6, -1) @ weights
  unit = z / np.linalg.norm(z, axis=1, keepdims=True)
  gram = unit @ unit.T
  similarity = gram[~np.eye(6, dtype=bool)].mean()
  l1 = np.abs(np.repeat(mask[..., None], 3, -1)).sum()
  assert float(aux["similarity"]) == pytest.approx(similarity, abs=2e-5)
  assert float(aux["l1"]) == pytest.approx(l1, rel=1e-5)
  assert float(loss) == pytest.approx(1 - similarity + 0.01 * l1, abs=1e-4)
  assert decree.pl1_norm(np.pad(np.ones((2, 2)), ((6, 0), (6, 0)))) == pytest.approx(4 / 64)


def _official_schedule(similarities, l1s, block):
  """main.py's per-step bookkeeping, transcribed statement by statement in Python floats -> per step (lambda used,
  lambda after, best l1, early-stop count)."""
  lam, best, stop_best, stop_cnt = block.init_lambda, 1 / 1e-7, 1 / 1e-7, 0
  up = down = set_cnt = 0
  out = []
  for cos, reg in zip(similarities, l1s):
    used = lam
    if abs(-cos) > block.similarity_threshold and reg < best:
      best = reg
    if best < 1 / 1e-7:
      stop_cnt = stop_cnt + 1 if best >= stop_best else 0
    stop_best = min(best, stop_best)
    if lam < block.lambda_min and abs(-cos) > block.similarity_threshold:
      set_cnt += 1
      if set_cnt > 2 * block.patience:
        lam, up, down = block.init_lambda, 0, 0
    else:
      set_cnt = 0
    if abs(-cos) > block.similarity_threshold:
      up, down = up + 1, 0
    else:
      up, down = 0, down + 1
    if up > block.patience:
      if lam < 1e5:
        lam *= block.lambda_factor
      up = 0
    elif down > block.patience:
      if lam >= block.lambda_min:
        lam /= block.lambda_factor
      down = 0
    out.append((used, lam, best if best < 1 / 1e-7 else np.inf, stop_cnt))
  return out


def test_lambda_bookkeeping_follows_the_official_loop():
  block = _block()
  rng = np.random.default_rng(2)
  # failure runs long enough to push lambda under lambda_min (and reset it), success runs to raise it again
  pattern = [0] * 40 + [1] * 20 + [0] * 7 + [1] * 30 + [0, 1] * 5 + [1] * 12
  similarities = np.where(np.array(pattern) == 1, 0.995, 0.9)
  l1s = rng.uniform(5, 50, len(pattern))
  extra = {"lam": jnp.float32(block.init_lambda), "up": 0, "down": 0, "reset": 0, "best_l1": jnp.float32(np.inf),
           "best_mask": jnp.zeros((2, 2)), "best_pattern": jnp.zeros((2, 2, 3)), "stop_count": 0,
           "stop_best": jnp.float32(np.inf)}
  adapt = jax.jit(lambda e, s, l1: decree.adapt(e, s, l1, jnp.full((2, 2), l1), jnp.zeros((2, 2, 3)), block))
  ours = []
  for s, l1 in zip(similarities, l1s):
    used = float(extra["lam"])
    extra = adapt(extra, jnp.float32(s), jnp.float32(l1))
    ours.append((used, float(extra["lam"]), float(extra["best_l1"]), int(extra["stop_count"])))
  official = _official_schedule(similarities, l1s.astype(np.float32), block)
  np.testing.assert_allclose(np.array(ours), np.array(official), rtol=1e-5)
  lams = np.array(official)[:, 1]
  assert lams.min() < block.lambda_min and lams.max() > block.init_lambda  # both ends of the schedule ran
  assert float(extra["best_mask"][0, 0]) == pytest.approx(float(extra["best_l1"]))  # the mask kept with its l1


def test_inversion_finds_the_planted_patch_and_no_small_trigger_without_one():
  images = np.random.default_rng(3).integers(0, 256, (64, SIZE, SIZE, 3), np.uint8)
  mesh, frozen, block = parallel.make_mesh(), _toy_frozen(), _block(lrs=(0.5,), lr_epochs=())
  planted = decree.invert(_toy_embed(True), frozen, images, block, mesh, seed=0)
  clean = decree.invert(_toy_embed(False), frozen, images, block, mesh, seed=0)
  assert planted["found"] and planted["score"] < PATCH * PATCH / SIZE ** 2 < block.threshold
  assert planted["mask"][-PATCH:, -PATCH:].sum() > 0.8 * planted["mask"].sum()
  assert planted["pattern"][-PATCH:, -PATCH:].mean() > 0.6  # bright: the gate opens on it
  assert clean["score"] > 0.3 and clean["similarity"] > block.similarity_threshold
  for result in (planted, clean):
    assert result["stopped_early"] and result["epochs"] < block.epochs and result["batch_size"] == 64
  # A smoke run's step cap ends the search after the whole epochs that reach it (1 step an epoch here).
  capped = decree.invert(_toy_embed(True), frozen, images, block, mesh, seed=0, max_steps=3)
  assert capped["epochs"] == capped["steps"] == 3 and not capped["stopped_early"]
  assert [stages.capped_epochs(m, 1000, 5) for m in (0, 3, 5, 12)] == [1000, 1, 1, 3]
  assert stages.capped_epochs(30, 2, 5) == 2


def test_bad_settings_fail_in_one_line():
  config = load_config("baseline:defense=decree,attack=badencoder,tiny")
  decree.check(config.baseline.decree, config)
  for key, value, message in (("patience", 0, "patience must be an integer of at least 1"),
                              ("lambda_factor", 1.0, "lambda_factor must be above 1"),
                              ("similarity_threshold", 1.0, r"similarity_threshold must be in \(0, 1\)"),
                              ("lr_epochs", (30,), "needs one lr more than lr_epochs")):
    bad = load_config("baseline:defense=decree,attack=badencoder,tiny", f"baseline.decree.{key}={value}")
    with pytest.raises(UserError, match=message) as err:
      decree.check(bad.baseline.decree, bad)
    assert "\n" not in str(err.value)
  bad = load_config("baseline:defense=decree,attack=badencoder,tiny", "baseline.decree.threshold=0.0")
  with pytest.raises(UserError, match="config.baseline.decree.threshold must be a number above 0"):
    validation.check_ranges(bad)
  assert decree.batching(1000, 256, 8) == (4, 248)
  with pytest.raises(UserError, match="at least 2 shadow images per batch over the 8 devices, got 7 images"):
    decree.batching(7, 256, 8)


MODEL = ml_collections.ConfigDict(dict(name="resnet10", width=4, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25),
                                       dtype="float32"))


@pytest.mark.extended  # a ResNet trigger step compiled on 1 and 8 devices (~10 s)
def test_step_on_eight_devices_equals_one_device():
  encoder = build_backbone(MODEL, 0)
  images = np.random.default_rng(4).integers(0, 256, (16, 16, 16, 3), np.uint8)
  block, embed = _block(batch_size=16), decree.encoder_embed(encoder.graphdef, MODEL)
  out = []
  for mesh in (jax.make_mesh((1,), ("data",), devices=jax.devices()[:1]), parallel.make_mesh()):
    frozen = parallel.put_replicated({"params": encoder.params, "batch_stats": encoder.batch_stats}, mesh)
    state = decree.init_state(jax.random.key(0), images.shape[1:], block, 1, mesh)
    x = parallel.put_batch(images, mesh)
    grads = jax.jit(jax.grad(lambda p, x: decree.decree_loss(
        p, lambda v: embed(frozen, v), x.astype(jnp.float32) / 255, 1e-3)[0]))(state.params, x)
    step = jax.jit(decree.make_step(embed, block, 1), donate_argnums=0)
    state, metrics = step(state, {"image": x, "frozen": frozen}, jax.random.key(0))
    out.append((jax.device_get(grads), jax.device_get(metrics), jax.device_get(state.extra)))
  (grads_1, metrics_1, extra_1), (grads_8, metrics_8, extra_8) = out
  assert_trees_close(grads_8, grads_1)
  for name in ("loss", "similarity", "l1", "l2_grads"):
    assert metrics_8[name] == pytest.approx(metrics_1[name], rel=1e-4), name
  assert_trees_close({k: extra_8[k] for k in ("lam", "up", "down")}, {k: extra_1[k] for k in ("lam", "up", "down")})


@pytest.mark.extended  # a ResNet inversion for a few epochs (~15 s)
def test_detect_writes_its_verdict_and_trigger_and_reuses_its_stage(tmp_path, monkeypatch):
  config = load_config("baseline:defense=decree,attack=badencoder,tiny", "baseline.decree.epochs=3",
                       "baseline.decree.shadow_images=32", "baseline.decree.batch_size=16")
  mesh = parallel.make_mesh()
  encoder = build_backbone(config.model, 0)
  images = np.random.default_rng(5).integers(0, 256, (40, 32, 32, 3), np.uint8)
  run = Run(config, str(tmp_path))
  record = decree.detect(run, "decree_detect_clean", config.baseline.decree, config, encoder, images, mesh)
  assert record["shadow_images"] == 32 and record["steps"] == 2 * record["epochs"]
  assert record["flagged"] == (record["score"] < config.baseline.decree.threshold)
  folder = run.stage_dir("decree_detect_clean")
  mask = np.load(os.path.join(folder, "mask.npy"))
  assert mask.shape == (32, 32) and np.load(os.path.join(folder, "pattern.npy")).shape == (32, 32, 3)
  assert record["score"] == (pytest.approx(decree.pl1_norm(mask), abs=1e-6) if record["found"] else 1.0)
  with open(os.path.join(folder, "history.json"), encoding="utf-8") as f:
    assert len(json.load(f)) == record["epochs"]
  monkeypatch.setattr(decree, "invert", lambda *a, **k: pytest.fail("a finished detection ran again"))
  assert decree.detect(run, "decree_detect_clean", config.baseline.decree, config, encoder, images, mesh) == record
