"""SSL-Cleanse's detector pieces (ssl_cleanse.py says what they follow): SWK pseudo-classes, the kNN attack success,
the trigger step of all clusters at once and the reversal loop with its cost schedule."""

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from jaxpurify import augment, evaluation, parallel, stages
from jaxpurify.errors import UserError
from jaxpurify.losses import l2_normalize
from jaxpurify.train.state import TrainState, apply_gradients

UNIT_EPS = 1e-6  # the initial uniform draw is kept inside (0, 1), where arctanh is finite


# --- SWK: the number of pseudo-classes -----------------------------------------------------------------------------


def kneedle(ks: np.ndarray, sse: np.ndarray) -> int:
  """The knee of a decreasing convex curve (Kneedle): ks int [n], sse [n] -> the k whose point, both axes scaled
  to [0, 1], lies farthest below the chord from the first to the last point."""
  x = (ks - ks[0]) / (ks[-1] - ks[0])
  spread = sse.max() - sse.min()
  y = (sse - sse.min()) / spread if spread > 0 else np.zeros_like(x)
  return int(ks[np.argmax(1.0 - x - y)])


def swk(ks: np.ndarray, sse: np.ndarray, window: int) -> tuple[int, list[int]]:
  """Sliding Window Kneedle: the knee of every `window` consecutive points of the SSE curve -> (the knee most
  windows find, the smallest on a tie; every window's knee)."""
  window = min(window, len(ks))
  votes = [kneedle(ks[i:i + window], sse[i:i + window]) for i in range(len(ks) - window + 1)]
  values, counts = np.unique(votes, return_counts=True)
  return int(values[np.argmax(counts)]), votes


def cluster(features: np.ndarray, block, seed: int) -> tuple[np.ndarray, dict]:
  """features [N, D] -> (pseudo-class labels int [N] in 0..K-1, {'sse': {k: inertia}, 'swk_votes': [...]}):
  k-means (sklearn, block.kmeans_restarts initialisations) with K = block.num_clusters, or chosen by `swk` over
  block.min_clusters..max_clusters when that is 0."""
  from sklearn.cluster import KMeans  # pylint: disable=g-import-not-at-top  (1.5 s to import; only here)

  fit = lambda k: KMeans(n_clusters=k, n_init=block.kmeans_restarts, random_state=seed).fit(features)
  if block.num_clusters:
    fitted = fit(block.num_clusters)
    return fitted.labels_.astype(np.int64), {"sse": {str(block.num_clusters): float(fitted.inertia_)}}
  ks = np.arange(block.min_clusters, block.max_clusters + 1)
  fits = {int(k): fit(int(k)) for k in ks}
  sse = np.array([fits[int(k)].inertia_ for k in ks])
  chosen, votes = swk(ks, sse, block.window)
  return fits[chosen].labels_.astype(np.int64), {"sse": {str(k): float(s) for k, s in zip(ks, sse)},
                                                 "swk_votes": votes}


# --- the kNN attack success ----------------------------------------------------------------------------------------


def take(table: jax.Array, index: jax.Array) -> jax.Array:
  """table[index], sharded like `index` (a replicated table gathered at sharded positions)."""
  sharding = jax.typeof(index).sharding
  return table[index] if sharding.mesh.empty else table.at[index].get(out_sharding=sharding)


def knn_labels(queries: jax.Array, bank: jax.Array, bank_labels: jax.Array, num_labels: int, k: int = 1):
  """The majority label of each query's k nearest bank rows (Euclidean; ties: the smallest label, as the official
  `eval_knn`'s unique-then-argmax): queries [Q, D] (rows may be sharded), bank [N, D], bank_labels int [N] -> int
  [Q]."""
  distances = (jnp.sum(queries * queries, -1, keepdims=True) - 2.0 * queries @ bank.T
               + jnp.sum(bank * bank, -1)[None])
  _, nearest = jax.lax.top_k(-distances, k)
  votes = jnp.sum(jax.nn.one_hot(take(bank_labels, nearest), num_labels, dtype=jnp.int32), axis=1)
  return jnp.argmax(votes, axis=-1)


def knn_attack_success(queries: jax.Array, bank: jax.Array, bank_labels: jax.Array, target: int, num_labels: int,
                       k: int = 1) -> jax.Array:
  """The fraction of queries [Q, D] (features of stamped images) whose kNN label over the bank [N, D] of clean
  features with pseudo-class labels int [N] is `target` (official utils.eval_knn, k = 1 there)."""
  return jnp.mean(knn_labels(queries, bank, bank_labels, num_labels, k) == target)


# --- one step of every cluster's trigger ---------------------------------------------------------------------------


def squash(raw: jax.Array) -> jax.Array:
  """The official tanh parameterisation of a mask or pattern: tanh(raw) / 2 + 0.5, in (0, 1)."""
  return jnp.tanh(raw) / 2.0 + 0.5


def stamp(x: jax.Array, mask: jax.Array, pattern: jax.Array) -> jax.Array:
  """x (1 - mask) + pattern mask, broadcast (official utils.draw; affine, so normalising before or after is the
  same)."""
  return x * (1.0 - mask) + pattern * mask


def initial_triggers(key: jax.Array, num_clusters: int, height: int, width: int) -> dict:
  """Raw {'mask': [K, H, W, 1], 'pattern': [K, H, W, 3]} whose squashed values are uniform in (0, 1) (the official
  arctanh((rand - 0.5) * 2))."""
  k_mask, k_pattern = jax.random.split(key)
  raw = lambda k, c: jnp.arctanh(2.0 * jax.random.uniform(k, (num_clusters, height, width, c), jnp.float32,
                                                          UNIT_EPS, 1.0 - UNIT_EPS) - 1.0)
  return {"mask": raw(k_mask, 1), "pattern": raw(k_pattern, 3)}


def stamped_features(encoder, raw: dict, images: jax.Array, mean, std) -> jax.Array:
  """uint8 images [B, K, H, W, 3] (or [B, 1, ...]: each image under every trigger), image b of column k stamped with
  cluster k's trigger -> the encoder's features [B, K, D] (inference mode)."""
  mask, pattern = squash(raw["mask"]), squash(raw["pattern"])
  x = augment.normalize(stamp(augment.to_float(images), mask[None], pattern[None]), mean, std)
  b, k = x.shape[:2]
  features, _ = encoder(x.reshape(b * k, *x.shape[2:]), train=False)
  return features.astype(jnp.float32).reshape(b, k, -1)


def make_trigger_step(encoder_graphdef, tx, model_config):
  """-> step(state, batch, key) -> (state, metrics): one update of every cluster's trigger; pure, jit it with the
  state donated.

  state.params: raw {'mask': [K, H, W, 1], 'pattern': [K, H, W, 3]}. batch: 'image' uint8 [B, K, H, W, 3] (column
  k: images of the other clusters) and 'target' [B, K, D] (features of cluster k's members), both sharded along
  `data`; 'lam' [K] (each cluster's cost) and 'encoder' {'params', 'batch_stats'}, replicated. Per cluster k the
  official loss, 2 - 2 cos(f(stamped), target) averaged over the batch plus lam_k mean(mask_k pattern_k); the step
  descends their sum, whose gradient in trigger k is its own loss's. `key` is unused (the step is deterministic).
  metrics: loss (the sum), asr_loss [K], reg [K] (before the update) and the health norms.
  """
  mean, std = tuple(model_config.mean), tuple(model_config.std)

  def step(state: TrainState, batch, key):
    del key
    encoder = nnx.merge(encoder_graphdef, batch["encoder"]["params"], batch["encoder"]["batch_stats"])
    target = l2_normalize(batch["target"])

    def loss_fn(raw):
      features = l2_normalize(stamped_features(encoder, raw, batch["image"], mean, std))
      asr_loss = 2.0 - 2.0 * jnp.mean(jnp.sum(features * target, -1), axis=0)
      reg = jnp.mean(squash(raw["mask"]) * squash(raw["pattern"]), axis=(1, 2, 3))
      return jnp.sum(asr_loss + batch["lam"] * reg), (asr_loss, reg)

    (loss, (asr_loss, reg)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    state, health = apply_gradients(state, tx, grads, state.batch_stats)
    return state, {"loss": loss, "asr_loss": asr_loss, "reg": reg, **health}

  return step


# --- the reversal loop ---------------------------------------------------------------------------------------------


def trigger_pairs(labels: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
  """Per cluster k as target: N - (largest cluster) images of the other clusters, drawn without replacement
  (official torch.randperm), each paired with a random member of k (drawn with replacement, official
  DatasetCluster) -> (others, partners), positions int [K, M]."""
  num_clusters, counts = labels.max() + 1, np.bincount(labels)
  count = len(labels) - counts.max()
  others, partners = [], []
  for k in range(num_clusters):
    others.append(rng.permutation(np.flatnonzero(labels != k))[:count])
    partners.append(rng.choice(np.flatnonzero(labels == k), count))
  return np.stack(others), np.stack(partners)


class Schedule(NamedTuple):
  """The official cost schedule of every cluster (NC's): costs lam [K], counters, the best trigger size so far."""
  lam: np.ndarray
  set_counter: np.ndarray
  up_counter: np.ndarray
  down_counter: np.ndarray
  reg_best: np.ndarray


def initial_schedule(num_clusters: int) -> Schedule:
  zeros = lambda: np.zeros(num_clusters, np.int64)
  return Schedule(np.zeros(num_clusters), zeros(), zeros(), zeros(), np.full(num_clusters, np.inf))


def next_schedule(s: Schedule, asr: np.ndarray, reg: np.ndarray, block) -> tuple[Schedule, np.ndarray]:
  """One epoch's end of detector.py, every cluster at once: asr [K] (kNN attack success), reg [K] (the epoch's
  mean trigger size) -> (the next schedule, improved bool [K]: the trigger to keep as the best). A trigger improves
  when asr > threshold and reg < the best; the cost is set to block.lam after `patience` epochs at asr >= threshold,
  then multiplied (divided) by lam_multiplier after `patience` epochs in a row at (below) the threshold."""
  reached = asr >= block.attack_succ_threshold
  improved = (asr > block.attack_succ_threshold) & (reg < s.reg_best)
  reg_best = np.where(improved, reg, s.reg_best)
  unset = s.lam == 0
  set_counter = np.where(unset & reached, s.set_counter + 1, 0)
  initialise = unset & reached & (set_counter >= block.patience)
  lam = np.where(initialise, block.lam, s.lam)
  up, down = np.where(initialise, 0, s.up_counter), np.where(initialise, 0, s.down_counter)
  up, down = np.where(reached, up + 1, 0), np.where(reached, 0, down + 1)
  raise_ = (lam != 0) & (up >= block.patience)
  lower = (lam != 0) & ~raise_ & (down >= block.patience)
  lam = np.where(raise_, lam * block.lam_multiplier, np.where(lower, lam / block.lam_multiplier, lam))
  up, down = np.where(raise_, 0, up), np.where(lower, 0, down)
  return Schedule(lam, set_counter, up, down, reg_best), improved


@functools.partial(jax.jit, static_argnames="out_sharding")
def _gather(images, features, others, partners, out_sharding):
  """Rows `others` of images and `partners` of features (positions [B, K] sharded along `data`)."""
  return {"image": images.at[others].get(out_sharding=out_sharding),
          "target": features.at[partners].get(out_sharding=out_sharding)}


@functools.lru_cache(maxsize=8)
def _hits_fn(encoder_graphdef, mean: tuple, std: tuple, num_clusters: int):
  """One jitted (raw triggers, encoder, bank, labels, uint8 images [B, H, W, 3]) -> float [B, K]: 1 where image b
  under trigger k has kNN (k = 1) label k."""

  @jax.jit
  def hits(raw, encoder, bank, bank_labels, images):
    model = nnx.merge(encoder_graphdef, encoder["params"], encoder["batch_stats"])
    features = stamped_features(model, raw, images[:, None], mean, std)
    b = features.shape[0]
    labels = knn_labels(features.reshape(b * num_clusters, -1), bank, bank_labels, num_clusters).reshape(b, -1)
    return (labels == jnp.arange(num_clusters)).astype(jnp.float32)

  return hits


def batch_size(wanted: int, examples: int, devices: int) -> int:
  """min(wanted, examples) rounded down to a multiple of `devices`; UserError when that is 0."""
  size = min(wanted, examples) // devices * devices
  if size == 0:
    raise UserError(f"SSL-Cleanse reverses each trigger on {examples} images of the other clusters, fewer than the "
                    f"{devices} devices; raise config.defense.clean_fraction or set "
                    "config.baseline.ssl_cleanse.num_clusters")
  return size


def trigger_epoch(step, state, others: np.ndarray, partners: np.ndarray, order: np.ndarray, size: int, constants,
                  extra: dict, mesh, key) -> tuple[TrainState, np.ndarray]:
  """One epoch of `step` over the pairs (others, partners [K, M]) in each cluster's `order` [K, M], batches of
  `size` per cluster (the remainder dropped, official drop_last) -> (state, each cluster's mean reg [K])."""
  regs = []
  for s in range(others.shape[1] // size):
    cols = order[:, s * size:(s + 1) * size]
    positions = parallel.put_batch({"others": np.take_along_axis(others, cols, 1).T.astype(np.int32),
                                    "partners": np.take_along_axis(partners, cols, 1).T.astype(np.int32)}, mesh)
    batch = _gather(constants["images"], constants["features"], positions["others"], positions["partners"],
                    parallel.batch_sharded(mesh))
    state, metrics = step(state, batch | extra, key)
    regs.append(metrics["reg"])
  return state, np.mean(np.stack(jax.device_get(regs)), axis=0)


def reverse_triggers(encoder, model_config, images: np.ndarray, features: np.ndarray, labels: np.ndarray, block,
                     eval_batch: int, mesh, seed: int, max_steps: int = 0) -> dict:
  """detector.py's loop for every cluster as target at once, block.trigger_epochs epochs: uint8 images
  [N, H, W, 3], their raw features [N, D] and pseudo-classes int [N] -> {'mask' [K, H, W, 1], 'pattern'
  [K, H, W, 3] (each cluster's best trigger, its last where the attack never succeeded), 'size' [K] (the best
  mean(mask pattern), 1 where never reached: the official default), 'asr' [K] (its attack success, else the last),
  'reached' bool [K]}. max_steps: a smoke run's cap (whole epochs, `stages.capped_epochs`)."""
  num_clusters, devices = int(labels.max()) + 1, jax.device_count()
  rng = np.random.default_rng([seed, 1])
  others, partners = trigger_pairs(labels, rng)
  count = others.shape[1]
  size = batch_size(block.trigger_batch_size, count, devices)
  tx = optax.adam(block.trigger_lr, b1=0.5, b2=0.9)
  raw = initial_triggers(jax.random.key(seed), num_clusters, *images.shape[1:3])
  state = jax.jit(lambda r: TrainState(jnp.zeros((), jnp.int32), r, {}, tx.init(r)),
                  out_shardings=parallel.replicated(mesh))(raw)
  step = jax.jit(make_trigger_step(encoder.graphdef, tx, model_config), donate_argnums=0)
  constants = parallel.put_replicated({"images": images, "features": features.astype(np.float32),
                                       "labels": labels.astype(np.int32)}, mesh)
  weights = {"params": encoder.params, "batch_stats": encoder.batch_stats}
  hits = _hits_fn(encoder.graphdef, tuple(model_config.mean), tuple(model_config.std), num_clusters)
  chunk = max(devices, eval_batch // num_clusters // devices * devices)
  key = jax.random.key(seed)
  schedule = initial_schedule(num_clusters)
  best = jax.device_get(state.params)
  best_asr, last_asr = np.zeros(num_clusters), np.zeros(num_clusters)
  for _ in range(stages.capped_epochs(max_steps, block.trigger_epochs, count // size)):
    order = np.stack([rng.permutation(count) for _ in range(num_clusters)])
    extra = {"lam": parallel.put_replicated(schedule.lam.astype(np.float32), mesh), "encoder": weights}
    state, reg = trigger_epoch(step, state, others, partners, order, size, constants, extra, mesh, key)
    last_asr = attack_success(hits, state.params, weights, constants, images, block.knn_sample_num, chunk, mesh,
                              rng)
    schedule, improved = next_schedule(schedule, last_asr, reg, block)
    if improved.any():
      current = jax.device_get(state.params)
      best = jax.tree.map(lambda b, c: np.where(improved[:, None, None, None], c, b), best, current)
      best_asr = np.where(improved, last_asr, best_asr)
  reached = np.isfinite(schedule.reg_best)
  final = jax.device_get(state.params)
  kept = jax.tree.map(lambda b, c: np.where(reached[:, None, None, None], b, c), best, final)
  return {"mask": np.asarray(squash(kept["mask"])), "pattern": np.asarray(squash(kept["pattern"])),
          "size": np.where(reached, schedule.reg_best, 1.0), "asr": np.where(reached, best_asr, last_asr),
          "reached": reached}


def attack_success(hits, raw, weights, constants, images: np.ndarray, samples: int, chunk: int, mesh,
                   rng: np.random.Generator) -> np.ndarray:
  """Every cluster's kNN attack success [K] on `samples` images drawn with replacement (official DatasetEval),
  the same draw for every cluster; the stamped features are computed once per distinct image set (all images
  when there are no more than `samples`, else the draw)."""
  draw = rng.integers(0, len(images), samples)
  evaluated = images if len(images) <= samples else images[draw]
  fn = lambda x: hits(raw, weights, constants["features"], constants["labels"], x)
  found = evaluation.apply_batched(fn, evaluated, chunk, mesh)
  return found[draw].mean(axis=0) if len(images) <= samples else found.mean(axis=0)
