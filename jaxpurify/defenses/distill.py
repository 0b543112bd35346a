"""The distillation defense's training step (distillation.md sections 6-7): the student's NT-Xent on two views
plus a distillation loss from a frozen teacher on view 1, per stage map and/or on the final features.

A loss switch names the criterion on the four stage maps (layer1..layer4), its default per-layer weights and
the weight of the clone term (negative cosine of the final features):

  at      attention transfer (p = 2, NAD form), 1000 on each layer
  afd     AFD with a random, untrained SE attention drawn anew each epoch, 1000 on each layer
  fitnet  MSE of the maps, 1000 on each layer
  cc      the official code's correlation congruence, 1000 on each layer
  kd      KL of channel softmaxes (T = 0.5), 1000 on layer1 only (the official code's quirk)
  sp      similarity preserving (Tung & Mori), 1000 on each layer
  clone   no map loss, clone weight 1 (what the official code's "SP" switch does)
"""

from typing import NamedTuple

import jax
from flax import nnx

from jaxpurify import losses
from jaxpurify.ssl import simclr
from jaxpurify.train.state import TrainState, apply_gradients

NUM_LAYERS = 4


class Switch(NamedTuple):
  """criterion(f_student [B,H,W,Cs], f_teacher [B,H,W,Ct], key) -> scalar, or None; default weights."""
  criterion: object
  layer_weights: tuple[float, ...]
  clone_weight: float
  same_channels: bool  # the criterion compares maps channel by channel


SWITCHES = {
    "at": Switch(lambda s, t, key: losses.attention_transfer(s, t, p=2), (1000.0,) * 4, 0.0, False),
    "afd": Switch(losses.afd, (1000.0,) * 4, 0.0, True),
    "fitnet": Switch(lambda s, t, key: losses.fitnet(s, t), (1000.0,) * 4, 0.0, True),
    "cc": Switch(lambda s, t, key: losses.correlation_congruence(s, t), (1000.0,) * 4, 0.0, True),
    "kd": Switch(lambda s, t, key: losses.kd(s, t, temperature=0.5), (1000.0, 0.0, 0.0, 0.0), 0.0, True),
    "sp": Switch(lambda s, t, key: losses.similarity_preserving(s, t), (1000.0,) * 4, 0.0, False),
    "clone": Switch(None, (0.0,) * 4, 1.0, False),
}


def loss_weights(loss_config) -> tuple[tuple[float, ...], float]:
  """config.defense.loss -> (per-layer weights layer1..layer4, clone weight): the switch's defaults unless set."""
  switch = SWITCHES[loss_config.name]
  layers = tuple(loss_config.layer_weights) if loss_config.layer_weights is not None else switch.layer_weights
  clone = loss_config.clone_weight if loss_config.clone_weight is not None else switch.clone_weight
  return layers, clone


def make_step(graphdef, teacher_graphdef, tx, config, steps_per_epoch: int):
  """-> step(state, batch, key) -> (state, metrics); pure, to be jitted with the state donated.

  state: the student (backbone + projection head) in training mode. batch: 'image' uint8 [B, H, W, 3]
  sharded along `data`, 'teacher' {'params', 'batch_stats'} of the frozen teacher backbone (replicated; run
  in inference mode, no gradient). Metrics: loss, nt_xent, one `<switch>_layer<l>` per weighted layer, clone.
  """
  defense = config.defense
  switch = SWITCHES[defense.loss.name]
  layer_weights, clone_weight = loss_weights(defense.loss)
  ssl = defense.ssl
  temperature = ssl.simclr.temperature

  def step(state: TrainState, batch, key):
    view_base, epoch_base = jax.random.split(key)
    view_key = jax.random.fold_in(view_base, state.step)
    epoch_key = jax.random.fold_in(epoch_base, state.step // steps_per_epoch)  # AFD's SE draw, one per epoch
    x1, x2 = simclr.make_views(view_key, batch["image"], ssl.augment, config.model.mean, config.model.std)
    teacher = nnx.merge(teacher_graphdef, batch["teacher"]["params"], batch["teacher"]["batch_stats"])
    h_teacher, maps_teacher = jax.lax.stop_gradient(teacher(x1, train=False))

    def loss_fn(params):
      model = nnx.merge(graphdef, params, state.batch_stats, copy=True)
      h1, z1, maps1 = model(x1, train=True)
      _, z2, _ = model(x2, train=True)
      terms = {"nt_xent": losses.nt_xent(z1, z2, temperature)}
      for layer, weight in enumerate(layer_weights):
        if weight:
          terms[f"{defense.loss.name}_layer{layer + 1}"] = weight * switch.criterion(
              maps1[layer], maps_teacher[layer], jax.random.fold_in(epoch_key, layer))
      if clone_weight:
        terms["clone"] = clone_weight * losses.feature_clone(h1, h_teacher)
      return sum(terms.values()), (terms, nnx.state(model, nnx.BatchStat))

    (loss, (terms, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    state, health = apply_gradients(state, tx, grads, batch_stats)
    return state, {"loss": loss, **terms, **health}

  return step
