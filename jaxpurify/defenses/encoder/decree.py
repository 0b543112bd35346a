"""DECREE: Detecting Backdoors in Pre-trained Encoders (Feng et al., CVPR 2023; baselines.md 3.4), label-free.

A backdoored encoder maps every input carrying its trigger to (nearly) one embedding, so a small trigger that
collapses the shadow images exists. DECREE inverts one: a mask M [H, W] in [0, 1] (shared over the channels) and a
pattern P [H, W, 3] in [0, 1], both tanh-parametrised (`trigger_from_params`), stamped as (1 - M) x + M P on the
images in [0, 1] before the encoder's normalisation (`stamp`), minimising (`decree_loss`)
  1 - mean pairwise cosine similarity of the stamped images' embeddings + lambda * ||M||_1
(||M||_1 over the [H, W, 3] broadcast mask, as the official code sums it). lambda adapts every step: it starts at
init_lambda; after more than `patience` consecutive steps with similarity above similarity_threshold it is
multiplied by lambda_factor (while below 1e5), after more than `patience` below it divided (while >= lambda_min);
after more than 2 * patience successful steps with lambda below lambda_min it is reset to init_lambda. Once the
similarity exceeds the threshold, the smallest mask so far is kept; the search stops at the end of an epoch whose
mean similarity is above the threshold when the kept mask has not shrunk for more than stop_patience steps, or
after `epochs`. The score is its PL1-norm ||M||_1 / (H W) (`pl1_norm`): the encoder is flagged trojaned when it is
below `threshold`. No trigger above the similarity threshold at all scores 1 (the whole image).

Source: GiantSeaweed/DECREE main.py (the loop, the lambda schedule, the early stop, utils.compute_self_cos_sim,
epsilon() in the tanh maps) and run_decree.py (lr 0.5, mask_init 'rand'). Defaults (configs/baseline.py): shadow
images 1000 (the official shadow set: 10% of the CIFAR-10 test set; here the first of the defender's subset), batch
256 (main.py; run_decree.py's run() passes 128), Adam betas (0.5, 0.9), lr 0.5 for the first 30 epochs, 0.1 to
epoch 50, then 0.05 (run_decree.py's lr and main.py's adjust_learning_rate for CIFAR-10/STL-10 encoders; ImageNet
and CLIP use epochs 200 and 500), at most 1000 epochs, similarity threshold 0.99 (main.py --thres), lambda 1e-3,
factor 5, patience 5, lambda_min 1e-5 and early-stop patience 2 * 5 steps (CIFAR-10/STL-10; 1e-7 and 7 * 5 for
ImageNet and CLIP); quick: 60 epochs. The PL1-norm threshold 0.1 is the paper's cut-off as we read it; the
released code and README leave the verdict to the reader of the L1-norm main.py prints, and a public reproduction
of the paper's figures draws its line at 0.1 too. The PL1-norm is of the [H, W] mask (the official L1 over
[H, W, 3] divided by 3 H W).

Mitigation: DECREE only detects; "use its inverted trigger where a mitigation can" (baselines.md 3.4): `purify`
hands a flagged suspect's trigger to SSL-Cleanse's mitigator (its settings, config.baseline.ssl_cleanse: views
stamped with the trigger pulled to clean views of the same image) and leaves an encoder judged clean as it is,
as a defender acting on the verdict would.

Departures, and why: float32 instead of float64 (the tanh maps use epsilon 1e-6 instead of 1e-7, which float32
cannot tell from 0 next to 2); the mean pairwise cosine is computed from the sum of the normalised embeddings
((||sum z||^2 - sum ||z||^2) / (n (n - 1)), equal to the mean over the off-diagonal of the Gram matrix) so that no
n x n matrix spans the data-sharded batch; an epoch is ceil(N / batch_size) batches of equal size (a multiple of
the device count, so a few images sit out each epoch, another few each epoch) where the official loader ends
with a smaller last batch; success is similarity > threshold where the code tests |-similarity| > threshold (the
same for batches of 3 or more, whose mean cosine cannot reach -0.99); the images are the defender's (the
harness's subset) instead of a test split.
"""

import json
import math
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from jaxpurify import augment, parallel, stages
from jaxpurify.data.device import DeviceDataset
from jaxpurify.defenses.encoder import _ssl_cleanse_mitigate
from jaxpurify.errors import UserError
from jaxpurify.train.state import TrainState, apply_gradients

CLEAN_DATA = True
DETECT_STAGE = "decree_detect_poisoned"  # the harness's detection of the suspect, which `purify` reuses

EPSILON = 1e-6  # the official epsilon() is 1e-7 in float64; float32 needs 2 - EPSILON != 2
BETAS = (0.5, 0.9)  # main.py's Adam
LAMBDA_MAX = 1e5  # main.py: lambda grows only while below it


def check(block, config) -> None:
  """UserError for a DECREE block that cannot run (the names `validation`'s rules do not cover, and the lr
  schedule's shape); the numeric ranges of lr, lrs, epochs, batch_size and thresholds are the rules'."""
  del config
  if block is None:
    return
  positive_ints = ("shadow_images", "patience", "stop_patience")
  for name in positive_ints:
    value = block[name]
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
      raise UserError(f"config.baseline.decree.{name} must be an integer of at least 1, got {value!r}; fix "
                      f"--config.baseline.decree.{name}")
  for name, low in (("init_lambda", 0.0), ("lambda_min", 0.0), ("lambda_factor", 1.0)):
    if not block[name] > low:
      raise UserError(f"config.baseline.decree.{name} must be above {low:g}, got {block[name]!r}; fix "
                      f"--config.baseline.decree.{name}")
  if not 0 < block.similarity_threshold < 1:
    raise UserError(f"config.baseline.decree.similarity_threshold must be in (0, 1), got "
                    f"{block.similarity_threshold!r}; fix --config.baseline.decree.similarity_threshold")
  if len(block.lrs) != len(block.lr_epochs) + 1 or list(block.lr_epochs) != sorted(set(block.lr_epochs)):
    raise UserError(f"config.baseline.decree.lrs {tuple(block.lrs)} needs one lr more than lr_epochs "
                    f"{tuple(block.lr_epochs)} (increasing epochs where the next lr starts); fix "
                    "--config.baseline.decree.lrs or lr_epochs")


# ---------------------------------------------------------------------------------------------------------------
# The trigger, the stamp and the loss.


def trigger_from_params(params: dict) -> tuple[jax.Array, jax.Array]:
  """{'mask': float [H, W], 'pattern': float [H, W, 3]} (unbounded) -> (mask [H, W], pattern [H, W, 3]), each
  tanh(p) / (2 - EPSILON) + 0.5 clipped to [0, 1]."""
  squash = lambda p: jnp.clip(jnp.tanh(p) / (2 - EPSILON) + 0.5, 0.0, 1.0)
  return squash(params["mask"]), squash(params["pattern"])


def params_from_trigger(mask, pattern) -> dict:
  """The inverse of `trigger_from_params`: arctanh((v - 0.5) (2 - EPSILON)) of mask [H, W] and pattern [H, W, 3]
  in [0, 1]."""
  unsquash = lambda v: jnp.arctanh((jnp.asarray(v, jnp.float32) - 0.5) * (2 - EPSILON))
  return {"mask": unsquash(mask), "pattern": unsquash(pattern)}


def stamp(x: jax.Array, mask: jax.Array, pattern: jax.Array) -> jax.Array:
  """Images x float [B, H, W, 3] in [0, 1] -> (1 - mask) x + mask pattern, clipped to [0, 1]."""
  m = mask[..., None]
  return jnp.clip((1 - m) * x + m * pattern, 0.0, 1.0)


def mean_pairwise_cosine(z: jax.Array) -> jax.Array:
  """Embeddings [B, D] -> the mean cosine similarity over the B (B - 1) ordered pairs of distinct rows (rows
  normalised as torch's F.normalize, norm at least 1e-12)."""
  n = z.shape[0]
  z = z.astype(jnp.float32)
  unit = z / jnp.maximum(jnp.linalg.norm(z, axis=-1, keepdims=True), 1e-12)
  total = jnp.sum(unit, axis=0)
  return (jnp.sum(total * total) - jnp.sum(unit * unit)) / (n * (n - 1))


def mask_l1(mask: jax.Array) -> jax.Array:
  """||M||_1 of the mask broadcast over the 3 channels (the official loss_reg): 3 sum(mask [H, W])."""
  return 3 * jnp.sum(jnp.abs(mask))


def pl1_norm(mask) -> float:
  """DECREE's PL1-norm of a mask [H, W] in [0, 1]: ||M||_1 / (H W), the fraction of the image it covers."""
  mask = np.asarray(mask, np.float64)
  return float(np.abs(mask).sum() / mask.size)


def decree_loss(params: dict, embed, x: jax.Array, lam) -> tuple[jax.Array, dict]:
  """params (see trigger_from_params), embed: float [B, H, W, 3] in [0, 1] -> [B, D], x float [B, H, W, 3] in
  [0, 1], lam the L1 weight -> (1 - similarity + lam * l1, {'similarity', 'l1', 'mask', 'pattern'})."""
  mask, pattern = trigger_from_params(params)
  similarity = mean_pairwise_cosine(embed(stamp(x, mask, pattern)))
  l1 = mask_l1(mask)
  return 1 - similarity + lam * l1, {"similarity": similarity, "l1": l1, "mask": mask, "pattern": pattern}


# ---------------------------------------------------------------------------------------------------------------
# The optimisation: one jitted step (the trigger, Adam and the lambda bookkeeping in the state).


def learning_rate(block, steps_per_epoch: int):
  """-> step count -> lr: block.lrs[k] from epoch block.lr_epochs[k - 1] on (main.py's adjust_learning_rate)."""
  boundaries = np.asarray([e * steps_per_epoch for e in block.lr_epochs], np.int32)
  lrs = np.asarray(block.lrs, np.float32)
  return lambda count: jnp.asarray(lrs)[jnp.searchsorted(jnp.asarray(boundaries), count, side="right")]


def _optimizer(block, steps_per_epoch: int) -> optax.GradientTransformation:
  """Adam (betas 0.5, 0.9) on `learning_rate`'s schedule."""
  return optax.adam(learning_rate(block, steps_per_epoch), b1=BETAS[0], b2=BETAS[1])


def init_state(key: jax.Array, image_shape: tuple, block, steps_per_epoch: int, mesh) -> TrainState:
  """The state at step 0, replicated over `mesh`: mask [H, W] and pattern [H, W, 3] drawn uniformly in [0, 1]
  (the official mask_init 'rand'), their Adam state, and in `extra` the lambda bookkeeping (lam, the up, down and
  reset counters, the smallest l1 so far with its mask and pattern, the early-stop counter and its reference)."""
  h, w = image_shape[:2]
  tx = _optimizer(block, steps_per_epoch)

  def init():
    mask_key, pattern_key = jax.random.split(key)
    params = params_from_trigger(jax.random.uniform(mask_key, (h, w)), jax.random.uniform(pattern_key, (h, w, 3)))
    zero = jnp.zeros((), jnp.int32)
    extra = {"lam": jnp.asarray(block.init_lambda, jnp.float32), "up": zero, "down": zero, "reset": zero,
             "best_l1": jnp.asarray(jnp.inf, jnp.float32), "best_mask": jnp.zeros((h, w)),
             "best_pattern": jnp.zeros((h, w, 3)), "stop_count": zero,
             "stop_best": jnp.asarray(jnp.inf, jnp.float32)}
    return TrainState(step=zero, params=params, batch_stats={}, opt_state=tx.init(params), extra=extra)

  return jax.jit(init, out_shardings=parallel.replicated(mesh))()


def adapt(extra: dict, similarity, l1, mask, pattern, block) -> dict:
  """The official per-step bookkeeping after a step whose forward gave (similarity, l1, mask, pattern): the
  smallest successful mask, the early-stop counter, the lambda reset and the lambda up/down schedule."""
  e = dict(extra)
  success = similarity > block.similarity_threshold
  better = success & (l1 < e["best_l1"])
  e["best_l1"] = jnp.where(better, l1, e["best_l1"])
  e["best_mask"] = jnp.where(better, mask, e["best_mask"])
  e["best_pattern"] = jnp.where(better, pattern, e["best_pattern"])
  found = jnp.isfinite(e["best_l1"])
  stalled = e["best_l1"] >= e["stop_best"]
  e["stop_count"] = jnp.where(found, jnp.where(stalled, e["stop_count"] + 1, 0), e["stop_count"])
  e["stop_best"] = jnp.minimum(e["best_l1"], e["stop_best"])
  low = success & (e["lam"] < block.lambda_min)
  e["reset"] = jnp.where(low, e["reset"] + 1, 0)
  reset = low & (e["reset"] > 2 * block.patience)
  e["lam"] = jnp.where(reset, jnp.float32(block.init_lambda), e["lam"])
  e["up"] = jnp.where(success, jnp.where(reset, 0, e["up"]) + 1, 0)
  e["down"] = jnp.where(success, 0, jnp.where(reset, 0, e["down"]) + 1)
  up, down = e["up"] > block.patience, (e["up"] <= block.patience) & (e["down"] > block.patience)
  e["lam"] = jnp.where(up & (e["lam"] < LAMBDA_MAX), e["lam"] * block.lambda_factor, e["lam"])
  e["lam"] = jnp.where(down & (e["lam"] >= block.lambda_min), e["lam"] / block.lambda_factor, e["lam"])
  e["up"] = jnp.where(up, 0, e["up"])
  e["down"] = jnp.where(down, 0, e["down"])
  return e


def make_step(embed, block, steps_per_epoch: int):
  """-> step(state, batch, key) -> (state, metrics): one DECREE trigger step; pure, jit it with the state donated.

  embed(frozen, x) -> [B, D]: the frozen encoder's embeddings of float images x [B, H, W, 3] in [0, 1] (inference
  mode). batch: 'image' uint8 [B, H, W, 3] sharded along `data`, 'frozen' the encoder's arrays (replicated).
  metrics: loss, similarity, l1, lam (the weight this step used), lr and the health norms. No randomness: `key`
  is unused.
  """
  tx, lr = _optimizer(block, steps_per_epoch), learning_rate(block, steps_per_epoch)

  def step(state: TrainState, batch, key):
    del key
    x, frozen = augment.to_float(batch["image"]), batch["frozen"]
    lam = state.extra["lam"]
    grad_fn = jax.value_and_grad(lambda p: decree_loss(p, lambda v: embed(frozen, v), x, lam), has_aux=True)
    (loss, aux), grads = grad_fn(state.params)
    new, health = apply_gradients(state, tx, grads, {})
    extra = adapt(state.extra, aux["similarity"], aux["l1"], aux["mask"], aux["pattern"], block)
    return new.replace(extra=extra), {"loss": loss, "similarity": aux["similarity"], "l1": aux["l1"], "lam": lam,
                                      "lr": lr(state.step), **health}

  return step


def batching(num_images: int, batch_size: int, devices: int) -> tuple[int, int]:
  """-> (steps per epoch, batch): ceil(N / batch_size) batches of equal size, a multiple of `devices`; UserError
  when a batch would hold fewer than 2 images (DECREE compares pairs)."""
  steps = max(1, math.ceil(num_images / batch_size))
  batch = num_images // steps // devices * devices
  if batch < 2:
    raise UserError(f"DECREE needs at least 2 shadow images per batch over the {devices} devices, got {num_images} "
                    "images; raise config.defense.clean_fraction or config.baseline.decree.shadow_images")
  return steps, batch


def invert(embed, frozen, images: np.ndarray, block, mesh, seed: int, max_steps: int = 0) -> dict:
  """DECREE's trigger inversion on uint8 `images` [N, H, W, 3] (all of them; `detect` takes the first
  block.shadow_images) against embed(frozen, x) (see make_step) -> {'score' (the PL1-norm), 'found', 'l1',
  'similarity' (the last epoch's mean), 'epochs', 'stopped_early', 'lambda', 'steps', 'batch_size', 'mask' [H, W],
  'pattern' [H, W, 3] (host arrays: the smallest successful trigger, else the last one), 'history' (per epoch:
  similarity, l1, lambda)}. max_steps: a smoke run's cap (whole epochs, `stages.capped_epochs`)."""
  steps_per_epoch, batch_size = batching(len(images), block.batch_size, jax.device_count())
  dataset = DeviceDataset({"image": images}, mesh, batch_size, seed)
  state = init_state(jax.random.key(seed), images.shape[1:], block, steps_per_epoch, mesh)
  step = jax.jit(make_step(embed, block, steps_per_epoch), donate_argnums=0)
  key = jax.device_put(jax.random.key(seed), parallel.replicated(mesh))
  history, stopped, epoch = [], False, 0
  for epoch in range(1, stages.capped_epochs(max_steps, block.epochs, steps_per_epoch) + 1):
    sums = None
    for i in range(steps_per_epoch):
      batch = dataset.batch((epoch - 1) * steps_per_epoch + i) | {"frozen": frozen}
      state, metrics = step(state, batch, key)
      part = {k: metrics[k] for k in ("similarity", "l1")}
      sums = part if sums is None else jax.tree.map(jnp.add, sums, part)
    means = {k: float(v) / steps_per_epoch for k, v in jax.device_get(sums).items()}
    history.append({**means, "lambda": float(state.extra["lam"])})
    if means["similarity"] > block.similarity_threshold and int(state.extra["stop_count"]) > block.stop_patience:
      stopped = True
      break
  extra = jax.device_get(state.extra)
  found = bool(np.isfinite(extra["best_l1"]))
  if found:
    mask, pattern = np.asarray(extra["best_mask"]), np.asarray(extra["best_pattern"])
  else:
    mask, pattern = (np.asarray(a) for a in jax.device_get(trigger_from_params(state.params)))
  return {"score": pl1_norm(mask) if found else 1.0, "found": found,
          "l1": float(extra["best_l1"]) if found else None, "similarity": history[-1]["similarity"],
          "epochs": epoch, "stopped_early": stopped, "lambda": float(extra["lam"]),
          "steps": epoch * steps_per_epoch, "batch_size": batch_size, "mask": mask, "pattern": pattern,
          "history": history}


def encoder_embed(graphdef, model_config):
  """-> embed(frozen, x): the encoder (`frozen` = {'params', 'batch_stats'}) in inference mode on float images x
  [B, H, W, 3] in [0, 1], normalised with model_config.mean/std -> float32 features [B, D]."""
  mean, std = tuple(model_config.mean), tuple(model_config.std)

  def embed(frozen, x):
    model = nnx.merge(graphdef, jax.lax.stop_gradient(frozen["params"]), frozen["batch_stats"])
    feature, _ = model(augment.normalize(x, mean, std), train=False)
    return feature.astype(jnp.float32)

  return embed


def detect(run, stage: str, block, config, encoder, images: np.ndarray, mesh) -> dict:
  """DECREE's verdict on `encoder` from the first block.shadow_images of the defender's uint8 `images`
  [N, H, W, 3], kept in stage `stage` (its mask.npy and pattern.npy: the inverted trigger, in [0, 1]; history.json:
  per epoch) -> {'score': PL1-norm, 'flagged': score < block.threshold, 'similarity', 'epochs', ...}."""
  if (record := run.done(stage)) is not None:
    return record
  shadow = np.asarray(images[:block.shadow_images])
  tick = time.perf_counter()
  frozen = parallel.put_replicated({"params": encoder.params, "batch_stats": encoder.batch_stats}, mesh)
  result = invert(encoder_embed(encoder.graphdef, config.model), frozen, shadow, block, mesh, config.seed,
                  config.limits.max_steps)
  mask, pattern, history = result.pop("mask"), result.pop("pattern"), result.pop("history")
  directory = run.stage_dir(stage)
  if jax.process_index() == 0:
    np.save(os.path.join(directory, "mask.npy"), mask.astype(np.float32))
    np.save(os.path.join(directory, "pattern.npy"), pattern.astype(np.float32))
    with open(os.path.join(directory, "history.json"), "w", encoding="utf-8") as f:
      json.dump(history, f)
  record = {**result, "flagged": result["score"] < block.threshold, "threshold": block.threshold,
            "shadow_images": len(shadow), "seconds": round(time.perf_counter() - tick, 2)}
  return run.finish(stage, record)


def purify(run, block, config, suspect, images: np.ndarray, mesh, backdoor):
  """DECREE's verdict on the suspect (stage decree_detect_poisoned, the harness's), then, when it is flagged, its
  inverted trigger unlearned by SSL-Cleanse's mitigator with config.baseline.ssl_cleanse's settings (stage
  decree_mitigate); an encoder judged clean is used as it is -> (backbone, {'score', 'flagged', 'mitigated'})."""
  del backdoor  # monitors only
  detection = detect(run, DETECT_STAGE, block, config, suspect, images, mesh)
  if not detection["flagged"]:
    return suspect, {"score": detection["score"], "flagged": False, "mitigated": False}
  directory = run.stage_dir(DETECT_STAGE)
  mask, pattern = (np.load(os.path.join(directory, f"{name}.npy")) for name in ("mask", "pattern"))
  defended = _ssl_cleanse_mitigate.mitigate(run, "decree_mitigate", config.baseline.ssl_cleanse, config, suspect,
                                            images, mask[None, :, :, None], pattern[None], mesh)
  return defended, {"score": detection["score"], "flagged": True, "mitigated": True}
