"""Input-aware dynamic backdoor (Nguyen & Tran, NeurIPS 2020), used poison-only.

Every image gets its own trigger: x' = x + (G(x) − x) · M(x), with a pattern generator G and a mask generator M
(conv encoder/decoders, attacks.md 4.2). The attacker trains G and M jointly with its own surrogate classifier C on
the downstream training set (`training`, the two stages of the reference in one jitted step), then writes a fixed
poisoned set with the trained G and M (`poison_images`, and `apply_pattern` for the cross samples, which carry the
pattern and mask of another image and keep their labels), as backdoor-toolbox's poison-only 'dynamic' attack does.

G and M are the reference's `InputAwareGenerator` (BackdoorBench `attack/inputaware.py`, VinAI `networks/models.py`):
per level of `widths` two 3×3 conv blocks (conv with bias, BatchNorm with torch momentum 0.05, ReLU) and a 2×2
max-pool, a middle block, then per level a bilinear ×2 upsampling and two blocks back down the widths, the last to 3
(G) or 1 (M) channels without ReLU; the output is tanh(·)/(2 + 1e-7) + 0.5. The mask is M(x) = `threshold` of M's
output, tanh(20 m − 10)/(2 + 1e-7) + 0.5. All three networks see normalised images.

| Setting | Default (full / quick) | Reference |
|---|---|---|
| G, M widths | 32 → 64 → 128 / 8 → 16 → 32 (3 down, 3 up) | CIFAR-10 and GTSRB: 32, 3 steps |
| C | `build_encoder(resnet18, 64 / 8)` + `nnx.Linear` | PreActResNet18 |
| normalisation | mean (0.4914, 0.4822, 0.4465), std (0.247, 0.243, 0.261) | the reference's CIFAR-10 `Normalize` |
| stage 1: M | 25 / 2 epochs of λ_norm · mean(relu(M(x) − density)) + λ_div · div(x, x2, M(x), M(x2)) | `train_mask_step` |
| stage 2: C, G | 100 / 5 epochs of CE(backdoor, cross, clean rows) + λ_div · div(x1, x2, G(x1), G(x2)) | `train_step` |
| loss weights | λ_norm 100, λ_div 1, density 0.032, pratio 0.1 (k = ⌊pratio · B⌋ backdoor and k cross rows) | the same |
| C optimiser | SGD 0.01, momentum 0.9, wd 5e-4, ×0.1 at epochs 100, 200, 300, 400 | `optimizerC`, `schedulerC` |
| G optimiser | Adam 0.01, β (0.5, 0.9), ×0.1 at epochs 200, 300, 400, 500 | `optimizerG`, `schedulerG` |
| M optimiser | Adam 0.01, β (0.5, 0.9), ×0.1 at epochs 10, 20 | `optimizerM`, `schedulerM` |
| augmentation | random crop (zero padding 5), horizontal flip 0.5 / 0 | VinAI: crop 5, rotation 10 (not here), flip |
| poisoned set | each image with its own trigger; cross_ratio 1 cross sample per poisoned one | BackdoorBench `bd_train` |
| quantisation | clip to [0, 255], round half to even | jaxpurify's choice (the reference keeps floats) |

div(x1, x2, p1, p2) = mean_b ‖x1 − x2‖ / (‖p1 − p2‖ + ε) with root-mean-square norms, ε = 1e-7 (`diversity_loss`).
Milestones count the epochs of the optimiser's own stage (its updates), as the reference's schedulers step only there.
Both stages are one compiled step (`make_step`): `jax.lax.cond` on accelerators; on CPU both stages are computed and
the running one's results selected, XLA:CPU being far slower on backward convolutions inside a conditional.

Epochs: BackdoorBench trains 25 mask epochs then `epochs: 100` (`config/attack/inputaware/cifar10.yaml`; VinAI's
release runs up to 600), so the full default is 25 + 100; the C and G milestones then never fire, as in BackdoorBench.

Differences from the reference:
- Its second loader (an independently shuffled batch `inputs2`) is the batch itself: in stage 1 the partner of row i
  is row (i + B/2) mod B; in stage 2 the cross row k + i takes the pattern and mask of row (2k + i) mod B (k backdoor
  rows; the batch is shuffled, so these are random other images).
- Stage 1 runs M twice per step (x and its partner), the reference three times (x twice); BatchNorm running averages
  are thus updated twice per step, not three times.
- The reference multiplies its stage-1 diversity term by λ_div twice; here once (the same at the default λ_div = 1).
- The per-batch backdoor count is ⌊pratio · B⌋ ≥ 1 (checked), without BackdoorBench's random rounding of lower
  rates.
BatchNorm follows the reference: M in training mode in stage 1 and in inference mode from stage 2 on; G in training
mode in stage 2 (statistics of its backdoor and source sub-batches, separately) and in inference mode for poisoning.
"""

from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from jaxpurify import augment, parallel
from jaxpurify.data.device import DeviceDataset
from jaxpurify.errors import UserError
from jaxpurify.models import build_linear_classifier, check_name, compute_dtype
from jaxpurify.models.batch_norm import BatchNorm
from jaxpurify.poisoning import checks
from jaxpurify.train.state import TrainState

PREFIX = "config.poison.input_aware"
NETS = ("classifier", "generator", "mask")
OPTIMIZERS = ("sgd", "adam")
SQUASH_EPSILON = 1e-7  # the reference's `_EPSILON` in G's output and in the mask threshold
BN_MOMENTUM = 0.95  # torch BatchNorm2d(momentum=0.05) in the reference's Conv2dBlock
BN_EPSILON = 1e-5


# ----------------------------------------------------------------------------------------------------------------
# Host-side checks


def _number(value, field: str, low: float | None = None, high: float | None = None, open_low: bool = False) -> float:
  return checks.number(value, f"{PREFIX}.{field}", low, high, open_low)


def _integer(value, field: str, low: int) -> int:
  return checks.integer(value, f"{PREFIX}.{field}", low)


def _sequence(values, field: str) -> tuple:
  if isinstance(values, str) or not isinstance(values, Sequence):
    raise UserError(f"{PREFIX}.{field} must be a list, got {values!r}; fix {PREFIX}.{field}")
  return tuple(values)


def num_backdoor(pratio: float, batch_size: int) -> int:
  """Backdoor rows per batch, ⌊pratio · B⌋ (the reference's `int(pratio * bs)`); as many cross rows follow them."""
  return int(pratio * batch_size)


def _check_optim(optim, name: str) -> None:
  field = f"optim.{name}"
  if optim.name not in OPTIMIZERS:
    raise UserError(f"unknown optimizer {optim.name!r}; set {PREFIX}.{field}.name to 'sgd' or 'adam'")
  _number(optim.lr, f"{field}.lr", 0.0, open_low=True)
  _number(optim.momentum, f"{field}.momentum", 0.0, 0.999)
  _number(optim.weight_decay, f"{field}.weight_decay", 0.0)
  betas = _sequence(optim.betas, f"{field}.betas")
  if len(betas) != 2:
    raise UserError(f"{PREFIX}.{field}.betas needs 2 values (Adam's β1, β2), got {betas}; fix {PREFIX}.{field}.betas")
  for beta in betas:
    _number(beta, f"{field}.betas", 0.0, 0.999)
  for milestone in _sequence(optim.milestones, f"{field}.milestones"):
    _integer(milestone, f"{field}.milestones", 1)
  _number(optim.gamma, f"{field}.gamma", 0.0, open_low=True)


def _check_size(image_size: int, widths: Sequence[int]) -> None:
  levels = 2 ** len(widths)
  if image_size % levels:
    raise UserError(f"G and M halve the image {len(widths)} times, so the image size must be a multiple of "
                    f"{levels}, got {image_size}; use fewer {PREFIX}.widths or another config.data.image_size")


def check_config(block, image_size: int) -> None:
  """Fails with one line naming `config.poison.input_aware.<field>` on a bad value, before any training."""
  check_name(block.model.name, f"{PREFIX}.model.name")
  _integer(block.model.width, "model.width", 1)
  for field in ("mean", "std"):
    values = _sequence(block.model[field], f"model.{field}")
    if len(values) != 3 or (field == "std" and min(values) <= 0):
      raise UserError(f"{PREFIX}.model.{field} needs 3 per-channel values{' > 0' if field == 'std' else ''}, got "
                      f"{values}; fix {PREFIX}.model.{field}")
  _integer(block.num_classes, "num_classes", 2)
  widths = _sequence(block.widths, "widths")
  if not widths:
    raise UserError(f"{PREFIX}.widths needs at least one level, e.g. (32, 64, 128); fix {PREFIX}.widths")
  for width in widths:
    _integer(width, "widths", 1)
  _check_size(image_size, widths)
  _number(block.pratio, "pratio", 0.0, 0.5, open_low=True)
  _number(block.cross_ratio, "cross_ratio", 0.0)
  _number(block.lambda_div, "lambda_div", 0.0)
  _number(block.lambda_norm, "lambda_norm", 0.0)
  _number(block.mask_density, "mask_density", 0.0, 1.0)
  _number(block.epsilon, "epsilon", 0.0, open_low=True)
  _integer(block.augment.padding, "augment.padding", 0)
  _number(block.augment.flip_prob, "augment.flip_prob", 0.0, 1.0)
  for name in NETS:
    _check_optim(block.optim[name], name)
  batch_size = _integer(block.train.batch_size, "train.batch_size", 1)
  parallel.check_global_batch(batch_size, f"{PREFIX}.train.batch_size")
  if num_backdoor(block.pratio, batch_size) < 1:
    raise UserError(f"{PREFIX}.pratio {block.pratio} gives no backdoor row in a batch of {batch_size}; raise "
                    f"{PREFIX}.pratio or {PREFIX}.train.batch_size so that pratio · batch_size >= 1")
  _integer(block.train.mask_epochs, "train.mask_epochs", 0)
  _integer(block.train.epochs, "train.epochs", 1)
  parallel.check_global_batch(_integer(block.poison_batch_size, "poison_batch_size", 1),
                              f"{PREFIX}.poison_batch_size")


# ----------------------------------------------------------------------------------------------------------------
# Trigger arithmetic


def squash(z: jax.Array) -> jax.Array:
  """G's (and M's) output map: tanh(z) / (2 + 1e-7) + 0.5, in (0, 1)."""
  return jnp.tanh(z) / (2 + SQUASH_EPSILON) + 0.5


def threshold(m: jax.Array) -> jax.Array:
  """The mask threshold: tanh(20 m − 10) / (2 + 1e-7) + 0.5 (a steep step at m = 0.5), in (0, 1)."""
  return jnp.tanh(m * 20 - 10) / (2 + SQUASH_EPSILON) + 0.5


def combine(images: jax.Array, pattern: jax.Array, mask: jax.Array) -> jax.Array:
  """x + (pattern − x) · mask: images and pattern float [B, H, W, 3], mask [B, H, W, 1] (any broadcastable)."""
  return images + (pattern - images) * mask


def diversity_loss(x1: jax.Array, x2: jax.Array, p1: jax.Array, p2: jax.Array, epsilon: float) -> jax.Array:
  """mean_b ‖x1_b − x2_b‖ / (‖p1_b − p2_b‖ + ε), each ‖·‖ the root mean square over [H, W, C] (the
  reference's `sqrt(MSELoss(reduction='none').mean((1, 2, 3)))`): inputs [B, H, W, C], a scalar out."""
  def rms(a, b):
    return jnp.sqrt(jnp.mean(jnp.square(a - b), axis=tuple(range(1, a.ndim))))
  return jnp.mean(rms(x1, x2) / (rms(p1, p2) + epsilon))


def quantize(x: jax.Array) -> jax.Array:
  """float [...] in [0, 1] -> uint8: 255 x clipped to [0, 255], rounded half to even."""
  return jnp.round(jnp.clip(x * 255.0, 0.0, 255.0)).astype(jnp.uint8)


# ----------------------------------------------------------------------------------------------------------------
# Networks


def _torch_uniform(fan_in: int):
  """torch's default Conv2d / Linear init for kernel and bias: U(−1/√fan_in, 1/√fan_in)."""
  bound = fan_in ** -0.5
  return lambda key, shape, dtype=jnp.float32: jax.random.uniform(key, shape, dtype, -bound, bound)


class ConvBlock(nnx.Module):
  """The reference's Conv2dBlock: 3×3 conv (padding 1, bias) -> BatchNorm -> ReLU (if `relu`)."""

  def __init__(self, cin: int, cout: int, relu: bool = True, *, dtype=jnp.float32, rngs: nnx.Rngs):
    init = _torch_uniform(cin * 9)
    self.conv = nnx.Conv(cin, cout, (3, 3), padding=((1, 1), (1, 1)), kernel_init=init, bias_init=init, dtype=dtype,
                         rngs=rngs)
    self.bn = BatchNorm(cout, momentum=BN_MOMENTUM, epsilon=BN_EPSILON, dtype=dtype, rngs=rngs)
    self.relu = relu

  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    x = self.bn(self.conv(x), use_running_average=not train)
    return jax.nn.relu(x) if self.relu else x


def _down(x: jax.Array) -> jax.Array:
  """2×2 max-pool, stride 2: [B, H, W, C] -> [B, H/2, W/2, C]."""
  return nnx.max_pool(x, (2, 2), strides=(2, 2))


def _up(x: jax.Array) -> jax.Array:
  """Bilinear ×2 with half-pixel centres (torch `Upsample(scale_factor=2, mode='bilinear')`)."""
  b, h, w, c = x.shape
  return jax.image.resize(x, (b, 2 * h, 2 * w, c), "bilinear")


class Generator(nnx.Module):
  """The reference's InputAwareGenerator: normalised images [B, H, W, 3] -> squash(·) [B, H, W, out] in (0, 1).

  Level i of L = len(widths) down: two ConvBlocks to widths[i], max-pool; a middle ConvBlock; level j up: bilinear
  ×2, ConvBlock(c, c), ConvBlock(c, next) with c = widths[L−1−j] and next = widths[L−2−j], or `out_channels`
  without ReLU at the last level. H and W must be multiples of 2^L. Convolutions compute in `dtype`; the output is
  float32.
  """

  def __init__(self, widths: Sequence[int], out_channels: int, *, dtype=jnp.float32, rngs: nnx.Rngs):
    widths, down, cin = tuple(int(w) for w in widths), [], 3
    for width in widths:
      down.append(nnx.List([ConvBlock(cin, width, dtype=dtype, rngs=rngs),
                            ConvBlock(width, width, dtype=dtype, rngs=rngs)]))
      cin = width
    self.down = nnx.List(down)
    self.middle = ConvBlock(cin, cin, dtype=dtype, rngs=rngs)
    up = []
    for j in range(len(widths)):
      c = widths[-1 - j]
      last = j == len(widths) - 1
      cout = out_channels if last else widths[-2 - j]
      up.append(nnx.List([ConvBlock(c, c, dtype=dtype, rngs=rngs),
                          ConvBlock(c, cout, relu=not last, dtype=dtype, rngs=rngs)]))
    self.up = nnx.List(up)

  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    for first, second in self.down:
      x = _down(second(first(x, train), train))
    x = self.middle(x, train)
    for first, second in self.up:
      x = second(first(_up(x), train), train)
    return squash(x.astype(jnp.float32))


def build_models(block, seed: int) -> dict[str, nnx.Module]:
  """{'classifier': C, 'generator': G (3 channels), 'mask': M (1 channel)}, drawn from `seed`."""
  rngs = nnx.Rngs(seed)
  classifier = build_linear_classifier(block.model, block.num_classes, rngs)
  dtype = compute_dtype(block.model.dtype)
  return {"classifier": classifier, "generator": Generator(block.widths, 3, dtype=dtype, rngs=rngs),
          "mask": Generator(block.widths, 1, dtype=dtype, rngs=rngs)}


def _graphdefs(block) -> dict:
  """The three graphdefs (split into Param and BatchStat), built without allocating."""
  models = nnx.eval_shape(lambda: build_models(block, 0))
  return {name: nnx.split(model, nnx.Param, nnx.BatchStat)[0] for name, model in models.items()}


def _generator_graphdef(widths: Sequence[int], out_channels: int, dtype):
  """A Generator's graphdef (split into Param and BatchStat), built without allocating."""
  return nnx.split(nnx.eval_shape(lambda: Generator(widths, out_channels, dtype=dtype, rngs=nnx.Rngs(0))), nnx.Param,
                   nnx.BatchStat)[0]


def _merge(graphdefs, state: TrainState, name: str, params=None) -> nnx.Module:
  """Network `name` of the state (with `params` in place of its own, if given), a copy safe to run in a trace."""
  params = state.params[name] if params is None else params
  return nnx.merge(graphdefs[name], params, state.batch_stats[name], copy=True)


# ----------------------------------------------------------------------------------------------------------------
# Training


def make_optimizer(optim, steps_per_epoch: int) -> optax.GradientTransformation:
  """optim: name ('sgd' | 'adam'), lr, momentum (SGD), betas (Adam), weight_decay (coupled, as torch), milestones
  (epochs) and gamma: torch's MultiStepLR, lr · gamma^(milestones passed), counted in this optimiser's own updates."""
  lr = optax.piecewise_constant_schedule(
      optim.lr, {int(m) * steps_per_epoch: optim.gamma for m in sorted(optim.milestones)})
  if optim.name == "sgd":
    base = optax.sgd(lr, momentum=optim.momentum or None)
  else:
    base = optax.adam(lr, b1=optim.betas[0], b2=optim.betas[1])
  return optax.chain(optax.add_decayed_weights(optim.weight_decay), base) if optim.weight_decay else base


def init_state(block, txs: dict, mesh, seed: int) -> TrainState:
  """TrainState at step 0, replicated over `mesh`: params, batch_stats and opt_state are dicts keyed by NETS."""
  def init():
    split = {name: nnx.split(model, nnx.Param, nnx.BatchStat)[1:] for name, model in build_models(block, seed).items()}
    params = {name: split[name][0] for name in NETS}
    return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                      batch_stats={name: split[name][1] for name in NETS},
                      opt_state={name: txs[name].init(params[name]) for name in NETS})

  return jax.jit(init, out_shardings=parallel.replicated(mesh))()


def _replicated(x: jax.Array) -> jax.Array:
  """x gathered whole on every device of its mesh (a no-op without one)."""
  mesh = jax.typeof(x).sharding.mesh
  return x if mesh.empty else jax.sharding.reshard(x, jax.NamedSharding(mesh, jax.P()))


def _like(x: jax.Array, like: jax.Array) -> jax.Array:
  """x resharded as `like` (a no-op without a mesh)."""
  sharding = jax.typeof(like).sharding
  return x if sharding.mesh.empty else jax.sharding.reshard(x, sharding)


def _update(txs, names, state: TrainState, grads, batch_stats) -> tuple[TrainState, dict]:
  """Optimiser updates of the networks `names` only; the others, their batch statistics and optimiser states are
  left as they are. Returns the new state (step + 1) and the health norms."""
  params, opt_state, stats, updates = dict(state.params), dict(state.opt_state), dict(state.batch_stats), {}
  for name in names:
    updates[name], opt_state[name] = txs[name].update(grads[name], state.opt_state[name], state.params[name])
    params[name] = optax.apply_updates(state.params[name], updates[name])
    stats[name] = batch_stats[name]
  health = {"l2_grads": optax.global_norm(grads), "l2_params": optax.global_norm(params),
            "l2_updates": optax.global_norm(updates)}
  return TrainState(state.step + 1, params, stats, opt_state, state.extra), health


def make_step(graphdefs, txs, block, target: int, batch_size: int, steps_per_epoch: int,
              use_cond: bool | None = None):
  """-> step(state, batch, key) -> (state, metrics), pure; jit it with the state donated.

  batch: 'image' uint8 [B, H, W, 3], 'label' int32 [B] sharded along `data`, B = batch_size. The batch is cropped
  and flipped, then the step runs stage 1 (M alone) while state.step < mask_epochs · steps_per_epoch and stage 2
  (C and G, M frozen; backdoor rows labelled `target`) after: one compiled function in which only the running
  stage's networks, batch statistics and optimiser states change. metrics: loss, loss_norm, loss_div, loss_ce,
  bd_accuracy, cross_accuracy, clean_accuracy (0 where the stage does not compute them), stage (1 or 2), health.

  use_cond: the stage switch is `jax.lax.cond` (only the running stage is computed), or both stages are computed
  and the running one's outputs selected leaf by leaf (`jnp.where`). None: cond except on CPU, where XLA runs the
  backward convolutions inside a conditional over 10× slower than outside (measured on jax 0.10.2), so that
  computing both stages is the faster choice there. Both give the same result.
  """
  if use_cond is None:
    use_cond = jax.default_backend() != "cpu"
  mean, std = jnp.asarray(block.model.mean), jnp.asarray(block.model.std)
  normalize = lambda x: augment.normalize(x, mean, std)
  mask_steps = block.train.mask_epochs * steps_per_epoch
  k = num_backdoor(block.pratio, batch_size)
  partner = (np.arange(batch_size) + batch_size // 2) % batch_size  # stage 1: x2 = the batch rolled by B/2
  source = (2 * k + np.arange(k)) % batch_size  # stage 2: cross row k + i takes the pattern of row 2k + i
  backdoor_rows, cross_rows = np.arange(batch_size) < k, (np.arange(batch_size) >= k) & (np.arange(batch_size) < 2 * k)
  zero = jnp.zeros((), jnp.float32)

  def mask_stage(state: TrainState, x, labels):
    del labels
    x2 = _like(_replicated(x)[partner], x)

    def loss_fn(params):
      net = _merge(graphdefs, state, "mask", params)
      m1, m2 = threshold(net(normalize(x), train=True)), threshold(net(normalize(x2), train=True))
      norm = jnp.mean(jax.nn.relu(m1 - block.mask_density))
      div = diversity_loss(normalize(x), normalize(x2), m1, m2, block.epsilon)
      return block.lambda_norm * norm + block.lambda_div * div, (norm, div, nnx.state(net, nnx.BatchStat))

    (loss, (norm, div, stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params["mask"])
    state, health = _update(txs, ("mask",), state, {"mask": grads}, {"mask": stats})
    return state, {"loss": loss, "loss_norm": norm, "loss_div": div, "loss_ce": zero, "bd_accuracy": zero,
                   "cross_accuracy": zero, "clean_accuracy": zero, "stage": jnp.float32(1), **health}

  def joint_stage(state: TrainState, x, labels):
    whole = _replicated(x)  # the backdoor and cross sub-batches are small: built whole on every device
    x_bd, x_cross, x_source = whole[:k], whole[k:2 * k], whole[source]
    masks = threshold(_merge(graphdefs, state, "mask")(normalize(jnp.concatenate([x_bd, x_source]))))  # inference
    m_bd, m_source = jax.lax.stop_gradient(masks[:k]), jax.lax.stop_gradient(masks[k:])
    targets = jnp.where(backdoor_rows, target, labels)

    def loss_fn(params):
      generator = _merge(graphdefs, state, "generator", params["generator"])
      p_bd, p_source = generator(normalize(x_bd), train=True), generator(normalize(x_source), train=True)
      changed = jnp.concatenate([combine(x_bd, p_bd, m_bd), combine(x_cross, p_source, m_source), whole[2 * k:]])
      classifier = _merge(graphdefs, state, "classifier", params["classifier"])
      logits = classifier(normalize(_like(changed, x)), train=True)
      ce = optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()
      div = diversity_loss(normalize(x_bd), normalize(x_source), normalize(p_bd), normalize(p_source), block.epsilon)
      stats = {"classifier": nnx.state(classifier, nnx.BatchStat), "generator": nnx.state(generator, nnx.BatchStat)}
      return ce + block.lambda_div * div, (ce, div, logits, stats)

    trained = {name: state.params[name] for name in ("classifier", "generator")}
    (loss, (ce, div, logits, stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(trained)
    state, health = _update(txs, ("classifier", "generator"), state, grads, stats)
    correct = jnp.argmax(logits, -1) == targets
    rate = lambda rows: jnp.sum(jnp.where(rows, correct, False)) / max(int(rows.sum()), 1)
    return state, {"loss": loss, "loss_norm": zero, "loss_div": div, "loss_ce": ce,
                   "bd_accuracy": rate(backdoor_rows), "cross_accuracy": rate(cross_rows),
                   "clean_accuracy": rate(~backdoor_rows & ~cross_rows), "stage": jnp.float32(2), **health}

  def step(state: TrainState, batch, key):
    key = jax.random.fold_in(key, state.step)
    x = augment.to_float(augment.crop_flip(key, batch["image"], block.augment.padding, block.augment.flip_prob))
    in_mask_stage = state.step < mask_steps
    if use_cond:
      return jax.lax.cond(in_mask_stage, mask_stage, joint_stage, state, x, batch["label"])
    return jax.tree.map(lambda first, second: jnp.where(in_mask_stage, first, second),
                        mask_stage(state, x, batch["label"]), joint_stage(state, x, batch["label"]))

  return step


def training(block, images: np.ndarray, labels: np.ndarray, target: int, mesh, seed: int):
  """-> (state at step 0, jitted donating step, batch_fn, num_steps): the two stages on uint8 images [N, H, W, 3]
  with labels [N], (mask_epochs + epochs) · (N // batch_size) steps; backdoor rows take the label `target`. seed
  draws the initial weights and the batch order."""
  labels = np.asarray(labels)
  if labels.size and (labels.min() < 0 or labels.max() >= block.num_classes):
    raise UserError(f"labels run over 0..{int(labels.max())} but {PREFIX}.num_classes is {block.num_classes}; "
                    f"set it to the data set's class count")
  if not 0 <= target < block.num_classes:
    raise UserError(f"target class {target} is outside 0..{block.num_classes - 1}; fix config.poison.target")
  _check_size(images.shape[1], block.widths)
  _check_size(images.shape[2], block.widths)
  batch_size = block.train.batch_size
  dataset = DeviceDataset({"image": images, "label": labels.astype(np.int32)}, mesh, batch_size, seed)
  num_steps = (block.train.mask_epochs + block.train.epochs) * dataset.steps_per_epoch
  txs = {name: make_optimizer(block.optim[name], dataset.steps_per_epoch) for name in NETS}
  state = init_state(block, txs, mesh, seed)
  step = jax.jit(make_step(_graphdefs(block), txs, block, int(target), batch_size, dataset.steps_per_epoch),
                 donate_argnums=0)
  return state, step, dataset.batch, num_steps


# ----------------------------------------------------------------------------------------------------------------
# Poisoning


def _concrete_to_host(leaf):
  """A concrete array -> its host copy, a constant that a jit runs on any device or mesh; a traced one as it is."""
  return leaf if isinstance(leaf, jax.core.Tracer) else np.asarray(leaf)


def apply_pattern(block, state: TrainState, images: jax.Array, pattern_source_images: jax.Array) -> jax.Array:
  """uint8 [B, H, W, 3] -> uint8: x + (G(s) − x) · M(s), s = pattern_source_images (uint8 [B, H, W, 3], e.g. the
  images themselves for a backdoor sample, other images for a cross sample), G and M in inference mode, in [0, 1]
  floats, then `quantize`. Jittable, on batches sharded along `data` or on host arrays; a state closed over (not
  a jit argument) is used through a host copy of G and M, so that it does not tie the jit to the state's mesh."""
  def net(name, channels):
    params, stats = jax.tree.map(_concrete_to_host, (state.params[name], state.batch_stats[name]))
    return nnx.merge(_generator_graphdef(block.widths, channels, compute_dtype(block.model.dtype)), params, stats,
                     copy=True)

  source = augment.normalize(augment.to_float(pattern_source_images), jnp.asarray(block.model.mean),
                             jnp.asarray(block.model.std))
  pattern, mask = net("generator", 3)(source), threshold(net("mask", 1)(source))
  return quantize(combine(augment.to_float(images), pattern, mask))


def test_trigger(block, state: TrainState) -> Callable[[jax.Array], jax.Array]:
  """The test-time trigger, the training-time one: each image with its own pattern and mask (`apply_pattern`)."""
  return lambda images: apply_pattern(block, state, images, images)


def poison_images(block, state: TrainState, images: np.ndarray, labels: np.ndarray, key: jax.Array,
                  mesh) -> np.ndarray:
  """uint8 [P, H, W, 3]: every image with its own pattern and mask (`apply_pattern`; deterministic, so labels and
  key are unused). Batches of poison_batch_size rows sharded along `data`, the last padded with zeros (inference
  mode keeps the rows independent)."""
  del labels, key
  _check_size(images.shape[1], block.widths)
  _check_size(images.shape[2], block.widths)
  trigger = jax.jit(lambda state, x: apply_pattern(block, state, x, x))
  n, devices = len(images), mesh.devices.size
  size = min(block.poison_batch_size, -(-n // devices) * devices)  # no more padding than the mesh needs
  out = []
  for start in range(0, n, size):
    rows = min(size, n - start)
    batch = np.zeros((size, *images.shape[1:]), np.uint8)
    batch[:rows] = images[start:start + rows]
    out.append(np.asarray(trigger(state, parallel.put_batch(batch, mesh)))[:rows])
  return np.concatenate(out) if out else np.zeros((0, *images.shape[1:]), np.uint8)
