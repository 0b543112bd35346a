"""The training state pytree and optimisers built from config."""

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax
from flax import nnx

from jaxpurify.errors import UserError


@flax.struct.dataclass
class TrainState:
  """Everything a step changes. `step` counts finished steps (int32 scalar).

  `extra` holds what a method updates without gradients (MoCo's momentum encoder and queue, BYOL's
  target network, DRUPE's adaptive costs); {} when there is none.
  """
  step: jax.Array
  params: Any
  batch_stats: Any
  opt_state: Any
  extra: Any = flax.struct.field(default_factory=dict)


SCHEDULES = ("constant", "cosine")
OPTIMIZERS = ("adam", "sgd", "adamw")
NO_DECAY_NAMES = ("pos_embed", "cls_token")  # timm's VisionTransformer.no_weight_decay()


def learning_rate(optim, num_steps: int, steps_per_epoch: int = 1):
  """optim.lr, constant or cosine-decayed to 0 over `num_steps` after `optim.warmup_epochs` of linear warm-up."""
  schedule = optim.get("schedule", "constant")
  warmup = optim.get("warmup_epochs", 0) * steps_per_epoch
  if schedule == "constant":
    return optim.lr if not warmup else optax.linear_schedule(0.0, optim.lr, warmup)
  if schedule == "cosine":
    return optax.warmup_cosine_decay_schedule(0.0 if warmup else optim.lr, optim.lr, warmup,
                                              max(num_steps, warmup + 1))
  raise UserError(f"unknown learning-rate schedule {schedule!r}; set config.optim.schedule to one of "
                  f"{', '.join(SCHEDULES)}")


def decays(params):
  """AdamW's weight-decay mask over `params` (timm's rule): True for weight matrices and convolution kernels,
  False for every leaf of at most one dimension (biases, LayerNorm and BatchNorm scales) and for a ViT's
  position embeddings and class token."""
  def decayed(path, leaf):
    names = {getattr(k, "key", None) for k in path}
    return leaf.ndim >= 2 and not names & set(NO_DECAY_NAMES)
  return jax.tree_util.tree_map_with_path(decayed, params)


def make_optimizer(optim, num_steps: int = 0, steps_per_epoch: int = 1,
                   trainable=None) -> optax.GradientTransformation:
  """optim: name ('adam' | 'sgd' | 'adamw'), lr, weight_decay, momentum, and optionally schedule
  ('constant' | 'cosine') and warmup_epochs. adam and sgd couple the weight decay (added to the gradient, as
  torch does); adamw decouples it (torch's AdamW: params -= lr * weight_decay * params, beside Adam's step) and
  decays only the leaves `decays` marks.

  trainable: a pytree of bools shaped like the params (or a function params -> such a tree); False leaves
  get zero updates and no weight decay (frozen). None trains everything.
  """
  lr = learning_rate(optim, num_steps, steps_per_epoch)
  if optim.name == "adam":
    base = optax.adam(lr)
  elif optim.name == "sgd":
    base = optax.sgd(lr, momentum=optim.momentum or None)
  elif optim.name == "adamw":
    base = optax.adamw(lr, weight_decay=optim.weight_decay, mask=decays)
  else:
    raise UserError(f"unknown optimizer {optim.name!r}; set config.optim.name to one of {', '.join(OPTIMIZERS)}")
  if optim.weight_decay and optim.name != "adamw":
    base = optax.chain(optax.add_decayed_weights(optim.weight_decay), base)
  if trainable is None:
    return base
  label = lambda t: jax.tree.map(lambda keep: "train" if keep else "frozen", t)
  labels = (lambda params: label(trainable(params))) if callable(trainable) else label(trainable)
  return optax.multi_transform({"train": base, "frozen": optax.set_to_zero()}, labels)


def init_state(model: nnx.Module, tx: optax.GradientTransformation):
  """model -> (graphdef, TrainState at step 0). Params are nnx.Param, statistics nnx.BatchStat."""
  graphdef, params, batch_stats = nnx.split(model, nnx.Param, nnx.BatchStat)
  state = TrainState(step=jnp.zeros((), jnp.int32), params=params, batch_stats=batch_stats,
                     opt_state=tx.init(params))
  return graphdef, state


def apply_gradients(state: TrainState, tx, grads, batch_stats, extra=None) -> tuple[TrainState, dict]:
  """One optimiser update (and the new `extra`, if given); returns the new state and the health metrics of
  jax-style.md section 11."""
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  health = {"l2_grads": optax.global_norm(grads), "l2_params": optax.global_norm(params),
            "l2_updates": optax.global_norm(updates)}
  extra = state.extra if extra is None else extra
  return TrainState(state.step + 1, params, batch_stats, opt_state, extra), health


def create_state(build_model, tx: optax.GradientTransformation, mesh, init_extra=None):
  """Builds the model and its optimiser state directly into place, replicated over `mesh`.

  build_model: () -> nnx.Module (deterministic). init_extra: (TrainState) -> dict, the state's `extra`.
  Returns (graphdef, TrainState).
  """
  graphdef = None

  def init():
    nonlocal graphdef
    graphdef, state = init_state(build_model(), tx)
    return state if init_extra is None else state.replace(extra=init_extra(state))

  jax.eval_shape(init)  # fixes graphdef without allocating
  return graphdef, jax.jit(init, out_shardings=jax.NamedSharding(mesh, jax.P()))()
