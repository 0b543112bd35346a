"""BYOL's training step: an online network regresses an EMA target network's projections (Grill et al.).

The online network is backbone + projector + predictor (`BYOLModel`); `TrainState.extra` holds the target,
an exponential moving average of the online backbone + projector (`target_params`, `target_batch_stats`,
with the parameter paths of an `SSLModel`). The loss is the BYOL paper's: the sum of both directions,
`byol_loss(p1, sg(z2')) + byol_loss(p2, sg(z1'))`, each 2 - 2·cos averaged over the batch (range [0, 8]).
"""

import jax
import jax.numpy as jnp
from flax import nnx

from jaxpurify.losses import byol_loss
from jaxpurify.models import build_byol_model, build_ssl_model
from jaxpurify.ssl.moco import momentum_update
from jaxpurify.ssl.simclr import make_views
from jaxpurify.train.state import TrainState, apply_gradients

TARGET = nnx.Not(nnx.PathContains("predictor"))  # the online state the target averages: all but the predictor


def build_model(config):
  """The online network: backbone, projector (config.pretrain.head) and predictor."""
  return build_byol_model(config.model, config.pretrain.head, config.pretrain.byol.predictor_hidden, config.seed)


def init_extra(config, state) -> dict:
  """The target starts as a copy of the online backbone and projector."""
  del config
  copy = lambda tree: jax.tree.map(jnp.copy, tree)  # own buffers, so the donated state holds no alias
  return {"target_params": copy(state.params.filter(TARGET)),
          "target_batch_stats": copy(state.batch_stats.filter(TARGET))}


def make_step(graphdef, tx, config):
  """-> step(state, batch, key) -> (state, metrics); pure, to be jitted with the state donated.

  batch: {'image': uint8 [B, H, W, 3]} sharded along `data`. After the optimiser update the target moves
  towards the new online parameters with rate 1 - config.pretrain.byol.ema, as in the BYOL paper.
  """
  ema = config.pretrain.byol.ema
  abstract_target = nnx.eval_shape(lambda: build_ssl_model(config.model, config.pretrain.head, config.seed))
  target_graphdef = nnx.split(abstract_target, nnx.Param, nnx.BatchStat)[0]

  def step(state: TrainState, batch, key):
    key = jax.random.fold_in(key, state.step)
    x1, x2 = make_views(key, batch["image"], config.pretrain.augment, config.model.mean, config.model.std)
    target = nnx.merge(target_graphdef, state.extra["target_params"], state.extra["target_batch_stats"],
                       copy=True)
    _, t1, _ = target(x1, train=True)
    _, t2, _ = target(x2, train=True)
    t1, t2 = jax.lax.stop_gradient(t1), jax.lax.stop_gradient(t2)

    def loss_fn(params):
      model = nnx.merge(graphdef, params, state.batch_stats, copy=True)  # fresh Variables in this trace
      _, z1, _ = model(x1, train=True)
      _, z2, _ = model(x2, train=True)
      p1, p2 = model.predictor(z1, train=True), model.predictor(z2, train=True)
      return byol_loss(p1, t2) + byol_loss(p2, t1), nnx.state(model, nnx.BatchStat)

    (loss, batch_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    state, health = apply_gradients(state, tx, grads, batch_stats)
    extra = {"target_params": momentum_update(state.extra["target_params"], state.params.filter(TARGET), ema),
             "target_batch_stats": nnx.state(target, nnx.BatchStat)}
    return state.replace(extra=extra), {"loss": loss, **health}

  return step
