"""T-Core's seed sifting by topological invariance (a reconstruction): per-depth features, each sample's rank of
its nearest same-label neighbour (1 for clean, typical samples at every depth; more for poisons), and the
per-class choice of trusted seeds.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxpurify import augment, parallel
from jaxpurify.encoders import Encoder
from jaxpurify.errors import UserError
from jaxpurify.losses import l2_normalize

DEPTHS = ("input", "stage1", "stage2", "stage3", "stage4")


@functools.lru_cache(maxsize=16)
def _forward(graphdef, mean: tuple, std: tuple):
  """One jitted inference forward per (architecture, normalisation): uint8 [B, H, W, 3] sharded along `data` ->
  the L2-normalised float32 features [B, D_l] at each of DEPTHS, resharded to `replicated`."""

  @functools.partial(jax.jit, static_argnums=3)
  def forward(params, batch_stats, images, replicated: jax.NamedSharding):
    x = augment.normalize(augment.to_float(images), jnp.asarray(mean), jnp.asarray(std))
    _, maps = nnx.merge(graphdef, params, batch_stats)(x, train=False)
    parts = [x.reshape(x.shape[0], -1)] + [m.mean(axis=(1, 2)) for m in maps]
    return [jax.sharding.reshard(l2_normalize(p.astype(jnp.float32)), replicated) for p in parts]

  return forward


def depth_features(encoder: Encoder, model_config, images: np.ndarray, batch_size: int, mesh) -> list[jax.Array]:
  """uint8 images [N, H, W, 3] -> the L2-normalised float32 features [N, D_l] at each of DEPTHS, replicated.

  'input' is the normalised image (model_config.mean/std) flattened, 'stageK' the global average pool of ResNet
  stage K in inference mode. Batches of `batch_size` are sharded along `data`; the last is zero-padded (one
  compile) and its padding rows dropped.
  """
  parallel.check_global_batch(batch_size, "batch_size")
  forward = _forward(encoder.graphdef, tuple(model_config.mean), tuple(model_config.std))
  n, replicated, batches = len(images), parallel.replicated(mesh), []
  for start in range(0, n, batch_size):
    batch = np.asarray(images[start:start + batch_size])
    batch = np.pad(batch, ((0, batch_size - len(batch)),) + ((0, 0),) * (batch.ndim - 1))
    batches.append(forward(encoder.params, encoder.batch_stats, parallel.put_batch(batch, mesh), replicated))
  return [jnp.concatenate(depth)[:n] for depth in zip(*batches)]


@functools.partial(jax.jit, static_argnums=2)
def neighbour_ranks(features: jax.Array, labels: jax.Array, chunk_rows: int) -> tuple[jax.Array, jax.Array]:
  """features [N, D] (unit rows), labels int [N] -> (rank int32 [N], margin float32 [N]).

  Euclidean distances (sqrt(2 - 2 cos) on unit rows), each sample's own excluded. d_same(i) is the distance to
  the nearest other sample of label labels[i], d_other(i) to the nearest sample of another label;
  rank = 1 + #{j != i : d(i, j) < d_same(i)} and margin = d_same / d_other. A sample alone in its class has
  d_same = inf, hence rank N and margin +inf. Rows go `chunk_rows` at a time (jax.lax.map; N is padded up to a
  multiple and the padding dropped), so at most chunk_rows x N distances exist at once.
  """
  n = features.shape[0]
  features = features.astype(jnp.float32)
  columns = jnp.arange(n)
  rows = jnp.pad(columns, (0, -n % chunk_rows)).reshape(-1, chunk_rows)
  squares = jnp.sum(features * features, axis=1)

  def chunk(index):  # [C] row positions -> rank [C], margin [C]
    dots = jnp.matmul(features[index], features.T, precision=jax.lax.Precision.HIGHEST)
    dist = jnp.sqrt(jnp.maximum(squares[index, None] + squares[None] - 2.0 * dots, 0.0))
    dist = jnp.where(index[:, None] == columns[None], jnp.inf, dist)
    same = labels[index, None] == labels[None]
    d_same = jnp.min(jnp.where(same, dist, jnp.inf), axis=1)
    d_other = jnp.min(jnp.where(same, jnp.inf, dist), axis=1)
    rank = 1 + jnp.sum(dist < d_same[:, None], axis=1, dtype=jnp.int32)
    return rank, d_same / d_other

  rank, margin = jax.lax.map(chunk, rows)
  return rank.reshape(-1)[:n], margin.reshape(-1)[:n]


def sift_scores(ranks: np.ndarray, margins: np.ndarray, aggregate: str) -> tuple[np.ndarray, np.ndarray]:
  """ranks, margins [L, N] -> (primary [N]: the sum or the max of the ranks over depths, per `aggregate`;
  secondary [N]: the margins summed over depths, the tie-break)."""
  if aggregate not in ("sum", "max"):
    raise ValueError(f"unknown aggregate {aggregate!r}; use 'sum' or 'max'")
  ranks = np.asarray(ranks)
  return ranks.sum(0) if aggregate == "sum" else ranks.max(0), np.asarray(margins).sum(0)


def select_seeds(primary: np.ndarray, secondary: np.ndarray, labels: np.ndarray, seeds_per_class: int,
                 num_classes: int) -> np.ndarray:
  """Per class the `seeds_per_class` samples lowest in (primary, secondary, index) -> sorted indices
  int [num_classes * seeds_per_class]."""
  seeds = []
  for c in range(num_classes):
    members = np.flatnonzero(labels == c)
    order = np.lexsort((members, secondary[members], primary[members]))  # the last key sorts first
    seeds.append(members[order[:seeds_per_class]])
  return np.sort(np.concatenate(seeds))


def check(seeds_per_class: int, labels: np.ndarray, num_classes: int) -> None:
  """Raises UserError unless 1 <= seeds_per_class <= the size of the smallest class."""
  if seeds_per_class < 1:
    raise UserError(f"config.tcore.sift.seeds_per_class is {seeds_per_class}; set it to at least 1")
  counts = np.bincount(labels, minlength=num_classes)
  smallest = int(np.argmin(counts))
  if counts[smallest] < seeds_per_class:
    raise UserError(f"class {smallest} holds {counts[smallest]} samples, fewer than the seed budget "
                    f"{seeds_per_class}; lower config.tcore.sift.seeds_per_class")


def sift(encoder: Encoder, model_config, images: np.ndarray, labels: np.ndarray, num_classes: int, sift_config,
         batch_size: int, mesh) -> dict:
  """uint8 images [N, H, W, 3], labels [N] -> {'seeds': sorted indices, 'rank', 'margin': [L, N] at the L depths
  sift_config.layers, 'primary', 'secondary': [N] (see sift_scores)}.

  sift_config: layers (names from DEPTHS), aggregate ('sum' | 'max'), seeds_per_class, chunk_rows.
  """
  unknown = [layer for layer in sift_config.layers if layer not in DEPTHS]
  if unknown or not sift_config.layers:
    problem = f"unknown depth(s) {', '.join(map(str, unknown))}" if unknown else "no depth"
    raise UserError(f"config.tcore.sift.layers names {problem}; set it to one or more of {', '.join(DEPTHS)}")
  labels = np.asarray(labels)
  check(sift_config.seeds_per_class, labels, num_classes)
  features = depth_features(encoder, model_config, images, batch_size, mesh)
  device_labels = parallel.put_replicated(labels.astype(np.int32), mesh)
  ranks, margins = zip(*(neighbour_ranks(features[DEPTHS.index(layer)], device_labels, sift_config.chunk_rows)
                         for layer in sift_config.layers))
  ranks, margins = np.stack(jax.device_get(ranks)), np.stack(jax.device_get(margins))
  primary, secondary = sift_scores(ranks, margins, sift_config.aggregate)
  seeds = select_seeds(primary, secondary, labels, sift_config.seeds_per_class, num_classes)
  return {"seeds": seeds, "rank": ranks, "margin": margins, "primary": primary, "secondary": secondary}
