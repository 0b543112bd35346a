"""The distillation defense's training step (distillation.md sections 6-7): the student's NT-Xent on two views
plus a distillation loss from a frozen teacher on view 1, per encoder tap and/or on the final features.

The map losses read the encoders' taps by name (config.defense.loss.taps, default every tap of the student: a
ResNet's layer1..layer4) from the student and the teacher alike. A loss switch names the criterion on the taps,
its default per-tap weights and the weight of the clone term (negative cosine of the final features):

  at      attention transfer (p = 2, NAD form), 1000 on each tap
  afd     AFD with a random, untrained SE attention drawn anew each epoch, 1000 on each tap
  fitnet  MSE of the maps, 1000 on each tap
  cc      the official code's correlation congruence, 1000 on each tap
  kd      KL of channel softmaxes (T = 0.5), 1000 on the first tap only (the official code's quirk)
  sp      similarity preserving (Tung & Mori), 1000 on each tap
  clone   no map loss, clone weight 1 (what the official code's "SP" switch does)
"""

from typing import NamedTuple

import jax
from flax import nnx

from jaxpurify import losses
from jaxpurify.ssl import simclr
from jaxpurify.train.state import TrainState, apply_gradients


class Switch(NamedTuple):
  """criterion(f_student [B,H,W,Cs], f_teacher [B,H,W,Ct], key) -> scalar, or None; default weights."""
  criterion: object
  tap_weight: float  # on each tap (on the first only when first_tap_only)
  clone_weight: float
  same_channels: bool  # the criterion compares maps channel by channel
  first_tap_only: bool = False


SWITCHES = {
    "at": Switch(lambda s, t, key: losses.attention_transfer(s, t, p=2), 1000.0, 0.0, False),
    "afd": Switch(losses.afd, 1000.0, 0.0, True),
    "fitnet": Switch(lambda s, t, key: losses.fitnet(s, t), 1000.0, 0.0, True),
    "cc": Switch(lambda s, t, key: losses.correlation_congruence(s, t), 1000.0, 0.0, True),
    "kd": Switch(lambda s, t, key: losses.kd(s, t, temperature=0.5), 1000.0, 0.0, True, first_tap_only=True),
    "sp": Switch(lambda s, t, key: losses.similarity_preserving(s, t), 1000.0, 0.0, False),
    "clone": Switch(None, 0.0, 1.0, False),
}


def loss_taps(loss_config, student_taps: tuple[str, ...]) -> tuple[str, ...]:
  """The taps the map losses compare: config.defense.loss.taps, or every tap of the student."""
  return tuple(loss_config.taps) if loss_config.taps is not None else tuple(student_taps)


def loss_weights(loss_config, taps: tuple[str, ...]) -> tuple[dict[str, float], float]:
  """config.defense.loss and the compared taps -> ({tap: weight}, clone weight): the switch's defaults unless
  config.defense.loss.layer_weights (one per tap) and clone_weight are set."""
  switch = SWITCHES[loss_config.name]
  if loss_config.layer_weights is not None:
    weights = tuple(loss_config.layer_weights)
  else:
    weights = tuple(switch.tap_weight if i == 0 or not switch.first_tap_only else 0.0 for i in range(len(taps)))
  clone = loss_config.clone_weight if loss_config.clone_weight is not None else switch.clone_weight
  return dict(zip(taps, weights)), clone


def make_step(graphdef, teacher_graphdef, tx, config, steps_per_epoch: int, taps: tuple[str, ...]):
  """-> step(state, batch, key) -> (state, metrics); pure, to be jitted with the state donated.

  state: the student (backbone + projection head) in training mode. batch: 'image' uint8 [B, H, W, 3]
  sharded along `data`, 'teacher' {'params', 'batch_stats'} of the frozen teacher backbone (replicated; run
  in inference mode, no gradient). taps: the tap names compared (`loss_taps`). Metrics: loss, nt_xent, one
  `<switch>_<tap>` per weighted tap, clone.
  """
  defense = config.defense
  switch = SWITCHES[defense.loss.name]
  tap_weights, clone_weight = loss_weights(defense.loss, taps)
  ssl = defense.ssl
  temperature = ssl.simclr.temperature

  def step(state: TrainState, batch, key):
    view_base, epoch_base = jax.random.split(key)
    view_key = jax.random.fold_in(view_base, state.step)
    epoch_key = jax.random.fold_in(epoch_base, state.step // steps_per_epoch)  # AFD's SE draw, one per epoch
    x1, x2 = simclr.make_views(view_key, batch["image"], ssl.augment, config.model.mean, config.model.std)
    teacher = nnx.merge(teacher_graphdef, batch["teacher"]["params"], batch["teacher"]["batch_stats"])
    h_teacher, taps_teacher = jax.lax.stop_gradient(teacher(x1, train=False))

    def loss_fn(params):
      model = nnx.merge(graphdef, params, state.batch_stats, copy=True)
      h1, z1, taps1 = model(x1, train=True)
      _, z2, _ = model(x2, train=True)
      terms = {"nt_xent": losses.nt_xent(z1, z2, temperature)}
      for i, (tap, weight) in enumerate(tap_weights.items()):
        if weight:
          terms[f"{defense.loss.name}_{tap}"] = weight * switch.criterion(
              taps1[tap], taps_teacher[tap], jax.random.fold_in(epoch_key, i))
      if clone_weight:
        terms["clone"] = clone_weight * losses.feature_clone(h1, h_teacher)
      return sum(terms.values()), (terms, nnx.state(model, nnx.BatchStat))

    (loss, (terms, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    state, health = apply_gradients(state, tx, grads, batch_stats)
    return state, {"loss": loss, **terms, **health}

  return step
