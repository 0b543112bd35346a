"""STRIP (Gao et al., ACSAC 2019) as a training-set cleanser (docs/baselines.md section 3.1).

Every victim image x is superimposed on `blends` images x_j drawn without replacement from the defender's clean
reserve, and scored by the undefended classifier's prediction entropy averaged over the blends. A trigger that
dominates the prediction keeps it confident whatever it is blended with, so triggered images score low. The
threshold is the same score's `clean_quantile` order statistic on the reserve, each reserve image blended with
`blends` other reserve images; victim images scoring strictly below it are removed.

- Blend, exactly: normalize(x) + alpha * normalize(x_j), normalize(u) = (u / 255 - mean) / std with
  config.model's mean and std, fed to the classifier as it is, without clipping: the toolbox adds the two inputs
  after its Normalize transform (`_input1 + alpha * _input2`) and clips nothing.
- Entropy: -sum_c p_c log p_c with p = softmax(logits) + 1e-8 (the toolbox's).
- Threshold: the reserve scores sorted ascending, at position floor(clean_quantile * M) (the toolbox's
  `clean_entropy[int(defense_fpr * len(clean_entropy))]`).

Defaults alpha 1, 100 blends, quantile 0.1: backdoor-toolbox `cleansers_tool_box/strip.py` `cleanser()` (BackdoorBench
`detection_pretrain/strip.py` passes the same three; its class defaults are 0.5, 64 and 0.05).

On device: one jitted call scores `batch_size` images (sharded along `data`), looping over the blends, each a
forward pass of `batch_size` blended images; the reserve is replicated. Image i of a set draws its partners from
jax.random.fold_in(fold_in(key(config.seed), set), i), set 0 for the victim set and 1 for the reserve, so the scores
do not depend on the batch size or the device count.

Departures from the toolbox: partners are drawn per image rather than once per loader batch of 128 (shared by
its images), and a reserve image is never blended with itself.
"""

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxpurify import augment, parallel
from jaxpurify.errors import UserError

KIND = "filter"
CLEAN_DATA = True
VICTIM, RESERVE = 0, 1  # the sets' streams of partner draws
PROBABILITY_FLOOR = 1e-8  # added to the softmax before the entropy (the toolbox's)

# apply(weights, normalised float images [B, H, W, 3]) -> logits [B, C]
ApplyFn = Callable[[object, jax.Array], jax.Array]


def check(block, config, victim_counts: np.ndarray, reserve_counts: np.ndarray) -> None:
  """UserError on a STRIP setting that cannot run: no blend, a quantile outside [0, 1), a batch that does not split
  over the devices, more blends than the reserve has other images."""
  del config, victim_counts
  if block.blends < 1:
    raise UserError(f"config.baseline.strip.blends is {block.blends}; set it to at least 1")
  if not 0 <= block.clean_quantile < 1:
    raise UserError(f"config.baseline.strip.clean_quantile is {block.clean_quantile}; set it in [0, 1)")
  parallel.check_global_batch(block.batch_size, "config.baseline.strip.batch_size")
  if block.blends > reserve_counts.sum() - 1:
    raise UserError(f"config.baseline.strip.blends={block.blends} needs more than that many reserve images, there "
                    f"are {reserve_counts.sum()}; lower blends or raise config.baseline.clean_fraction")


def entropy(logits: jax.Array) -> jax.Array:
  """Prediction entropy of logits [..., C] -> [...]: -sum p log p, p = softmax + 1e-8."""
  p = jax.nn.softmax(logits.astype(jnp.float32), axis=-1) + PROBABILITY_FLOOR
  return -jnp.sum(p * jnp.log(p), axis=-1)


def partner_indices(key: jax.Array, index: jax.Array, blends: int, pool_size: int, exclude_self: bool) -> jax.Array:
  """`blends` distinct partners in [0, pool_size) of image `index` (int scalar), drawn from fold_in(key, index);
  with exclude_self, never `index` itself -> int32 [blends]."""
  key = jax.random.fold_in(key, index)
  if not exclude_self:
    return jax.random.choice(key, pool_size, (blends,), replace=False).astype(jnp.int32)
  drawn = jax.random.choice(key, pool_size - 1, (blends,), replace=False).astype(jnp.int32)
  return drawn + (drawn >= index)


def mean_blend_entropy(apply: ApplyFn, weights, images: jax.Array, pool: jax.Array, partners: jax.Array,
                       alpha: float, mean, std) -> jax.Array:
  """STRIP's score of uint8 images [B, H, W, 3]: the entropy of apply(weights, normalize(x) + alpha *
  normalize(pool[partner])) averaged over the partners int [B, N] into the uint8 pool [M, H, W, 3] -> [B]."""
  normalize = lambda u: augment.normalize(augment.to_float(u), jnp.asarray(mean), jnp.asarray(std))
  x = normalize(images)

  def add_blend(b, total):
    column = partners[:, b]
    partner = pool.at[column].get(out_sharding=jax.typeof(column).sharding)
    return total + entropy(apply(weights, x + alpha * normalize(partner)))

  total = jax.lax.fori_loop(0, partners.shape[1], add_blend, jnp.zeros_like(partners[:, 0], jnp.float32))
  return total / partners.shape[1]


def scorer(apply: ApplyFn, blends: int, pool_size: int, alpha: float, mean, std, exclude_self: bool, mesh):
  """A jitted (weights, batch {'image' uint8 [B, H, W, 3], 'index' int32 [B]} sharded along `data`, pool uint8
  [M, H, W, 3] replicated, key) -> scores float32 [B], replicated."""

  def score(weights, batch, pool, key):
    draw = functools.partial(partner_indices, key, blends=blends, pool_size=pool_size, exclude_self=exclude_self)
    partners = jax.vmap(draw)(batch["index"])
    return mean_blend_entropy(apply, weights, batch["image"], pool, partners, alpha, mean, std)

  return jax.jit(score, out_shardings=parallel.replicated(mesh))


def scores(apply: ApplyFn, weights, images: np.ndarray, pool: jax.Array, key: jax.Array, block, mean, std,
           exclude_self: bool, mesh) -> np.ndarray:
  """STRIP's score of every uint8 image [N, H, W, 3] against the replicated pool -> float32 [N] on the host. The last
  batch is zero-padded to block.batch_size and its padding dropped."""
  score = scorer(apply, block.blends, len(pool), block.alpha, mean, std, exclude_self, mesh)
  n, size, out = len(images), block.batch_size, []
  for start in range(0, n, size):
    batch = np.asarray(images[start:start + size])
    batch = {"image": np.pad(batch, ((0, size - len(batch)),) + ((0, 0),) * 3),
             "index": np.arange(start, start + size, dtype=np.int32)}
    out.append(score(weights, parallel.put_batch(batch, mesh), pool, key))
  return np.concatenate([np.asarray(s) for s in out])[:n] if out else np.zeros(0, np.float32)


def clean_threshold(reserve_scores: np.ndarray, quantile: float) -> float:
  """The toolbox's threshold: reserve scores [M] sorted ascending, at position floor(quantile * M)."""
  return float(np.sort(reserve_scores)[int(quantile * len(reserve_scores))])


def cleanse(apply: ApplyFn, weights, images: np.ndarray, reserve_images: np.ndarray, seed: int, block, mean, std,
            mesh) -> np.ndarray:
  """The victim images [N, H, W, 3] scoring below the reserve's threshold -> sorted int64 indices; `weights`
  replicated over `mesh`."""
  key = jax.random.key(seed)
  pool = parallel.put_replicated(reserve_images, mesh)
  score = lambda x, stream, exclude_self: scores(apply, weights, x, pool, jax.random.fold_in(key, stream), block,
                                                  mean, std, exclude_self, mesh)
  threshold = clean_threshold(score(reserve_images, RESERVE, True), block.clean_quantile)
  return np.flatnonzero(score(images, VICTIM, False) < threshold).astype(np.int64)


def classifier_apply(graphdef) -> ApplyFn:
  """The fine-tuned classifier in inference mode: (params, batch_stats), normalised images -> logits."""
  return lambda weights, x: nnx.merge(graphdef, *weights)(x)


def suspects(inputs, block, run) -> np.ndarray:
  """The victim images the undefended classifier stays confident on under blending -> sorted int64 indices."""
  del run  # nothing trained
  graphdef, state = inputs.model
  model = inputs.config.model
  return cleanse(classifier_apply(graphdef), (state.params, state.batch_stats), inputs.images,
                 inputs.reserve_images, inputs.config.seed, block, model.mean, model.std, inputs.mesh)
