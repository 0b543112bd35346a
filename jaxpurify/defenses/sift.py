"""T-Core's seed sifting by topological invariance (tcore.md section 5.1; a reconstruction after TED).

A clean, typical sample has a neighbour of its own label nearest to it at every depth of the encoder. A
dirty-label poison sits among its source class at the input and early depths, and a poison cluster only joins
its (target) label late. For every sample and depth: `rank` = 1 + the number of samples closer than its nearest
other sample of the same given label. Seeds are, per class, the samples with the lowest rank sum (ties broken by
the summed distance ratio nearest-same / nearest-other, then by position).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxpurify import augment, evaluation
from jaxpurify.encoders import Encoder
from jaxpurify.errors import UserError
from jaxpurify.losses import l2_normalize

DEPTHS = ("input", "stage1", "stage2", "stage3", "stage4")


@functools.lru_cache(maxsize=16)
def _depth_forward(graphdef, mean: tuple, std: tuple):
  """One jitted inference forward per (architecture, normalisation): uint8 [B, H, W, 3] -> [B, sum of D_l]."""

  @jax.jit
  def forward(params, batch_stats, images):
    x = augment.normalize(augment.to_float(images), jnp.asarray(mean), jnp.asarray(std))
    _, maps = nnx.merge(graphdef, params, batch_stats)(x, train=False)
    parts = [x.reshape(len(x), -1)] + [m.mean(axis=(1, 2)) for m in maps]
    return jnp.concatenate([l2_normalize(p) for p in parts], axis=-1)

  return forward


def depth_features(encoder: Encoder, model_config, images: np.ndarray, batch_size: int, mesh) -> list[np.ndarray]:
  """The L2-normalised features of uint8 images [N, H, W, 3] at each of DEPTHS: 'input' is the normalised image
  flattened, 'stageK' the global average pool of stage K (inference BatchNorm); -> [N, D_l] per depth."""
  forward = _depth_forward(encoder.graphdef, tuple(model_config.mean), tuple(model_config.std))
  joined = evaluation.apply_batched(lambda x: forward(encoder.params, encoder.batch_stats, x), images, batch_size,
                                    mesh)
  h, w = images.shape[1:3]
  sizes = [h * w * 3] + [int(c) for c in _stage_channels(encoder)]
  return np.split(joined, np.cumsum(sizes)[:-1], axis=1)


def _stage_channels(encoder: Encoder) -> list[int]:
  model = nnx.merge(encoder.graphdef, encoder.params, encoder.batch_stats)
  x = jnp.zeros((1, 8, 8, 3))
  return [m.shape[-1] for m in jax.eval_shape(lambda: model(x, train=False))[1]]


@functools.partial(jax.jit, static_argnums=2)
def neighbour_ranks(features: jax.Array, labels: jax.Array, chunk_rows: int) -> tuple[jax.Array, jax.Array]:
  """features [N, D] (unit rows), labels int [N] -> (rank int32 [N], margin float32 [N]).

  Euclidean distances, each sample's own excluded. rank = 1 + #{j : d(i, j) < d_same(i)} with d_same the
  distance to the nearest other sample of the same label; margin = d_same / d_other, d_other the distance to
  the nearest sample of another label. A sample alone in its class gets rank N and margin +inf. Rows are done
  `chunk_rows` at a time (jax.lax.map), so memory is chunk_rows x N.
  """
  n = features.shape[0]
  features = features.astype(jnp.float32)
  labels = labels.astype(jnp.int32)
  padded = -(-n // chunk_rows) * chunk_rows
  rows = jnp.pad(jnp.arange(n), (0, padded - n)).reshape(-1, chunk_rows)
  sq = jnp.sum(features * features, axis=1)

  def chunk(index):
    x = features[index]
    dist = jnp.sqrt(jnp.maximum(sq[index][:, None] + sq[None, :] - 2.0 * x @ features.T, 0.0))
    dist = jnp.where(index[:, None] == jnp.arange(n)[None, :], jnp.inf, dist)
    same = labels[index][:, None] == labels[None, :]
    d_same = jnp.min(jnp.where(same, dist, jnp.inf), axis=1)
    d_other = jnp.min(jnp.where(same, jnp.inf, dist), axis=1)
    rank = 1 + jnp.sum(dist < d_same[:, None], axis=1)
    rank = jnp.where(jnp.isinf(d_same), n, rank)
    return rank.astype(jnp.int32), (d_same / d_other).astype(jnp.float32)

  rank, margin = jax.lax.map(chunk, rows)
  return rank.reshape(-1)[:n], margin.reshape(-1)[:n]


def sift_scores(ranks: np.ndarray, margins: np.ndarray, aggregate: str) -> tuple[np.ndarray, np.ndarray]:
  """ranks, margins [L, N] -> (primary [N]: the sum or max of the ranks over depths, secondary [N]: the summed
  margins, the tie-break)."""
  if aggregate not in ("sum", "max"):
    raise ValueError(f"unknown aggregate {aggregate!r}; use 'sum' or 'max'")
  primary = ranks.sum(0) if aggregate == "sum" else ranks.max(0)
  return primary, margins.sum(0)


def select_seeds(primary: np.ndarray, secondary: np.ndarray, labels: np.ndarray, seeds_per_class: int,
                 num_classes: int) -> np.ndarray:
  """Per class the `seeds_per_class` samples lowest in (primary, secondary, position); -> sorted indices."""
  seeds = []
  for c in range(num_classes):
    members = np.where(labels == c)[0]
    order = np.lexsort((members, secondary[members], primary[members]))
    seeds.append(members[order[:seeds_per_class]])
  return np.sort(np.concatenate(seeds))


def check(seeds_per_class: int, labels: np.ndarray, num_classes: int) -> None:
  """The seed budget must fit in every class."""
  if seeds_per_class < 1:
    raise UserError(f"config.tcore.sift.seeds_per_class is {seeds_per_class}; choose at least 1 seed per class")
  counts = np.bincount(labels, minlength=num_classes)
  smallest = int(np.argmin(counts))
  if counts[smallest] < seeds_per_class:
    raise UserError(f"class {smallest} holds {counts[smallest]} samples, fewer than the seed budget "
                    f"{seeds_per_class}; lower config.tcore.sift.seeds_per_class")


def sift(encoder: Encoder, model_config, images: np.ndarray, labels: np.ndarray, num_classes: int, sift_config,
         batch_size: int, mesh) -> dict:
  """-> {'seeds': sorted indices, 'rank' and 'margin': [L, N] at sift_config.layers}.

  sift_config: layers (names of DEPTHS), aggregate ('sum' | 'max'), seeds_per_class, chunk_rows.
  """
  unknown = [layer for layer in sift_config.layers if layer not in DEPTHS]
  if unknown or not sift_config.layers:
    raise UserError(f"unknown sifting depth(s) {unknown} in config.tcore.sift.layers; use some of "
                    f"{', '.join(DEPTHS)}")
  check(sift_config.seeds_per_class, labels, num_classes)
  features = depth_features(encoder, model_config, images, batch_size, mesh)
  ranks, margins = [], []
  for layer in sift_config.layers:
    rank, margin = neighbour_ranks(jnp.asarray(features[DEPTHS.index(layer)]), jnp.asarray(labels),
                                   sift_config.chunk_rows)
    ranks.append(np.asarray(rank))
    margins.append(np.asarray(margin))
  ranks, margins = np.stack(ranks), np.stack(margins)
  primary, secondary = sift_scores(ranks, margins, sift_config.aggregate)
  seeds = select_seeds(primary, secondary, labels, sift_config.seeds_per_class, num_classes)
  return {"seeds": seeds, "rank": ranks, "margin": margins}
