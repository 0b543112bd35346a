"""The distillation defense's training step (distillation.md sections 6-7): the student's NT-Xent on two views
plus a distillation loss from a frozen teacher on view 1, per pair of encoder taps and/or on the final features.

The map losses compare the student's taps (config.defense.loss.taps, default `default_taps`: a ResNet's
layer1..layer4, a 12-block ViT's block3, block6, block9, block12) with the teacher's, paired in order
(config.defense.loss.teacher_taps, default the same names when the teacher has them, else the teacher's
`default_taps`: a ResNet teacher of a ViT student pairs layer1..layer4 with block3..block12). A loss switch names
the criterion on a pair of maps, its default per-tap weights and the weight of the clone term (negative cosine of
the final features):

  at      attention transfer (p = 2, NAD form), 1000 on each tap
  afd     AFD with a random, untrained SE attention drawn anew each epoch, 1000 on each tap
  fitnet  MSE of the maps, 1000 on each tap
  cc      the official code's correlation congruence, 1000 on each tap
  kd      KL of channel softmaxes (T = 0.5), 1000 on the first tap only (the official code's quirk)
  sp      similarity preserving (Tung & Mori), 1000 on each tap
  clone   no map loss, clone weight 1 (what the official code's "SP" switch does)

The maps of a pair may lie on two grids (a ResNet stage and a ViT block), one dividing the other: AT area-averages
the finer attention map onto the coarser grid; FitNet, CC, KD and AFD compare channels one by one, need equal
channel counts and area-pool the finer feature map (`losses.distillation.match_grids`); SP compares B x B
similarities of the flattened maps, which need no common grid.
"""

import math
from typing import NamedTuple

import jax
from flax import nnx

from jaxpurify import losses
from jaxpurify.losses.distillation import match_grids
from jaxpurify.ssl import simclr
from jaxpurify.train.state import TrainState, apply_gradients


class Switch(NamedTuple):
  """criterion(f_student [B,H,W,Cs], f_teacher [B,H',W',Ct], key) -> scalar, or None; default weights."""
  criterion: object
  tap_weight: float  # on each tap (on the first only when first_tap_only)
  clone_weight: float
  same_channels: bool  # the criterion compares maps channel by channel (on the coarser of their grids)
  first_tap_only: bool = False
  any_grid: bool = False  # the maps need no common grid (else one grid must divide the other)


SWITCHES = {
    "at": Switch(lambda s, t, key: losses.attention_transfer(s, t, p=2), 1000.0, 0.0, False),
    "afd": Switch(lambda s, t, key: losses.afd(*match_grids(s, t), key), 1000.0, 0.0, True),
    "fitnet": Switch(lambda s, t, key: losses.fitnet(*match_grids(s, t)), 1000.0, 0.0, True),
    "cc": Switch(lambda s, t, key: losses.correlation_congruence(*match_grids(s, t)), 1000.0, 0.0, True),
    "kd": Switch(lambda s, t, key: losses.kd(*match_grids(s, t), temperature=0.5), 1000.0, 0.0, True,
                 first_tap_only=True),
    "sp": Switch(lambda s, t, key: losses.similarity_preserving(s, t), 1000.0, 0.0, False, any_grid=True),
    "clone": Switch(None, 0.0, 1.0, False, any_grid=True),
}


def default_taps(tap_names: tuple[str, ...]) -> tuple[str, ...]:
  """An encoder's taps the map losses compare by default: the last tap of each quarter of its depth, i.e. every tap
  of an encoder with at most four (a ResNet's layer1..layer4) and block3, block6, block9, block12 of a 12-block ViT
  (the ends of its four equal quarters, the analogue of a ResNet's four stage ends)."""
  count = len(tap_names)
  if count <= 4:
    return tuple(tap_names)
  return tuple(tap_names[math.ceil(count * quarter / 4) - 1] for quarter in range(1, 5))


def loss_taps(loss_config, student_taps: tuple[str, ...]) -> tuple[str, ...]:
  """The student's taps the map losses compare: config.defense.loss.taps, or `default_taps` of the student."""
  return tuple(loss_config.taps) if loss_config.taps is not None else default_taps(tuple(student_taps))


def teacher_loss_taps(loss_config, taps: tuple[str, ...], teacher_taps: tuple[str, ...]) -> tuple[str, ...]:
  """The teacher's taps paired in order with the student's `taps`: config.defense.loss.teacher_taps, else `taps`
  themselves when the teacher has them all (one architecture), else `default_taps` of the teacher."""
  if loss_config.teacher_taps is not None:
    return tuple(loss_config.teacher_taps)
  if all(tap in teacher_taps for tap in taps):
    return tuple(taps)
  return default_taps(tuple(teacher_taps))


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


def make_step(graphdef, teacher_graphdef, tx, config, steps_per_epoch: int, taps: tuple[str, ...],
              teacher_taps: tuple[str, ...] | None = None):
  """-> step(state, batch, key) -> (state, metrics); pure, to be jitted with the state donated.

  state: the student (backbone + projection head) in training mode. batch: 'image' uint8 [B, H, W, 3]
  sharded along `data`, 'teacher' {'params', 'batch_stats'} of the frozen teacher backbone (replicated; run
  in inference mode, no gradient). taps: the student's tap names compared (`loss_taps`); teacher_taps: the
  teacher's, paired in order (`teacher_loss_taps`; default `taps`). Metrics: loss, nt_xent, one
  `<switch>_<student tap>` per weighted tap, clone.
  """
  defense = config.defense
  switch = SWITCHES[defense.loss.name]
  tap_weights, clone_weight = loss_weights(defense.loss, taps)
  paired = dict(zip(taps, teacher_taps if teacher_taps is not None else taps))
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
              taps1[tap], taps_teacher[paired[tap]], jax.random.fold_in(epoch_key, i))
      if clone_weight:
        terms["clone"] = clone_weight * losses.feature_clone(h1, h_teacher)
      return sum(terms.values()), (terms, nnx.state(model, nnx.BatchStat))

    (loss, (terms, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    state, health = apply_gradients(state, tx, grads, batch_stats)
    return state, {"loss": loss, **terms, **health}

  return step
