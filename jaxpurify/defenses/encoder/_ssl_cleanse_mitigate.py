"""SSL-Cleanse's mitigator (ssl_cleanse.py says what it follows): the official BYOL-style unlearning loss, its step
and its resumable stage."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from jaxpurify import augment, encoders, parallel, stages
from jaxpurify.data.device import DeviceDataset
from jaxpurify.defenses.encoder._ssl_cleanse_detect import stamp, take
from jaxpurify.encoders import Encoder
from jaxpurify.losses import byol_loss
from jaxpurify.models import BYOLModel, build_ssl_model
from jaxpurify.ssl import byol, simclr
from jaxpurify.train.state import TrainState, apply_gradients, init_state, make_optimizer

VIEWS = 4  # the official n_0 + n_1 + n_2: two clean views, one stamped, one clean partner of the stamped one
PAIRS = VIEWS * (VIEWS - 1) // 2  # the official num_pairs every term is divided by


def mitigation_loss(prediction_0, target_projection_1, feature_2, target_feature_3, projection_2,
                    target_projection_3) -> tuple[jax.Array, jax.Array]:
  """The official BYOL.forward's two non-zero terms, [B, ·] arrays (rows may be sharded), -> (loss_1, loss_4):

    loss_1 = 2 nmse(pred(head(f'(v0))), head_t(f(v1))) / PAIRS   (the clean pair; the official adds the term twice)
    loss_4 = (nmse(f'(v2), f(v3)) + nmse(head(f'(v2)), head_t(f(v3)))) / PAIRS   (stamped v2 to clean v3)

  nmse(a, b) = 2 - 2 cos(a, b) averaged over rows (norm_mse_loss); f', head, pred are trained, f, head_t frozen.
  """
  loss_1 = 2.0 * byol_loss(prediction_0, target_projection_1) / PAIRS
  loss_4 = (byol_loss(feature_2, target_feature_3) + byol_loss(projection_2, target_projection_3)) / PAIRS
  return loss_1, loss_4


def lr_factor(warmup_steps: int, drop_epochs, drop_factor: float, epochs: int, steps_per_epoch: int):
  """The official lr multiplier by step count c: min((c + 1) / warmup_steps, 1) (train.py's warm-up) times
  drop_factor for every milestone epoch (epochs - d for d in drop_epochs, MultiStepLR) already reached."""
  milestones = [(epochs - d) * steps_per_epoch for d in drop_epochs if epochs - d >= 1]

  def factor(count):
    warm = jnp.minimum((count + 1) / warmup_steps, 1.0) if warmup_steps else 1.0
    drops = sum(jnp.where(count >= m, 1, 0) for m in milestones)
    return warm * drop_factor ** drops

  return factor


def optimizer(block, steps_per_epoch: int) -> optax.GradientTransformation:
  """block.optim (Adam, coupled weight decay: train.state.make_optimizer) with its updates scaled by `lr_factor`."""
  factor = lr_factor(block.warmup_steps, tuple(block.drop_epochs), block.drop_factor, block.train.epochs,
                     steps_per_epoch)
  return optax.chain(make_optimizer(block.optim), optax.scale_by_schedule(factor))


def make_step(graphdef, target_graphdef, tx, block, model_config):
  """-> step(state, batch, key) -> (state, metrics); pure, jit it with the state donated.

  state: the online network (backbone, projector `head`, `predictor`; a BYOLModel) in training mode; extra: the
  frozen target (suspect backbone and initial projector), run in training mode as the official model_t.
  batch: 'image' uint8 [B, H, W, 3] sharded along `data`; 'mask' [T, H, W, 1] and 'pattern' [T, H, W, 3] in [0, 1],
  the reversed triggers (replicated). Views: v0, v1 clean; v2 stamped with a trigger drawn uniformly per image; v3
  clean (block.augment each), all four through the online backbone in that order (v1 and v3 only for its BatchNorm
  averages, as the official forward). metrics: loss, loss_1, loss_4 and the health norms.
  """
  mean, std = jnp.asarray(model_config.mean), jnp.asarray(model_config.std)

  def step(state: TrainState, batch, key):
    key = jax.random.fold_in(key, state.step)
    k_clean, k_stamped, k_pick = jax.random.split(key, 3)
    images = batch["image"]
    x0, x1 = simclr.make_views(k_clean, images, block.augment, model_config.mean, model_config.std)
    x2, x3 = simclr.make_views(k_stamped, images, block.augment, model_config.mean, model_config.std)
    count = batch["mask"].shape[0]
    pick = jax.vmap(lambda k: jax.random.randint(k, (), 0, count))(augment.batch_keys(k_pick, images))
    x2 = stamp(x2, take(batch["mask"], pick), augment.normalize(take(batch["pattern"], pick), mean, std))
    target = nnx.merge(target_graphdef, state.extra["target_params"], state.extra["target_batch_stats"], copy=True)
    _, t1, _ = jax.lax.stop_gradient(target(x1, train=True))
    h3, t3, _ = jax.lax.stop_gradient(target(x3, train=True))

    def loss_fn(params):
      model = nnx.merge(graphdef, params, state.batch_stats, copy=True)
      _, z0, _ = model(x0, train=True)
      model.backbone(x1, train=True)  # as the official forward: every view moves BatchNorm's running averages
      h2, z2, _ = model(x2, train=True)
      model.backbone(x3, train=True)
      loss_1, loss_4 = mitigation_loss(model.predictor(z0, train=True), t1, h2, h3, z2, t3)
      return block.alpha_1 * loss_1 + block.alpha_4 * loss_4, (loss_1, loss_4, nnx.state(model, nnx.BatchStat))

    (loss, (loss_1, loss_4, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    state, health = apply_gradients(state, tx, grads, batch_stats)
    return state, {"loss": loss, "loss_1": loss_1, "loss_4": loss_4, **health}

  return step


def initial_state(block, config, suspect: Encoder, tx, mesh):
  """-> (graphdef, TrainState at step 0), replicated: the online network (the suspect's backbone, a projector and
  a predictor drawn with config.seed) and in `extra` its frozen target (copies of that backbone and projector)."""
  graphdef = None

  def init(params, batch_stats):
    nonlocal graphdef
    backbone = nnx.merge(suspect.graphdef, params, batch_stats, copy=True)
    model = BYOLModel(backbone, block.head.hidden, block.head.dim, block.predictor_hidden,
                      rngs=nnx.Rngs(config.seed))
    graphdef, state = init_state(model, tx)
    return state.replace(extra=byol.init_extra(config, state))

  jax.eval_shape(init, suspect.params, suspect.batch_stats)  # fixes graphdef
  return graphdef, jax.jit(init, out_shardings=parallel.replicated(mesh))(suspect.params, suspect.batch_stats)


def training(block, config, suspect: Encoder, images: np.ndarray, mesh):
  """-> (graphdef, state at step 0, jitted donating step, DeviceDataset, number of steps) of the mitigator on uint8
  `images` [N, H, W, 3]."""
  dataset = DeviceDataset({"image": images}, mesh, block.train.batch_size, config.seed)
  num_steps = block.train.epochs * dataset.steps_per_epoch
  tx = optimizer(block, dataset.steps_per_epoch)
  graphdef, state = initial_state(block, config, suspect, tx, mesh)
  target = nnx.eval_shape(lambda: build_ssl_model(config.model, block.head, config.seed))
  step = jax.jit(make_step(graphdef, nnx.split(target, nnx.Param, nnx.BatchStat)[0], tx, block, config.model),
                 donate_argnums=0)
  return graphdef, state, step, dataset, num_steps


def mitigate(run, stage: str, block, config, suspect: Encoder, images: np.ndarray, masks: np.ndarray,
             patterns: np.ndarray, mesh) -> Encoder:
  """The mitigator's fine-tuning of `suspect` on uint8 `images` [N, H, W, 3] with the triggers masks [T, H, W, 1],
  patterns [T, H, W, 3] (stage `stage`, resumable) -> the cleaned backbone."""
  graphdef, state, step, dataset, num_steps = training(block, config, suspect, images, mesh)
  constants = parallel.put_replicated({"mask": masks.astype(np.float32), "pattern": patterns.astype(np.float32)},
                                      mesh)
  state = stages.trained(run, stage, state, num_steps, lambda: stages.train(
      run, stage, state, step, lambda s: dataset.batch(s) | constants, block.train, num_steps, mesh, config.seed),
                         {"examples": dataset.num_examples, "triggers": len(masks)})
  return encoders.backbone_of(graphdef, state)
