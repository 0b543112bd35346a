"""MIMIC's mutual-information estimator (Han et al., TIFS 2025; wssun/MIMIC): the MINE Donsker-Varadhan lower
bound between a stage's output and the encoder's feature, and the per-stage attention-transfer weights it sets.

For each tap (layer1..layer4 of the student's backbone) a statistics network T [flattened stage output ++ feature]
-> hidden -> hidden -> 1 (ReLU) is trained to maximise the DV bound  E_joint[T] - log E_marginal[exp T]  (the
marginal pairs each map with the feature of another image of the batch), for `mi_epochs` over the defender's images
in inference mode. After every epoch the bound is evaluated batch by batch over the same images, a NaN or negative
batch counting 0, and averaged; the layer's MI is the mean of the last `mi_last_epochs` epochs' estimates. The
weights are base_weight + momentum_weight * mi / sum(mi), one per tap.

Sources (wssun/MIMIC): models/scheduler.py (`estimate_mi`, `test_mi`, `update_weight`: Adam lr 1e-3 with weight
decay 1e-5, EPOCHS=200 from MIMIC.py, the last 10 epochs, clamping), estimator/DV.py (the bound, the marginal as a
random permutation of the features, fixed points included), estimator/TNet.py (the MLP, width 512, torch's default
Linear init), models/hook.py (the map is the stage's output `f.f.3`..`f.f.6` flattened), models/simclr_model.py
(the feature is the backbone's pooled feature L2-normalised: SimCLR.forward returns F.normalize(feature)), MIMIC.py
(the estimators run on the random student before distillation, on `memory_loader`: the defender's subset with the
test transform, batch args.batch_size = 128, shuffle=False, drop_last=False, model.eval()).

Batches are the official ones: the images in order, chunks of `mi_batch_size`, the last one partial. Shapes stay
static by zero-padding that last chunk and masking the padding out of the bound and out of the permutation.
Departures, none of which changes the quantity estimated:
- the maps are flattened NHWC (torch: NCHW), a fixed permutation of T's first inputs;
- T's first layer is split into a map part and a feature part, so the map's product, the largest, is computed once
  for the joint and the marginal pairs (the official T concatenates and runs twice; same function, same init);
- log E[exp T] is a logsumexp (the official exp-then-mean overflows to inf for large T);
- the features of a layer are computed once (the encoder is frozen and inference mode is deterministic) and kept
  on the devices, each batch sharded along `data`: N x (H_l W_l C_l + D) float32 in all, split over the devices
  (CIFAR-size ResNet-18, 2,500 images: 0.65 GB at layer1), instead of re-running the encoder every batch (quick
  setting, CPU: the forward of a batch of 64 takes 54 ms, an estimator step 9-66 ms and an evaluation 2-13 ms);
- when every layer's MI is 0 (official: 0/0, NaN weights) the momentum is shared equally. This happens: a random
  student's pooled features are nearly parallel (mean cosine 0.99 between images at the quick setting), and the
  quick setting's estimates are all 0 on its digits subset.
"""

import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from jaxpurify import augment, parallel, stages
from jaxpurify.encoders import Encoder
from jaxpurify.errors import UserError
from jaxpurify.losses import l2_normalize
from jaxpurify.train.state import TrainState, apply_gradients, create_state, make_optimizer


def dv_bound(t_joint: jax.Array, t_marginal: jax.Array, valid: jax.Array | None = None) -> jax.Array:
  """The Donsker-Varadhan bound  mean(t_joint) - log mean(exp t_marginal)  over the rows where `valid` (default:
  all). t_joint, t_marginal float [B]; valid bool [B] -> float32 scalar."""
  if valid is None:
    valid = jnp.ones(t_joint.shape, bool)
  count = jnp.sum(valid)
  joint = jnp.sum(jnp.where(valid, t_joint, 0.0)) / count
  return joint - (jax.nn.logsumexp(jnp.where(valid, t_marginal, -jnp.inf)) - jnp.log(count))


def _torch_uniform(fan_in: int):
  """torch.nn.Linear's default init for kernel and bias: U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
  bound = fan_in ** -0.5
  return lambda key, shape, dtype=jnp.float32: jax.random.uniform(key, shape, dtype, -bound, bound)


class StatisticsNetwork(nnx.Module):
  """MIMIC's T (estimator/TNet.py): [map [B, M] ++ feature [B, D]] -> hidden -> hidden -> 1, ReLU, with the first
  layer held as a map part (with the bias) and a feature part."""

  def __init__(self, map_dim: int, feature_dim: int, hidden: int, *, rngs: nnx.Rngs):
    init = _torch_uniform(map_dim + feature_dim)  # the first layer's fan-in is the concatenation's
    self.map_in = nnx.Linear(map_dim, hidden, kernel_init=init, bias_init=init, rngs=rngs)
    self.feature_in = nnx.Linear(feature_dim, hidden, use_bias=False, kernel_init=init, rngs=rngs)
    self.hidden = nnx.Linear(hidden, hidden, kernel_init=_torch_uniform(hidden), bias_init=_torch_uniform(hidden),
                             rngs=rngs)
    self.out = nnx.Linear(hidden, 1, kernel_init=_torch_uniform(hidden), bias_init=_torch_uniform(hidden),
                          rngs=rngs)

  def _head(self, h: jax.Array) -> jax.Array:
    return self.out(jax.nn.relu(self.hidden(jax.nn.relu(h))))[:, 0]

  def __call__(self, maps: jax.Array, features: jax.Array) -> jax.Array:
    """T(map, feature): [B, M], [B, D] -> [B]."""
    return self._head(self.map_in(maps) + self.feature_in(features))

  def pair(self, maps: jax.Array, features: jax.Array, shuffled: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(T(maps, features), T(maps, shuffled)) [B] each, the maps' product computed once."""
    h = self.map_in(maps)
    return self._head(h + self.feature_in(features)), self._head(h + self.feature_in(shuffled))


def _gathered(x: jax.Array) -> jax.Array:
  """x with its rows gathered onto every device (replicated on x's own mesh; needs no mesh context)."""
  mesh = jax.typeof(x).sharding.mesh
  return x if mesh.empty else jax.sharding.reshard(x, jax.NamedSharding(mesh, jax.P()))


def marginal(features: jax.Array, valid: jax.Array, key: jax.Array) -> jax.Array:
  """features [B, D] (rows possibly sharded) with the valid rows randomly permuted among themselves (a uniform
  permutation, fixed points included, as torch.randperm); padding rows keep padding rows. Sharded as `features`."""
  every, valid = _gathered(features), _gathered(valid)
  order = jnp.argsort(jnp.where(valid, jax.random.uniform(key, valid.shape), 2.0))  # valid rows first, shuffled
  slots = jnp.argsort(~valid, stable=True)  # the valid positions first, in order
  permutation = jnp.zeros_like(order).at[slots].set(order)
  return every.at[permutation].get(out_sharding=jax.typeof(features).sharding)


def make_step(graphdef, tx):
  """-> step(state, batch, key) -> (state, metrics): one ascent step of the DV bound of T (`graphdef`, params in
  state.params); pure, jit it with the state donated. batch: 'map' float32 [B, M], 'feature' float32 [B, D],
  'valid' bool [B], sharded along `data`; the marginal's permutation from fold_in(key, state.step). metrics: loss
  (-bound), bound, health norms."""

  def step(state: TrainState, batch, key):
    shuffled = marginal(batch["feature"], batch["valid"], jax.random.fold_in(key, state.step))

    def loss_fn(params):
      t_joint, t_marginal = nnx.merge(graphdef, params).pair(batch["map"], batch["feature"], shuffled)
      return -dv_bound(t_joint, t_marginal, batch["valid"])

    loss, grads = jax.value_and_grad(loss_fn)(state.params)
    state, health = apply_gradients(state, tx, grads, state.batch_stats)
    return state, {"loss": loss, "bound": -loss, **health}

  return step


def make_estimate(graphdef):
  """-> estimate(params, batch, key) -> float32 scalar: the DV bound of one batch (a fresh permutation from
  `key`), 0 when NaN or negative (scheduler.py `test_mi`)."""

  def estimate(params, batch, key):
    shuffled = marginal(batch["feature"], batch["valid"], key)
    t_joint, t_marginal = nnx.merge(graphdef, params).pair(batch["map"], batch["feature"], shuffled)
    bound = dv_bound(t_joint, t_marginal, batch["valid"])
    return jnp.where(jnp.isnan(bound) | (bound < 0), 0.0, bound)

  return estimate


@functools.lru_cache(maxsize=16)
def _forward(graphdef, mean: tuple, std: tuple):
  """One jitted inference forward per (architecture, normalisation): uint8 [B, H, W, 3] sharded along `data` ->
  ({tap: its map flattened [B, H_l W_l C_l]}, the pooled feature L2-normalised [B, D]), float32, rows sharded."""

  @jax.jit
  def forward(params, batch_stats, images):
    x = augment.normalize(augment.to_float(images), jnp.asarray(mean), jnp.asarray(std))
    feature, taps = nnx.merge(graphdef, params, batch_stats)(x, train=False)
    maps = {name: tap.reshape(x.shape[0], -1).astype(jnp.float32) for name, tap in taps.items()}
    return maps, l2_normalize(feature.astype(jnp.float32))

  return forward


def layer_batches(encoder: Encoder, model_config, images: np.ndarray, tap: str, batch_size: int, mesh) -> list[dict]:
  """uint8 images [N, H, W, 3] -> the estimator's batches of tap `tap`: the images in order in chunks of
  `batch_size` (the last zero-padded), each {'map', 'feature', 'valid'} as `make_step` reads them, on the mesh."""
  forward = _forward(encoder.graphdef, tuple(model_config.mean), tuple(model_config.std))
  n, batches = len(images), []
  for start in range(0, n, batch_size):
    chunk = images[start:start + batch_size]
    padded = np.concatenate([chunk, np.zeros((batch_size - len(chunk), *chunk.shape[1:]), np.uint8)])
    maps, features = forward(encoder.params, encoder.batch_stats, parallel.put_batch(padded, mesh))
    valid = parallel.put_batch(np.arange(batch_size) < len(chunk), mesh)
    batches.append({"map": maps[tap], "feature": features, "valid": valid})
  return batches


def estimator_optimizer(block):
  """Adam at mi_lr with torch's coupled weight decay mi_weight_decay (scheduler.py)."""
  return make_optimizer(ml_collections.ConfigDict(dict(name="adam", lr=block.mi_lr,
                                                       weight_decay=block.mi_weight_decay)))


def estimates(batches: list[dict], hidden: int, epochs: int, tx, mesh, key: jax.Array) -> np.ndarray:
  """Trains a fresh T (width `hidden`, init from fold_in(key, 0)) on `batches` in order for `epochs` with `tx`
  (steps keyed by fold_in(key, 1)) and returns the bound evaluated after each epoch: float64 [epochs], the mean over
  the batches of the clamped per-batch bound (`make_estimate`, keyed by fold_in(key, 2), epoch, batch).
  RuntimeError when the training loss is not finite (the official code asserts)."""
  map_dim, feature_dim = batches[0]["map"].shape[1], batches[0]["feature"].shape[1]
  graphdef, state = create_state(
      lambda: StatisticsNetwork(map_dim, feature_dim, hidden, rngs=nnx.Rngs(jax.random.fold_in(key, 0))), tx, mesh)
  step, estimate = jax.jit(make_step(graphdef, tx), donate_argnums=0), jax.jit(make_estimate(graphdef))
  train_key, eval_key = jax.random.fold_in(key, 1), jax.random.fold_in(key, 2)
  per_epoch = []
  for epoch in range(epochs):
    for batch in batches:
      state, metrics = step(state, batch, train_key)
    epoch_key = jax.random.fold_in(eval_key, epoch)
    per_epoch.append(sum(estimate(state.params, batch, jax.random.fold_in(epoch_key, b))
                         for b, batch in enumerate(batches)) / len(batches))
  if not np.isfinite(float(metrics["loss"])):
    raise RuntimeError(f"the DV estimator's loss is {float(metrics['loss'])} (map width {map_dim}); its training "
                       "diverged: lower config.baseline.mimic.mi_lr")
  return np.asarray(jax.device_get(per_epoch), np.float64)


def layer_mi(encoder: Encoder, model_config, images: np.ndarray, taps, block, mesh, seed: int,
             max_steps: int = 0) -> dict[str, float]:
  """MIMIC's MI estimate of each tap of `encoder` with its feature, on uint8 images [N, H, W, 3] -> {tap: mi}
  (the mean of the last block.mi_last_epochs epochs' estimates, `estimates`). block: mi_epochs, mi_lr,
  mi_weight_decay, mi_hidden, mi_batch_size, mi_last_epochs. Tap i's estimator is keyed by fold_in(key(seed), i).
  max_steps: a smoke run's cap (whole epochs, `stages.capped_epochs`)."""
  images = np.asarray(images)
  if len(images) < 2:
    raise UserError(f"MIMIC's MI estimator needs at least 2 images to pair them at random, got {len(images)}; raise "
                    "config.defense.clean_fraction")
  tx, key, mi = estimator_optimizer(block), jax.random.key(seed), {}
  for i, tap in enumerate(taps):
    batches = layer_batches(encoder, model_config, images, tap, block.mi_batch_size, mesh)
    epochs = stages.capped_epochs(max_steps, block.mi_epochs, len(batches))
    per_epoch = estimates(batches, block.mi_hidden, epochs, tx, mesh, jax.random.fold_in(key, i))
    mi[tap] = float(np.mean(per_epoch[-block.mi_last_epochs:]))
    del batches
  return mi


def layer_weights(mi: dict, base: float, momentum: float) -> tuple[float, ...]:
  """{tap: mi} (in tap order) -> per-tap AT weights base + momentum * mi / sum(mi) (scheduler.py `update_weight`);
  momentum / len(mi) each when every mi is 0."""
  values = np.asarray(list(mi.values()), np.float64)
  shares = values / values.sum() if values.sum() > 0 else np.full(len(values), 1.0 / len(values))
  return tuple(float(w) for w in base + momentum * shares)


def check_block(block, devices: int) -> None:
  """UserError on mi_* settings that cannot run (the ranges are validation's rules)."""
  if block.mi_last_epochs > block.mi_epochs:
    raise UserError(f"config.baseline.mimic.mi_last_epochs={block.mi_last_epochs} exceeds mi_epochs="
                    f"{block.mi_epochs}; set it to at most mi_epochs")
  if block.mi_batch_size % devices:
    raise UserError(f"config.baseline.mimic.mi_batch_size={block.mi_batch_size} is not divisible by the {devices} "
                    f"devices; set it to a multiple of {devices}")
