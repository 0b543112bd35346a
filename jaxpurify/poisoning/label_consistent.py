"""Label-Consistent backdoor (Turner, Tsipras, Madry 2019): adversarial perturbation + the "all-corners" trigger.

A clean-label attack on target-class training images (labels kept; attacks.md 4.2):

1. `training`: jaxpurify trains its own adversarially robust classifier on the downstream training set (PGD
   adversarial training, Madry et al. 2018) -- BackdoorBench loads a separately supplied checkpoint instead
   (`resource/label-consistent/craft_adv_dataset.py`: ResNet-18, `resnet18_PGD_best_model.pth`).
2. `poison_images`: untargeted PGD against the true label on that model (eval mode), then rounding to uint8,
   then `all_corners_trigger`.
3. `test_trigger`: `all_corners_trigger` alone, at `test_amplitude`.

| Part | Default: full (quick) | Follows |
|---|---|---|
| classifier | `build_encoder` resnet18 width 64 (8) + `nnx.Linear`, CIFAR-10 mean/std | ResNet-18 of (a) |
| adversarial training | PGD ε 8/255, 7 steps of 2/255 (4 of 2.5/255), random start | Madry's CIFAR config (b) |
| its data, optimiser | crop (pad 4) + flip (none); SGD 0.1, momentum 0.9, wd 5e-4, cosine | choice (c) |
| its length | batch 128 (64), 100 (5) epochs | choice (c) |
| poisoning PGD | ε 8/255, step 1.5/255, 100 (20) steps, no random start, CE of the true label maximised | (a) |
| quantisation | round to nearest; `attack.quantize='truncate'`: (a)'s `(x * 255).type(torch.uint8)` | choice |
| trigger | 3×3 ±1 block in each corner, ± 255 · amplitude, clipped, truncated; amplitude 1, test 1 | (d) |

(a) BackdoorBench `resource/label-consistent/craft_adv_dataset.py`: `PGD(net, eps=8/255, alpha=1.5/255,
steps=100)` with the class's default `random_start=False`, `net.eval()`, inputs in [0, 1] without normalisation.
(b) Madry et al. 2018, `cifar10_challenge/config.json`: ε 8, 7 steps of 2, random start. (c) The common PyTorch
PGD-AT recipe (Madry's own: wd 2e-4, step decay, 80k steps). (d) BackdoorBench `utils/bd_img_transform/lc.py`
("all-corners", `reduced_amplitude` 1) + `npClipAndToUint8`, a port of MadryLab/label-consistent-backdoor-code,
whose `generate_poisoned_dataset.py` stamps the test set at the training amplitude; `trigger.test_amplitude` (default
equal) lets the test trigger differ.

BatchNorm during adversarial training: the PGD examples are crafted with the model in training mode (batch
statistics of the global batch, running averages of those passes discarded) and the model is then trained on them in
training mode (running averages updated once per step). Poisoning PGD uses the running averages (eval mode), as
BackdoorBench's `model.eval()`.
"""

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from jaxpurify import augment, parallel
from jaxpurify.data.device import DeviceDataset
from jaxpurify.errors import UserError
from jaxpurify.models import LinearClassifier, build_linear_classifier, check_name
from jaxpurify.poisoning import checks
from jaxpurify.train.state import (
  TrainState,
  apply_gradients,
  create_state,
  make_optimizer,
)

PREFIX = "config.poison.label_consistent"
QUANTIZE = ("round", "truncate")

# BackdoorBench's "all-corners" trigger (`lc.py`), top-left corner: rows 0..2, cols 0..2. The bottom-left corner is
# the same 3×3 block (not mirrored); both right corners are it mirrored left-right.
CORNER = np.array([[1, -1, -1],
                   [-1, 1, -1],
                   [1, -1, 1]], np.int8)


# ----------------------------------------------------------------------------------------------------------------
# Host-side checks


def _number(value, field: str, low: float | None = None, high: float | None = None) -> float:
  return checks.number(value, f"{PREFIX}.{field}", low, high)


def _integer(value, field: str, low: int) -> int:
  return checks.integer(value, f"{PREFIX}.{field}", low)


def _check_size(height: int, width: int) -> None:
  if height < 6 or width < 6:
    raise UserError(f"the all-corners trigger needs images of at least 6×6 (four disjoint 3×3 corners), got "
                    f"{height}×{width}; use a larger config.data.image_size")


def _check_pgd(block, field: str) -> None:
  _number(block.eps, f"{field}.eps", 0.0, 1.0)
  _number(block.step_size, f"{field}.step_size", 0.0, 1.0)
  _integer(block.steps, f"{field}.steps", 0)


def check_config(block, image_size: int) -> None:
  """Fails with one line naming `config.poison.label_consistent.<field>` on a bad value, before any training."""
  check_name(block.model.name, f"{PREFIX}.model.name")
  _integer(block.model.width, "model.width", 1)
  for field in ("mean", "std"):
    values = tuple(block.model[field])
    if len(values) != 3 or (field == "std" and min(values) <= 0):
      raise UserError(f"{PREFIX}.model.{field} needs 3 per-channel values{' > 0' if field == 'std' else ''}, got "
                      f"{values}; fix {PREFIX}.model.{field}")
  _integer(block.num_classes, "num_classes", 2)
  _check_pgd(block.adv_train, "adv_train")
  _check_pgd(block.attack, "attack")
  _integer(block.augment.padding, "augment.padding", 0)
  _number(block.augment.flip_prob, "augment.flip_prob", 0.0, 1.0)
  checks.auxiliary_training(block, PREFIX)
  if block.attack.quantize not in QUANTIZE:
    raise UserError(f"{PREFIX}.attack.quantize must be one of {', '.join(QUANTIZE)}, got "
                    f"{block.attack.quantize!r}; fix {PREFIX}.attack.quantize")
  _number(block.trigger.amplitude, "trigger.amplitude", 0.0, 1.0)
  _number(block.trigger.test_amplitude, "trigger.test_amplitude", 0.0, 1.0)
  _check_size(image_size, image_size)


# ----------------------------------------------------------------------------------------------------------------
# Trigger


def corner_pattern(height: int, width: int) -> np.ndarray:
  """int8 [H, W]: +1 / −1 on the four 3×3 corners of BackdoorBench's "all-corners" trigger, 0 elsewhere.

  Top-left and bottom-left corners are `CORNER`; top-right and bottom-right are `CORNER[:, ::-1]` (lc.py's list of
  36 ((row, col), ±1) entries, rows and cols counted from the end with negative indices on the right and bottom).
  """
  _check_size(height, width)
  pattern = np.zeros((height, width), np.int8)
  pattern[:3, :3] = pattern[-3:, :3] = CORNER
  pattern[:3, -3:] = pattern[-3:, -3:] = CORNER[:, ::-1]
  return pattern


def all_corners_trigger(images: jax.Array, amplitude: float = 1.0) -> jax.Array:
  """uint8 [B, H, W, 3] -> uint8: x' = uint8(clip(x + 255 · amplitude · p, 0, 255)), p = `corner_pattern`.

  Every channel of the 36 corner pixels gets ±255·amplitude; amplitude 1 saturates them to 255 / 0. Exactly
  BackdoorBench's `labelConsistentAttack("all-corners", amplitude).poison_from_indices` + `npClipAndToUint8`: the
  offset 255 · (p · amplitude) is a float64 product stored as float32, the sum is float32, the cast truncates.
  BackdoorBench resizes its 32×32 mask (nearest) for other sizes; here the 3×3 corners stay 3×3 at any size ≥ 6.
  amplitude is static, in [0, 1] (lc.py's assertion).
  """
  if images.dtype != jnp.uint8 or images.ndim != 4 or images.shape[-1] != 3:
    raise TypeError(f"all_corners_trigger expects uint8 images [B, H, W, 3], got {images.dtype} {images.shape}")
  amplitude = _number(amplitude, "trigger.amplitude", 0.0, 1.0)
  pattern = corner_pattern(int(images.shape[1]), int(images.shape[2])).astype(np.float64)
  offset = (255.0 * (pattern * amplitude)).astype(np.float32)[..., None]
  return jnp.clip(images.astype(jnp.float32) + offset, 0.0, 255.0).astype(jnp.uint8)


def test_trigger(block, state) -> Callable[[jax.Array], jax.Array]:
  """The test-time trigger: `all_corners_trigger` at `trigger.test_amplitude` (the model state is not needed)."""
  del state
  amplitude = _number(block.trigger.test_amplitude, "trigger.test_amplitude", 0.0, 1.0)
  return lambda images: all_corners_trigger(images, amplitude)


# ----------------------------------------------------------------------------------------------------------------
# PGD


def pgd(apply_fn: Callable[[jax.Array], jax.Array], images: jax.Array, labels: jax.Array, eps, step_size,
        steps: int, key: jax.Array | None = None) -> jax.Array:
  """Untargeted L∞ PGD: maximises the mean cross-entropy of `labels` under `apply_fn`.

  apply_fn: float [B, H, W, 3] in [0, 1] -> logits [B, C]; images float [B, H, W, 3] in [0, 1]; labels int [B].
  As BackdoorBench's / torchattacks' `PGD.forward`: start at `images` (key None) or, with a key, at
  clip(images + U[−eps, eps], 0, 1); then `steps` times
  x ← clip(images + clip(x + step_size · sign(∇ₓ loss) − images, −eps, eps), 0, 1).
  Returns float [B, H, W, 3], within eps of `images` and in [0, 1]. steps is static.
  """
  def loss(x):
    return optax.softmax_cross_entropy_with_integer_labels(apply_fn(x), labels).mean()

  def project(x):
    return jnp.clip(images + jnp.clip(x - images, -eps, eps), 0.0, 1.0)

  grad = jax.grad(loss)
  adv = images
  if key is not None:
    noise = jax.random.uniform(key, images.shape, images.dtype, -eps, eps,
                               out_sharding=jax.typeof(images).sharding)
    adv = jnp.clip(images + noise, 0.0, 1.0)
  return jax.lax.fori_loop(0, steps, lambda _, x: project(x + step_size * jnp.sign(grad(x))), adv)


# ----------------------------------------------------------------------------------------------------------------
# The robust classifier and its adversarial training


def build_model(block, seed: int) -> LinearClassifier:
  return build_linear_classifier(block.model, block.num_classes, nnx.Rngs(seed))


def _graphdef(block):
  """The classifier's graphdef (split into Param and BatchStat, as `create_state`), built without allocating."""
  return nnx.split(nnx.eval_shape(lambda: build_model(block, 0)), nnx.Param, nnx.BatchStat)[0]


def _logits_fn(graphdef, params, batch_stats, block, train: bool):
  """float [B, H, W, 3] in [0, 1] -> logits; BatchNorm in training mode (statistics discarded) or eval mode."""
  mean, std = jnp.asarray(block.model.mean), jnp.asarray(block.model.std)

  def logits(x):
    model = nnx.merge(graphdef, params, batch_stats, copy=True)
    return model(augment.normalize(x, mean, std), train)

  return logits


def classifier(block, state: TrainState, train: bool = False) -> Callable[[jax.Array], jax.Array]:
  """The trained classifier of `state` as float images [B, H, W, 3] in [0, 1] -> logits [B, num_classes]
  (normalisation included); BatchNorm in eval mode, or in training mode (batch statistics) with `train`."""
  return _logits_fn(_graphdef(block), state.params, state.batch_stats, block, train)


def make_step(graphdef, tx, block):
  """-> step(state, batch, key) -> (state, metrics): one step of PGD adversarial training; pure, jit it donated.

  batch: 'image' uint8 [B, H, W, 3], 'label' int32 [B], sharded along `data`. The batch is cropped and flipped,
  PGD (block.adv_train; random start from the step key) attacks the current model in training mode, and the model
  trains on the PGD images with softmax cross-entropy. metrics: loss (the adversarial cross-entropy before the
  update), adv_accuracy, and the health norms.
  """
  at = block.adv_train
  mean, std = jnp.asarray(block.model.mean), jnp.asarray(block.model.std)

  def step(state: TrainState, batch, key):
    key = jax.random.fold_in(key, state.step)
    aug_key, start_key = jax.random.split(key)
    x = augment.to_float(augment.crop_flip(aug_key, batch["image"], block.augment.padding, block.augment.flip_prob))
    attacked = _logits_fn(graphdef, state.params, state.batch_stats, block, train=True)
    adv = jax.lax.stop_gradient(pgd(attacked, x, batch["label"], at.eps, at.step_size, at.steps,
                                    start_key if at.random_start else None))

    def loss_fn(params):
      model = nnx.merge(graphdef, params, state.batch_stats, copy=True)
      logits = model(augment.normalize(adv, mean, std), train=True)
      loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"]).mean()
      return loss, (logits, nnx.state(model, nnx.BatchStat))

    (loss, (logits, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    state, health = apply_gradients(state, tx, grads, batch_stats)
    return state, {"loss": loss, "adv_accuracy": jnp.mean(jnp.argmax(logits, -1) == batch["label"]), **health}

  return step


def training(block, images: np.ndarray, labels: np.ndarray, target: int, mesh, seed: int):
  """-> (state at step 0, jitted donating step, batch_fn, num_steps) of the robust classifier's PGD adversarial
  training on uint8 images [N, H, W, 3] with labels [N]. `target` is unused (the model is attack-agnostic); seed
  draws the initial weights and the batch order."""
  del target
  labels = np.asarray(labels)
  if labels.size and (labels.min() < 0 or labels.max() >= block.num_classes):
    raise UserError(f"labels run over 0..{int(labels.max())} but {PREFIX}.num_classes is {block.num_classes}; "
                    f"set it to the data set's class count")
  dataset = DeviceDataset({"image": images, "label": labels.astype(np.int32)}, mesh, block.train.batch_size, seed)
  num_steps = block.train.epochs * dataset.steps_per_epoch
  tx = make_optimizer(block.optim, num_steps, dataset.steps_per_epoch)
  graphdef, state = create_state(lambda: build_model(block, seed), tx, mesh)
  step = jax.jit(make_step(graphdef, tx, block), donate_argnums=0)
  return state, step, dataset.batch, num_steps


# ----------------------------------------------------------------------------------------------------------------
# Poisoning


def _quantize(x: jax.Array, mode: str) -> jax.Array:
  """float [..] in [0, 1] -> uint8: round(255 x) or trunc(255 x) (BackdoorBench's `_to_uint`)."""
  scaled = x * 255.0
  return (jnp.round(scaled) if mode == "round" else scaled).astype(jnp.uint8)


def poison_images(block, state, images: np.ndarray, labels: np.ndarray, key: jax.Array, mesh) -> np.ndarray:
  """uint8 [P, H, W, 3]: PGD (block.attack) against each image's true label on the trained classifier in eval mode,
  quantised to uint8 (attack.quantize: round to nearest, or truncate as BackdoorBench), then `all_corners_trigger` at
  trigger.amplitude.

  Batches of attack.batch_size rows sharded along `data` (the last padded with zeros, which eval mode keeps
  independent of the real rows); batch i's random start, if any, uses `fold_in(key, i)`.
  """
  attack, amplitude = block.attack, _number(block.trigger.amplitude, "trigger.amplitude", 0.0, 1.0)
  _check_size(images.shape[1], images.shape[2])

  @jax.jit
  def craft(state, x, y, batch_key):
    logits = classifier(block, state)
    adv = pgd(logits, augment.to_float(x), y, attack.eps, attack.step_size, attack.steps,
              batch_key if attack.random_start else None)
    return all_corners_trigger(_quantize(adv, attack.quantize), amplitude)

  n, devices = len(images), mesh.devices.size
  size = min(attack.batch_size, -(-n // devices) * devices)  # no more padding than the mesh needs
  out = []
  for i, start in enumerate(range(0, n, size)):
    rows = min(size, n - start)
    x = np.zeros((size, *images.shape[1:]), np.uint8)
    y = np.zeros((size,), np.int32)
    x[:rows], y[:rows] = images[start:start + rows], labels[start:start + rows]
    batch = parallel.put_batch({"image": x, "label": y}, mesh)
    poisoned = craft(state, batch["image"], batch["label"], jax.random.fold_in(key, i))
    out.append(np.asarray(poisoned)[:rows])
  return np.concatenate(out) if out else np.zeros((0, *images.shape[1:]), np.uint8)
