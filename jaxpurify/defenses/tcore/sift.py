"""T-Core's seed sifting by topological invariance (a reconstruction): per-depth features, each sample's rank of
its nearest same-label neighbour (1 for clean, typical samples at every depth; more for poisons), and the
per-class choice of trusted seeds.
"""

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxpurify import augment, parallel
from jaxpurify.encoders import Encoder
from jaxpurify.errors import UserError, moved
from jaxpurify.losses import l2_normalize

EXTRA_DEPTHS = ("input", "pooled")  # besides the encoder's taps: the normalised image, the pooled feature
__getattr__ = moved(__name__, {"DEPTHS": "jaxpurify.defenses.tcore.sift.depths(encoder)"})


def depths(encoder: Encoder) -> tuple[str, ...]:
  """The depths sifting can read: 'input', 'pooled' and the encoder's tap names in forward order."""
  return EXTRA_DEPTHS + tuple(nnx.merge(encoder.graphdef, encoder.params, encoder.batch_stats).tap_names)


DEFAULT_TAPS = 4  # taps read by default; an encoder with more gives every (taps / 4)-th, ending at the last


def default_layers(encoder: Encoder) -> tuple[str, ...]:
  """The depths sifting reads when config.tcore.sift.layers is empty: 'input' and DEFAULT_TAPS of the encoder's
  taps, evenly spaced and ending at the last (a ResNet: its stages layer1..layer4; a 12-block ViT: block3, block6,
  block9, block12, each the mean of the block's patch tokens); all taps when it has fewer."""
  taps = depths(encoder)[len(EXTRA_DEPTHS):]
  count = min(len(taps), DEFAULT_TAPS)
  return ("input",) + tuple(taps[(i + 1) * len(taps) // count - 1] for i in range(count))


def resolve_layers(encoder: Encoder, configured) -> tuple[str, ...]:
  """config.tcore.sift.layers, or `default_layers` when it is empty."""
  return tuple(configured) or default_layers(encoder)


@functools.lru_cache(maxsize=16)
def _forward(graphdef, mean: tuple, std: tuple, layers: tuple[str, ...]):
  """One jitted inference forward per (architecture, normalisation, layers): uint8 [B, H, W, 3] sharded along
  `data` -> the L2-normalised float32 features [B, D_l] at each of `layers`, resharded to `replicated`."""

  @functools.partial(jax.jit, static_argnums=3)
  def forward(params, batch_stats, images, replicated: jax.NamedSharding):
    x = augment.normalize(augment.to_float(images), jnp.asarray(mean), jnp.asarray(std))
    pooled, taps = nnx.merge(graphdef, params, batch_stats)(x, train=False)
    named = {"input": x.reshape(x.shape[0], -1), "pooled": pooled}
    parts = [named[layer] if layer in named else _pool(taps[layer]) for layer in layers]
    return [jax.sharding.reshard(l2_normalize(p.astype(jnp.float32)), replicated) for p in parts]

  return forward


def _pool(tap: jax.Array) -> jax.Array:
  """A tap [B, ..., C] (an NHWC map, a token sequence) -> its mean over every axis but the first and last [B, C]."""
  return tap.mean(axis=tuple(range(1, tap.ndim - 1)))


def depth_features(encoder: Encoder, model_config, images: np.ndarray, batch_size: int, mesh,
                   layers: tuple[str, ...]) -> list[jax.Array]:
  """uint8 images [N, H, W, 3] -> the L2-normalised float32 features [N, D_l] at each of `layers`, replicated.

  'input' is the normalised image (model_config.mean/std) flattened, 'pooled' the encoder's feature, a tap name
  that tap's global average pool, all in inference mode. Batches of `batch_size` are sharded along `data`; the
  last is zero-padded (one compile) and its padding rows dropped.
  """
  parallel.check_global_batch(batch_size, "batch_size")
  forward = _forward(encoder.graphdef, tuple(model_config.mean), tuple(model_config.std), tuple(layers))
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


AGGREGATES = ("sum", "max")


def sift_scores(ranks: np.ndarray, margins: np.ndarray, aggregate: str) -> tuple[np.ndarray, np.ndarray]:
  """ranks, margins [L, N] -> (primary [N]: the sum or the max of the ranks over depths, per `aggregate`;
  secondary [N]: the margins summed over depths, the tie-break)."""
  if aggregate not in AGGREGATES:
    raise ValueError(f"unknown aggregate {aggregate!r}; use one of {', '.join(AGGREGATES)}")
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


def check_layers(encoder: Encoder, names) -> None:
  """UserError unless `names` names one or more of the encoder's depths."""
  known = depths(encoder)
  unknown = [name for name in names if name not in known]
  if unknown or not names:
    problem = f"unknown depth(s) {', '.join(map(str, unknown))}" if unknown else "no depth"
    raise UserError(f"config.tcore.sift.layers names {problem}; set it to one or more of {', '.join(known)}, "
                    f"or to () for the encoder's default")


def sift(encoder: Encoder, model_config, images: np.ndarray, labels: np.ndarray, num_classes: int, sift_config,
         batch_size: int, mesh) -> dict:
  """uint8 images [N, H, W, 3], labels [N] -> {'seeds': sorted indices, 'rank', 'margin': [L, N] at the L depths
  'layers', 'primary', 'secondary': [N] (see sift_scores)}.

  sift_config: layers (names from `depths(encoder)`; empty: `default_layers`), aggregate ('sum' | 'max'),
  seeds_per_class, chunk_rows.
  """
  names = resolve_layers(encoder, sift_config.layers)
  check_layers(encoder, names)
  labels = np.asarray(labels)
  check(sift_config.seeds_per_class, labels, num_classes)
  features = depth_features(encoder, model_config, images, batch_size, mesh, names)
  device_labels = parallel.put_replicated(labels.astype(np.int32), mesh)
  ranks, margins = zip(*(neighbour_ranks(f, device_labels, sift_config.chunk_rows) for f in features))
  ranks, margins = np.stack(jax.device_get(ranks)), np.stack(jax.device_get(margins))
  primary, secondary = sift_scores(ranks, margins, sift_config.aggregate)
  seeds = select_seeds(primary, secondary, labels, sift_config.seeds_per_class, num_classes)
  return {"seeds": seeds, "rank": ranks, "margin": margins, "primary": primary, "secondary": secondary,
          "layers": names}


def seeds_stage(run, config, encoder: Encoder, images, labels, num_classes: int, mesh) -> np.ndarray:
  """Stage tcore_sift: seeds_per_class trusted seeds per class (random ones when 'sift' is skipped)."""
  if (record := run.done("tcore_sift")) is not None:
    return np.array(record["seeds"], dtype=np.int64)
  block = config.tcore.sift
  if "sift" in config.tcore.skip:
    rng = np.random.default_rng(config.seed)
    seeds = np.sort(np.concatenate([rng.choice(np.where(labels == c)[0], block.seeds_per_class, replace=False)
                                    for c in range(num_classes)]))
    record = {"seeds": seeds.tolist(), "method": "random"}
  else:
    out = sift(encoder, config.model, images, labels, num_classes, block, config.evaluate.batch_size, mesh)
    seeds = np.asarray(out["seeds"], dtype=np.int64)
    np.savez(os.path.join(run.stage_dir("tcore_sift"), "ranks.npz"), rank=out["rank"], margin=out["margin"])
    record = {"seeds": seeds.tolist(), "method": "topology", "layers": list(out["layers"])}
  run.finish("tcore_sift", record)
  return seeds
