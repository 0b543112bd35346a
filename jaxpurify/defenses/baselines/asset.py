"""ASSET: Active Separation via Offset (Pan, Zeng et al., USENIX Security 2023; docs/baselines.md 3.1), a filter.

The offset trains a classifier two ways at once, batch by batch (reds-lab/ASSET `ASSET_demo.ipynb`, the same loop
as BackdoorBench's port `detection_pretrain/asset.py`):
  (a) on a batch of the defender's clean base set it minimises the mean over samples of the variance of the
      logits over the classes (it learns to answer nothing in particular on clean data);
  (b) on a batch of the poisoned set it fits a fresh small MLP (mlp_hidden wide, two hidden layers, sigmoid output)
      for inner_steps steps to say 1 on the batch's features and 0 on the base batch's (mean squared error, one
      optimiser per side, the two alternating), marks the batch samples whose MLP output has an adjusted
      outlyingness (Hubert and Van der Veeken, with the medcouple) above `outlyingness`, and maximises their mean
      cross-entropy.
Clean samples of the poisoned set look like the base set, so the classifier keeps them flat (a loss near log C);
poisons stand out to the MLP and are pushed to a high loss. Every sample's score is its cross-entropy under the
offset classifier; the threshold is the demo's `get_t(scores, eps)` with eps = block.threshold_eps (1e-6, the
demo's; see `threshold`), and the samples at or above it are removed (the demo counts a poison scored below it as
missed). The formula, kept as written, is not scale-free: with s the standard deviation of the lower half of the
scores, the cut sits about 8.3 s above that half's mean when s = 1 but only 1.4 s above it, about the clean mode's
median, when s = 0.03 (clean losses bunched near log C).

Readings of the demo for this setting:
- the offset classifier is the victim's encoder with a fresh head (`finetune.build_classifier`), trained as the
  protocol trains (FT-head: the head only, the encoder frozen): the demo and BackdoorBench offset a freshly
  initialised model of their own (the demo's warm-start line is commented out), not a copy of the poisoned one,
  and in transfer learning the model one trains starts from the given encoder;
- the MLP reads the undefended classifier's encoder features (`Inputs.features`, `Inputs.reserve_features`,
  inference mode): the demo feeds it the poisoned model without its last layer, frozen (BatchNorm left in
  training mode);
- the ascent's forward runs on the whole poisoned batch and averages the cross-entropy over the marked samples
  (static shapes), so BatchNorm (FT-all) sees the whole batch where the demo's sees the marked ones; a batch with
  fewer than block.min_marked (2) marked has no ascent step (BackdoorBench's guard; the demo would average over
  none);
- no augmentation (the demo's transform is ToTensor), the images normalised as the encoder expects, dropout on in
  both passes (the classifier's training mode); the scores are computed in inference mode;
- the four optimisers are `optim` (the demo's Adam 1e-4), each with its own state: the model's two carry on over
  the epochs, the MLP's two start fresh at every batch.
"""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx

from jaxpurify import augment, finetune, parallel, stages
from jaxpurify.data.device import DeviceDataset
from jaxpurify.defenses.tcore.confusion import sample_losses
from jaxpurify.errors import UserError
from jaxpurify.train.state import TrainState, make_optimizer

KIND = "filter"
CLEAN_DATA = True
REG_COVAR = 1e-6  # the variance floor sklearn's GaussianMixture (the demo's fit) adds


def check(block, config, victim_counts: np.ndarray, reserve_counts: np.ndarray) -> None:
  """UserError when a batch of config.baseline.asset does not split over the devices, the reserve is smaller than
  a base batch, or threshold_eps is not below 1 (jaxpurify.validation refuses it at 0 or below)."""
  del config, victim_counts
  if reserve_counts.sum() < block.base_batch_size:
    raise UserError(f"ASSET draws base batches of config.baseline.asset.base_batch_size={block.base_batch_size} "
                    f"from the {reserve_counts.sum()} reserved clean images; lower it or raise "
                    "config.baseline.clean_fraction")
  parallel.check_global_batch(block.batch_size, "config.baseline.asset.batch_size")
  parallel.check_global_batch(block.base_batch_size, "config.baseline.asset.base_batch_size")
  if block.threshold_eps >= 1:
    raise UserError(f"config.baseline.asset.threshold_eps={block.threshold_eps} must be below 1: the threshold "
                    "takes sqrt(-2 ln(eps)); the demo's is 1e-6")


# ---------------------------------------------------------------------------------------------------------------
# Statistics


def medcouple(x: jax.Array) -> jax.Array:
  """The medcouple (Brys, Hubert and Struyf) of x [n]: the median of h(x_i, x_j) = ((x_i - m) - (m - x_j)) /
  (x_i - x_j) over the pairs x_i >= m >= x_j (m the median), the k values tied with m scored sign(a + b - k + 1)
  for their tie ranks a, b (statsmodels' definition); a float32 scalar, O(n^2) memory."""
  z = x - jnp.median(x)
  upper, lower = z[:, None], z[None, :]
  ties = z == 0
  rank = jnp.cumsum(ties) - 1
  tie_sign = jnp.sign(rank[:, None] + rank[None, :] - (jnp.sum(ties) - 1)).astype(z.dtype)
  both_tied = ties[:, None] & ties[None, :]
  spread = jnp.where(both_tied, 1.0, upper - lower)
  h = jnp.where(both_tied, tie_sign, (upper + lower) / spread)
  valid = (upper >= 0) & (lower <= 0)
  ordered = jnp.sort(jnp.where(valid, h, jnp.inf).ravel())
  count = jnp.sum(valid)
  return (ordered[(count - 1) // 2] + ordered[count // 2]) / 2


def adjusted_outlyingness(x: jax.Array) -> jax.Array:
  """The demo's adjusted outlyingness of x [n] -> [n]: the distance to the lower median over the distance from it
  to the adjusted-boxplot whisker on that side (whiskers q1 - 1.5 e^{-4 mc} IQR and q3 + 1.5 e^{3 mc} IQR when the
  medcouple mc > 0, e^{-3 mc} and e^{4 mc} otherwise; quartiles linearly interpolated)."""
  median = jnp.sort(x)[(x.shape[0] - 1) // 2]
  q1, q3 = jnp.quantile(x, jnp.array([0.25, 0.75]))
  mc, iqr = medcouple(x), q3 - q1
  low = jnp.where(mc > 0, q1 - 1.5 * jnp.exp(-4 * mc) * iqr, q1 - 1.5 * jnp.exp(-3 * mc) * iqr)
  high = jnp.where(mc > 0, q3 + 1.5 * jnp.exp(3 * mc) * iqr, q3 + 1.5 * jnp.exp(4 * mc) * iqr)
  return jnp.where(x > median, (x - median) / (high - median), (median - x) / (median - low))


def threshold(scores: np.ndarray, eps: float) -> float:
  """The demo's `get_t` of scores [N]: a Gaussian (mean mu, standard deviation s, with sklearn GaussianMixture's
  variance floor) fitted to the scores at or below their lower median (the clean mode), then
  mu + s * sqrt(-2 ln(eps) * s * sqrt(2 pi)), the formula as the demo and BackdoorBench write it (where the density
  falls to eps would be mu + s * sqrt(-2 ln(eps * s * sqrt(2 pi))); the written cut scales with s^1.5, see the
  module docstring)."""
  scores = np.asarray(scores, np.float64)
  lower = scores[scores <= np.quantile(scores, 0.5, method="lower")]
  mean, std = lower.mean(), np.sqrt(lower.var() + REG_COVAR)
  return float(mean + std * np.sqrt(-2 * np.log(eps) * std * np.sqrt(2 * np.pi)))


# ---------------------------------------------------------------------------------------------------------------
# The separating MLP


def init_mlp(key: jax.Array, in_dim: int, hidden: int) -> list:
  """[(kernel, bias)] of Linear(in_dim, hidden), Linear(hidden, hidden), Linear(hidden, 1), each drawn as
  torch.nn.Linear's default: U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
  layers = []
  for k, (fan_in, fan_out) in zip(jax.random.split(key, 3), [(in_dim, hidden), (hidden, hidden), (hidden, 1)]):
    bound = fan_in ** -0.5
    kernel_key, bias_key = jax.random.split(k)
    layers.append((jax.random.uniform(kernel_key, (fan_in, fan_out), jnp.float32, -bound, bound),
                   jax.random.uniform(bias_key, (fan_out,), jnp.float32, -bound, bound)))
  return layers


def mlp_scores(layers: list, features: jax.Array) -> jax.Array:
  """The MLP's sigmoid output [B] of features [B, D] (ReLU after each hidden layer)."""
  h = features
  for kernel, bias in layers[:-1]:
    h = jax.nn.relu(h @ kernel + bias)
  kernel, bias = layers[-1]
  return jax.nn.sigmoid(h @ kernel + bias)[:, 0]


def fit_mlp(key: jax.Array, tx, positive: jax.Array, negative: jax.Array, hidden: int, steps: int) -> list:
  """A fresh MLP trained `steps` times on mean((out - 1)^2) over positive [B, D] then on mean(out^2) over
  negative [S, D], each side with its own state of `tx`; -> its layers."""
  layers = init_mlp(key, positive.shape[1], hidden)
  towards_one = lambda p: jnp.mean((mlp_scores(p, positive) - 1) ** 2)
  towards_zero = lambda p: jnp.mean(mlp_scores(p, negative) ** 2)

  def descend(loss_fn, params, opt_state):
    updates, opt_state = tx.update(jax.grad(loss_fn)(params), opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  def body(_, carry):
    params, one_state, zero_state = carry
    params, one_state = descend(towards_one, params, one_state)
    params, zero_state = descend(towards_zero, params, zero_state)
    return params, one_state, zero_state

  layers, _, _ = jax.lax.fori_loop(0, steps, body, (layers, tx.init(layers), tx.init(layers)))
  return layers


# ---------------------------------------------------------------------------------------------------------------
# The offset


def make_offset_step(graphdef, tx, mlp_tx, protocol: str, mean, std, mlp_hidden: int, inner_steps: int,
                     outlyingness: float, min_marked: int):
  """-> step(state, batch, key) -> (state, metrics); pure, jit it with the state donated.

  state.opt_state: (tx state of the variance descent, tx state of the loss ascent). batch: 'image' uint8
  [B, H, W, 3], 'label' int32 [B], 'feature' float32 [B, D] (the poisoned batch and its undefended features),
  'base_image' uint8 [S, H, W, 3], 'base_feature' float32 [S, D] (the clean base batch). protocol: 'ft_head'
  (frozen encoder, inference BatchNorm) or 'ft_all'. The batch samples whose MLP output has an adjusted
  outlyingness above `outlyingness` are marked; with fewer than `min_marked` marked the ascent is skipped.
  metrics: loss (the base batch's mean logit variance), ascent_ce (the marked samples' mean cross-entropy), marked
  (their fraction), mlp_loss and the health norms.
  """
  train_backbone = protocol == "ft_all"
  mean, std = jnp.asarray(mean), jnp.asarray(std)
  prepare = lambda images: augment.normalize(augment.to_float(images), mean, std)

  def forward(params, batch_stats, x, dropout_key):
    if not train_backbone:
      params = jax.tree.map(lambda p, keep: p if keep else jax.lax.stop_gradient(p), params,
                            finetune.head_only(params))
    model = nnx.merge(graphdef, params, batch_stats, copy=True)
    logits = model(x, train_backbone=train_backbone, dropout_key=dropout_key)
    return logits, nnx.state(model, nnx.BatchStat)

  def update(grads, opt_state, params):
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, updates

  def step(state: TrainState, batch, key):
    key = jax.random.fold_in(key, state.step)
    flat_key, mlp_key, ascent_key = jax.random.split(key, 3)
    flat_opt, ascent_opt = state.opt_state

    def variance(params):
      logits, batch_stats = forward(params, state.batch_stats, prepare(batch["base_image"]), flat_key)
      return jnp.mean(jnp.var(logits, axis=1, ddof=1)), batch_stats

    (flat_loss, batch_stats), flat_grads = jax.value_and_grad(variance, has_aux=True)(state.params)
    params, flat_opt, flat_updates = update(flat_grads, flat_opt, state.params)

    features = batch["feature"]
    layers = fit_mlp(mlp_key, mlp_tx, features, batch["base_feature"], mlp_hidden, inner_steps)
    separation = mlp_scores(layers, features)
    sharding = jax.typeof(separation).sharding
    whole = jax.sharding.reshard(separation, jax.NamedSharding(sharding.mesh, jax.P()))
    marked = jax.sharding.reshard(adjusted_outlyingness(whole) > outlyingness, sharding).astype(jnp.float32)
    count = jnp.sum(marked)

    def ascent(params):
      logits, stats = forward(params, batch_stats, prepare(batch["image"]), ascent_key)
      ce = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"])
      return -jnp.sum(marked * ce) / jnp.maximum(count, 1.0), stats

    (ascent_loss, ascent_stats), ascent_grads = jax.value_and_grad(ascent, has_aux=True)(params)
    ascended = update(ascent_grads, ascent_opt, params) + (ascent_stats,)
    skipped = (params, ascent_opt, jax.tree.map(jnp.zeros_like, params), batch_stats)
    params, ascent_opt, ascent_updates, batch_stats = jax.tree.map(
        lambda new, old: jnp.where(count >= min_marked, new, old), ascended, skipped)
    mlp_loss = jnp.mean((separation - 1) ** 2) + jnp.mean(mlp_scores(layers, batch["base_feature"]) ** 2)
    state = TrainState(state.step + 1, params, batch_stats, (flat_opt, ascent_opt), state.extra)
    return state, {"loss": flat_loss, "ascent_ce": -ascent_loss, "marked": jnp.mean(marked), "mlp_loss": mlp_loss,
                   "l2_grads": optax.global_norm((flat_grads, ascent_grads)), "l2_params": optax.global_norm(params),
                   "l2_updates": optax.global_norm((flat_updates, ascent_updates))}

  return step


def offset_state(encoder, num_classes: int, head_config, seed: int, tx, mesh):
  """-> (graphdef, state at step 0): `encoder` with a fresh head (head_config: hidden, dropout; drawn from `seed`)
  and two fresh states of `tx` (the descent's, the ascent's), replicated over `mesh`."""
  build = lambda: finetune.build_classifier(encoder, num_classes, head_config, seed)
  graphdef = nnx.graphdef(nnx.eval_shape(build))

  def init():
    _, params, batch_stats = nnx.split(build(), nnx.Param, nnx.BatchStat)
    return TrainState(jnp.zeros((), jnp.int32), params, batch_stats, (tx.init(params), tx.init(params)))

  return graphdef, jax.jit(init, out_shardings=parallel.replicated(mesh))()


def offset(inputs, block, run):
  """The offset classifier (graphdef, final state) of stage asset_offset_<protocol>, trained here or restored."""
  config, stage = inputs.config, f"asset_offset_{inputs.protocol}"
  victim = DeviceDataset({"image": inputs.images, "label": inputs.labels.astype(np.int32),
                          "feature": inputs.features.astype(np.float32)}, inputs.mesh, block.batch_size, config.seed)
  base = DeviceDataset({"base_image": inputs.reserve_images,
                        "base_feature": inputs.reserve_features.astype(np.float32)}, inputs.mesh,
                       block.base_batch_size, config.seed + 1)
  num_steps = block.epochs * victim.steps_per_epoch
  tx = make_optimizer(block.optim, num_steps, victim.steps_per_epoch,
                      trainable=finetune.head_only if inputs.protocol == "ft_head" else None)
  graphdef, state = offset_state(inputs.encoder, inputs.num_classes, config.finetune.head, config.seed, tx,
                                 inputs.mesh)
  mlp_tx = make_optimizer(block.optim, block.inner_steps)  # a schedule runs over each fit
  step = jax.jit(make_offset_step(graphdef, tx, mlp_tx, inputs.protocol, config.model.mean, config.model.std,
                                  block.mlp_hidden, block.inner_steps, block.outlyingness, block.min_marked),
                 donate_argnums=0)
  train_config = ml_collections.ConfigDict(dict(batch_size=block.batch_size, log_every=block.log_every,
                                                checkpoint_every=10**9, keep_checkpoints=1))
  state = stages.trained(run, stage, state, num_steps, lambda: stages.train(
      run, stage, state, step, lambda i: victim.batch(i) | base.batch(i), train_config, num_steps, inputs.mesh,
      config.seed))
  return graphdef, state


def scores(inputs, graphdef, state) -> np.ndarray:
  """ASSET's score float64 [N]: each victim sample's cross-entropy under the offset classifier (inference mode)."""
  return sample_losses(finetune.logits(inputs.config, graphdef, state, inputs.images, inputs.mesh), inputs.labels)


def suspects(inputs, block, run) -> np.ndarray:
  """The victim samples scored at or above the threshold of `threshold` -> sorted int64 indices."""
  score = scores(inputs, *offset(inputs, block, run))
  return np.flatnonzero(score >= threshold(score, block.threshold_eps)).astype(np.int64)
