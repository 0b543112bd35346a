"""ISSBA (Li et al., ICCV 2021, "Invisible Backdoor Attack with Sample-Specific Triggers"): x' = Enc(secret, x).

A dirty-label attack (attacks.md 4.2). jaxpurify trains a StegaStamp-style encoder/decoder pair on the downstream
training images, then every poisoned image (training and test) is the encoder's output for ONE fixed secret, as
BackdoorBench's `embed_fingerprints.py --identical_fingerprints`: the trigger is sample-specific (a residual that
depends on the image) but carries the same bits.

1. `training`: encoder and decoder trained jointly on random secrets, one per sample and step (both references
   train on random secrets), loss = bce_weight · BCE(decoder(x'), secret) + λ_img · MSE(x', x).
2. `poison_images` / `test_trigger`: x' = round(255 · clip(x + residual(fixed secret, x), 0, 1)) as uint8, round half
   to even (BackdoorBench's `save_image` rounds half up: the two differ only on exact ties).
3. `bit_accuracy`: the decoder's bit accuracy on those uint8 images, for the logs.

| Setting | Full default | Quick default | Reference |
|---|---|---|---|
| secret bits (`fixed_secret`) | 100 | 20 | BackdoorBench `--fingerprint_length 100` / BackdoorBox `secret_size=20` |
| encoder U-Net widths | (32, 32, 64, 128, 256) | (8, 16, 32, 32, 32) | BackdoorBox `StegaStampEncoder` |
| decoder conv widths, hidden | (32, 32, 64, 64, 64, 128, 128), 512 | (8, 8, 16, 16, 16, 32, 32), 64 | BackdoorBench `StegaStampDecoder` |
| λ_img: max, await, ramp, start | 10, 1000, 3000, bit accuracy > 0.9 | 10, 0, 100, > 0.9 | BackdoorBench `train.py` |
| optimiser, batch, epochs | Adam 1e-4, 64, 20 | Adam 1e-3, 64, 12 | BackdoorBench `train.py` (BackdoorBox: 1e-4, 32, 20) |

- Secret: `fixed_secret` = `np.random.default_rng(secret_seed)` fair bits, BackdoorBench's `--encode_method seed`
  (its README uses `bch`, an error-correcting code of a text secret).
- Encoder (BackdoorBox): Dense(L → H·W·3) + ReLU of the secret, concatenated with the image (both − 0.5); a conv,
  then a stride-2 conv per further width; per level back up, nearest ×2, a 2×2 conv, the skip concatenated (at full
  size also the inputs) and a 3×3 conv; all ReLU; a 1×1 conv gives the residual; x' = clip(x + residual, 0, 1).
- Decoder (BackdoorBench, input − 0.5 as BackdoorBox): 3×3 convs of strides (2, 1, 2, 1, 2, 2, 2), Dense(hidden),
  Dense(L) → logits.
- λ_img = min(max(0, l2_weight · (s − l2_await) / l2_ramp), l2_weight), s = the steps since the batch bit accuracy
  first exceeded l2_start_accuracy (−1 before).

Deliberate simplifications: StegaStamp's LPIPS and critic (WGAN discriminator) terms, its spatial-transformer in
the decoder (BackdoorBox), its image perturbations and BackdoorBench's BCH error-correcting code are left out; the
image loss is BackdoorBench's plain MSE. The residual encoder with clipping is BackdoorBox's (BackdoorBench's default
`--use_residual 0` emits the whole image through a sigmoid). Convolutions pad as PyTorch's (3×3: 1 on each side,
2×2: 0 before and 1 after), initialisations are Flax's. The quick variant's await and ramp are shortened (the
reference's 1000-step await alone outlasts the 264 steps of 12 digits epochs), its learning rate raised.
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
from jaxpurify.models import compute_dtype
from jaxpurify.poisoning import checks
from jaxpurify.train.state import (
  TrainState,
  apply_gradients,
  create_state,
  make_optimizer,
)

PREFIX = "config.poison.issba"


# ----------------------------------------------------------------------------------------------------------------
# Host-side checks


def _number(value, field: str, low: float | None = None, high: float | None = None) -> float:
  return checks.number(value, f"{PREFIX}.{field}", low, high)


def _integer(value, field: str, low: int) -> int:
  return checks.integer(value, f"{PREFIX}.{field}", low)


def _widths(values, field: str) -> tuple[int, ...]:
  if isinstance(values, (str, bytes)) or not hasattr(values, "__len__") or not len(values):
    raise UserError(f"{PREFIX}.{field} must be a non-empty list of positive integers, got {values!r}; "
                    f"fix {PREFIX}.{field}")
  return tuple(_integer(v, field, 1) for v in values)


def _check_size(height: int, width: int, block) -> None:
  """The U-Net halves the image len(encoder.widths) − 1 times and doubles it back."""
  factor = 2 ** (len(block.encoder.widths) - 1)
  if height % factor or width % factor:
    raise UserError(f"{height}×{width} images do not fit the encoder's {len(block.encoder.widths) - 1} halvings "
                    f"(sides must be multiples of {factor}); shorten {PREFIX}.encoder.widths")


def check_config(block, image_size: int) -> None:
  """Fails with one line naming `config.poison.issba.<field>` on a bad value, before any training."""
  _integer(block.secret_length, "secret_length", 1)
  _integer(block.secret_seed, "secret_seed", 0)
  if len(_widths(block.encoder.widths, "encoder.widths")) < 2:
    raise UserError(f"{PREFIX}.encoder.widths needs at least 2 entries (a full-size conv and one halving), got "
                    f"{tuple(block.encoder.widths)}; fix {PREFIX}.encoder.widths")
  widths = _widths(block.decoder.widths, "decoder.widths")
  strides = _widths(block.decoder.strides, "decoder.strides")
  if len(strides) != len(widths) or max(strides) > 2:
    raise UserError(f"{PREFIX}.decoder.strides must give 1 or 2 for each of the {len(widths)} decoder convs, got "
                    f"{tuple(strides)}; fix {PREFIX}.decoder.strides")
  _integer(block.decoder.hidden, "decoder.hidden", 1)
  _number(block.loss.bce_weight, "loss.bce_weight", 0.0)
  _number(block.loss.l2_weight, "loss.l2_weight", 0.0)
  _integer(block.loss.l2_await, "loss.l2_await", 0)
  _integer(block.loss.l2_ramp, "loss.l2_ramp", 1)
  _number(block.loss.l2_start_accuracy, "loss.l2_start_accuracy", 0.0, 1.0)
  checks.auxiliary_training(block, PREFIX)
  _check_size(_integer(image_size, "image_size", 1), image_size, block)


# ----------------------------------------------------------------------------------------------------------------
# Encoder and decoder


def _conv(cin: int, cout: int, kernel: int, stride: int, dtype, rngs: nnx.Rngs) -> nnx.Conv:
  """A conv padded as PyTorch's: (kernel − 1) // 2 before, kernel // 2 after (3×3: 1 / 1, 2×2: 0 / 1)."""
  pad = ((kernel - 1) // 2, kernel // 2)
  return nnx.Conv(cin, cout, (kernel, kernel), stride, padding=(pad, pad), dtype=dtype, rngs=rngs)


def _upsample(x: jax.Array) -> jax.Array:
  """Nearest-neighbour ×2 of [B, H, W, C]."""
  return jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)


class Encoder(nnx.Module):
  """(images float [B, H, W, 3] in [0, 1], secrets float [B, L] in {0, 1}) -> residual float [B, H, W, 3].

  BackdoorBox's StegaStampEncoder with widths w_0..w_D: the secret goes through Dense(L → H·W·3) + ReLU and is
  concatenated with the image (both shifted by −0.5); conv(w_0), then D stride-2 convs (w_1..w_D); then D up-steps,
  each nearest ×2, a 2×2 conv to w_i, concatenation with the skip of the same size (and, at full size, the inputs)
  and a 3×3 conv (w_i); all ReLU; a 1×1 conv gives the residual.
  """

  def __init__(self, secret_length: int, height: int, width: int, widths, *, dtype=jnp.float32, rngs: nnx.Rngs):
    widths = tuple(widths)
    self.secret_dense = nnx.Linear(secret_length, height * width * 3, dtype=dtype, rngs=rngs)
    self.inconv = _conv(6, widths[0], 3, 1, dtype, rngs)
    self.down = nnx.List([_conv(widths[i - 1], widths[i], 3, 2, dtype, rngs) for i in range(1, len(widths))])
    self.up = nnx.List([_conv(widths[i + 1], widths[i], 2, 1, dtype, rngs)
                        for i in reversed(range(len(widths) - 1))])
    self.merge = nnx.List([_conv(2 * widths[i] + (6 if i == 0 else 0), widths[i], 3, 1, dtype, rngs)
                           for i in reversed(range(len(widths) - 1))])
    self.residual = _conv(widths[0], 3, 1, 1, dtype, rngs)

  def __call__(self, images: jax.Array, secrets: jax.Array) -> jax.Array:
    secret_map = jax.nn.relu(self.secret_dense(secrets - 0.5)).reshape(images.shape)
    inputs = jnp.concatenate([secret_map, images - 0.5], axis=-1)
    skips = [jax.nn.relu(self.inconv(inputs))]
    for conv in self.down:
      skips.append(jax.nn.relu(conv(skips[-1])))
    h = skips.pop()
    for up, merge in zip(self.up, self.merge):
      skip = skips.pop()
      parts = [skip, jax.nn.relu(up(_upsample(h)))] + ([] if skips else [inputs])
      h = jax.nn.relu(merge(jnp.concatenate(parts, axis=-1)))
    return self.residual(h).astype(jnp.float32)


class Decoder(nnx.Module):
  """images float [B, H, W, 3] in [0, 1] -> secret logits [B, L]: 3×3 convs (ReLU) with the given widths and
  strides on images − 0.5, flattened, Dense(hidden) + ReLU, Dense(L) (BackdoorBench's StegaStampDecoder)."""

  def __init__(self, secret_length: int, height: int, width: int, widths, strides, hidden: int, *,
               dtype=jnp.float32, rngs: nnx.Rngs):
    channels = (3, *widths)
    self.convs = nnx.List([_conv(channels[i], channels[i + 1], 3, s, dtype, rngs) for i, s in enumerate(strides)])
    for s in strides:
      height, width = -(-height // s), -(-width // s)
    self.hidden = nnx.Linear(height * width * channels[-1], hidden, dtype=dtype, rngs=rngs)
    self.out = nnx.Linear(hidden, secret_length, dtype=dtype, rngs=rngs)

  def __call__(self, images: jax.Array) -> jax.Array:
    h = images - 0.5
    for conv in self.convs:
      h = jax.nn.relu(conv(h))
    return self.out(jax.nn.relu(self.hidden(h.reshape(h.shape[0], -1)))).astype(jnp.float32)


class StegaStamp(nnx.Module):
  """The encoder/decoder pair trained together, computing in block.dtype (outputs float32); `embed` gives
  x' = clip(x + residual, 0, 1)."""

  def __init__(self, block, height: int, width: int, *, rngs: nnx.Rngs):
    dtype = compute_dtype(block.dtype)
    self.encoder = Encoder(block.secret_length, height, width, block.encoder.widths, dtype=dtype, rngs=rngs)
    self.decoder = Decoder(block.secret_length, height, width, block.decoder.widths, block.decoder.strides,
                           block.decoder.hidden, dtype=dtype, rngs=rngs)

  def embed(self, images: jax.Array, secrets: jax.Array) -> jax.Array:
    """float [B, H, W, 3] in [0, 1], float [B, L] -> float [B, H, W, 3] in [0, 1]."""
    return jnp.clip(images + self.encoder(images, secrets), 0.0, 1.0)


def build_model(block, height: int, width: int, seed: int) -> StegaStamp:
  return StegaStamp(block, height, width, rngs=nnx.Rngs(seed))


def _graphdef(block, height: int, width: int):
  """The model's graphdef (split into Param and BatchStat, as `create_state`), built without allocating."""
  return nnx.split(nnx.eval_shape(lambda: build_model(block, height, width, 0)), nnx.Param, nnx.BatchStat)[0]


def fixed_secret(block) -> np.ndarray:
  """float32 [secret_length] of 0/1: the one secret every poisoned image carries,
  `np.random.default_rng(secret_seed).integers(0, 2, secret_length)` (a pure function of the config)."""
  length, seed = _integer(block.secret_length, "secret_length", 1), _integer(block.secret_seed, "secret_seed", 0)
  return np.random.default_rng(seed).integers(0, 2, length).astype(np.float32)


def _rows(images: jax.Array) -> jax.NamedSharding | None:
  """The sharding of a [B, ...] array split along the batch axis like `images` (None without a mesh)."""
  sharding = jax.typeof(images).sharding
  if sharding.mesh.empty:
    return None
  return jax.NamedSharding(sharding.mesh, jax.P(sharding.spec[0] if sharding.spec else None))


# ----------------------------------------------------------------------------------------------------------------
# Training


def l2_weight(block, steps_since_start: jax.Array) -> jax.Array:
  """BackdoorBench's λ_img: min(max(0, l2_weight · (s − l2_await) / l2_ramp), l2_weight), s = the steps since the
  bit accuracy first exceeded l2_start_accuracy (−1 before: weight 0)."""
  loss = block.loss
  return jnp.clip(loss.l2_weight * (steps_since_start - loss.l2_await) / loss.l2_ramp, 0.0, loss.l2_weight)


def make_step(graphdef, tx, block):
  """-> step(state, batch, key) -> (state, metrics): one joint encoder/decoder update; pure, jit it donated.

  batch: 'image' uint8 [B, H, W, 3] sharded along `data`. Each sample gets fresh fair secret bits from
  fold_in(key, state.step). state.extra['l2_steps'] is s of `l2_weight`, updated from this batch's bit accuracy
  (measured before the update, as BackdoorBench). metrics: loss, bce, mse, psnr (of the float x'), l2_weight,
  bit_accuracy and the health norms.
  """
  length, threshold, bce_weight = block.secret_length, block.loss.l2_start_accuracy, block.loss.bce_weight

  def step(state: TrainState, batch, key):
    key = jax.random.fold_in(key, state.step)
    images = augment.to_float(batch["image"])
    secrets = jax.random.bernoulli(key, 0.5, (images.shape[0], length),
                                   out_sharding=_rows(images)).astype(jnp.float32)
    since = state.extra["l2_steps"]
    weight = l2_weight(block, since)

    def loss_fn(params):
      model = nnx.merge(graphdef, params, state.batch_stats, copy=True)
      encoded = model.embed(images, secrets)
      logits = model.decoder(encoded)
      bce = optax.sigmoid_binary_cross_entropy(logits, secrets).mean()
      mse = jnp.mean(jnp.square(encoded - images))
      return bce_weight * bce + weight * mse, (bce, mse, logits)

    (loss, (bce, mse, logits)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    accuracy = jnp.mean((logits > 0) == (secrets > 0.5))
    since = jnp.where(since < 0, jnp.where(accuracy > threshold, 0, -1), since + 1).astype(jnp.int32)
    state, health = apply_gradients(state, tx, grads, state.batch_stats, {"l2_steps": since})
    return state, {"loss": loss, "bce": bce, "mse": mse, "psnr": -10.0 * jnp.log10(jnp.maximum(mse, 1e-10)),
                   "l2_weight": weight, "bit_accuracy": accuracy, **health}

  return step


def training(block, images: np.ndarray, labels: np.ndarray, target: int, mesh, seed: int):
  """-> (state at step 0, jitted donating step, batch_fn, num_steps) of the encoder/decoder training on uint8
  images [N, H, W, 3] (the clean downstream training set). labels and target are unused (the steganography is
  label-agnostic); seed draws the initial weights and the batch order."""
  del labels, target
  height, width = int(images.shape[1]), int(images.shape[2])
  _check_size(height, width, block)
  dataset = DeviceDataset({"image": images}, mesh, block.train.batch_size, seed)
  num_steps = block.train.epochs * dataset.steps_per_epoch
  tx = make_optimizer(block.optim, num_steps, dataset.steps_per_epoch)
  graphdef, state = create_state(lambda: build_model(block, height, width, seed), tx, mesh,
                                 lambda _: {"l2_steps": jnp.full((), -1, jnp.int32)})
  step = jax.jit(make_step(graphdef, tx, block), donate_argnums=0)
  return state, step, dataset.batch, num_steps


# ----------------------------------------------------------------------------------------------------------------
# Poisoning


def _embed(block, params, batch_stats, images: jax.Array) -> jax.Array:
  """uint8 [B, H, W, 3] -> uint8: round(255 · clip(x + residual(fixed secret, x), 0, 1)), half to even; pure."""
  if images.dtype != jnp.uint8 or images.ndim != 4 or images.shape[-1] != 3:
    raise TypeError(f"the ISSBA trigger expects uint8 images [B, H, W, 3], got {images.dtype} {images.shape}")
  height, width = int(images.shape[1]), int(images.shape[2])
  trained = params["encoder"]["secret_dense"]["kernel"].shape[-1] // 3
  if trained != height * width:
    raise UserError(f"the ISSBA encoder was trained on images of {trained} pixels, got {height}×{width}; "
                    "train it on the data set the trigger is applied to")
  model = nnx.merge(_graphdef(block, height, width), params, batch_stats, copy=True)
  secret = jnp.asarray(fixed_secret(block))
  secrets = jnp.broadcast_to(secret, (images.shape[0], secret.shape[0]))
  if (rows := _rows(images)) is not None:
    secrets = jax.sharding.reshard(secrets, rows)
  return jnp.round(model.embed(augment.to_float(images), secrets) * 255.0).astype(jnp.uint8)


def test_trigger(block, state) -> Callable[[jax.Array], jax.Array]:
  """The test-time trigger, a pure jittable map uint8 [B, H, W, 3] -> uint8: the trained encoder's embedding of
  `fixed_secret(block)`, the same map as `poison_images`. It closes over a host copy of the weights, so it runs on
  host arrays as well as on batches sharded over any mesh."""
  params, batch_stats = jax.device_get((state.params, state.batch_stats))
  return lambda images: _embed(block, params, batch_stats, images)


def _map_batches(fn, images: np.ndarray, batch_size: int, mesh) -> np.ndarray:
  """fn (jitted, uint8 [B, H, W, 3] -> [B, ...]) over `images` in batches sharded along `data`, the last batch
  padded with zeros (every sample is processed independently), -> host array [N, ...]."""
  n, devices = len(images), mesh.devices.size
  size = min(batch_size, -(-n // devices) * devices)  # no more padding than the mesh needs
  out = []
  for start in range(0, n, size):
    rows = min(size, n - start)
    x = np.zeros((size, *images.shape[1:]), np.uint8)
    x[:rows] = images[start:start + rows]
    out.append(np.asarray(fn(parallel.put_batch(x, mesh)))[:rows])
  return np.concatenate(out)


def poison_images(block, state, images: np.ndarray, labels: np.ndarray, key: jax.Array, mesh) -> np.ndarray:
  """uint8 [P, H, W, 3]: `test_trigger`'s map applied to uint8 images [P, H, W, 3] in batches of
  attack.batch_size (deterministic: labels and key are unused)."""
  del labels, key
  if not len(images):
    return np.zeros((0, *images.shape[1:]), np.uint8)
  embed = jax.jit(lambda params, batch_stats, x: _embed(block, params, batch_stats, x))
  return _map_batches(lambda x: embed(state.params, state.batch_stats, x), images, block.attack.batch_size, mesh)


def bit_accuracy(block, state, images: np.ndarray) -> float:
  """The decoder's mean bit accuracy on the poisoned versions (uint8, as the victim sees them) of uint8 images
  [N, H, W, 3], against `fixed_secret(block)`; run on the mesh the state lives on."""
  mesh = jax.tree.leaves(state.params)[0].sharding.mesh
  graphdef, secret = _graphdef(block, int(images.shape[1]), int(images.shape[2])), fixed_secret(block) > 0.5

  @jax.jit
  def correct(params, batch_stats, x):
    decoder = nnx.merge(graphdef, params, batch_stats, copy=True).decoder
    return (decoder(augment.to_float(_embed(block, params, batch_stats, x))) > 0) == secret

  hits = _map_batches(lambda x: correct(state.params, state.batch_stats, x), images, block.attack.batch_size, mesh)
  return float(hits.mean())
