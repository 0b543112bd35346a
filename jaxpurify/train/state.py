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
  """Everything a step changes. `step` counts finished steps (int32 scalar)."""
  step: jax.Array
  params: Any
  batch_stats: Any
  opt_state: Any


def make_optimizer(optim) -> optax.GradientTransformation:
  """optim: name ('adam' | 'sgd'), lr, weight_decay (coupled: added to the gradient, as torch does), momentum."""
  if optim.name == "adam":
    base = optax.adam(optim.lr)
  elif optim.name == "sgd":
    base = optax.sgd(optim.lr, momentum=optim.momentum or None)
  else:
    raise UserError(f"unknown optimizer {optim.name!r}; set config.optim.name to 'adam' or 'sgd'")
  if optim.weight_decay:
    return optax.chain(optax.add_decayed_weights(optim.weight_decay), base)
  return base


def init_state(model: nnx.Module, tx: optax.GradientTransformation):
  """model -> (graphdef, TrainState at step 0). Params are nnx.Param, statistics nnx.BatchStat."""
  graphdef, params, batch_stats = nnx.split(model, nnx.Param, nnx.BatchStat)
  state = TrainState(step=jnp.zeros((), jnp.int32), params=params, batch_stats=batch_stats,
                     opt_state=tx.init(params))
  return graphdef, state


def apply_gradients(state: TrainState, tx, grads, batch_stats) -> tuple[TrainState, dict]:
  """One optimiser update; returns the new state and the health metrics of jax-style.md section 11."""
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  health = {"l2_grads": optax.global_norm(grads), "l2_params": optax.global_norm(params),
            "l2_updates": optax.global_norm(updates)}
  return TrainState(state.step + 1, params, batch_stats, opt_state), health


def create_state(build_model, tx: optax.GradientTransformation, mesh):
  """Builds the model and its optimiser state directly into place, replicated over `mesh`.

  build_model: () -> nnx.Module (deterministic). Returns (graphdef, TrainState).
  """
  graphdef = None

  def init():
    nonlocal graphdef
    graphdef, state = init_state(build_model(), tx)
    return state

  jax.eval_shape(init)  # fixes graphdef without allocating
  return graphdef, jax.jit(init, out_shardings=jax.NamedSharding(mesh, jax.P()))()
