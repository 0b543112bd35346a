"""I-BAU: Implicit Backdoor Adversarial Unlearning (Zeng et al., ICLR 2022) of the undefended classifier on the
defender's reserved clean set (baselines.md 3.3).

min_θ max_δ of the CE under one universal perturbation δ [H, W, 3] (added to images in [0, 1], unclipped, as in
the references), solved in `rounds` rounds of two epochs over the reserve (stage ibau_unlearn_<protocol>):
1. maximise: δ starts at 0; one SGD step per batch (lr `inner_lr`) on the inner loss
   L_in(δ, θ) = −mean CE(f_θ(x + δ), ŷ) + `delta_penalty`·‖δ‖², ŷ the model's own predictions;
2. unlearn: one `optim` step per batch on θ with the implicit hypergradient of the outer loss
   L_out(δ, θ) = mean CE(f_θ(x + m·δ), y), m marking a random `perturbed_fraction` of the batch (at least one
   image), through the inner optimum δ*(θ): `fixed_point_iters` iterations of v ← v·∂Φ/∂δ + ∂L_out/∂δ from v = 0,
   then ∂L_out/∂θ + v·∂Φ/∂θ, with Φ(δ, θ) = δ − `fixed_point_lr`·∂L_in/∂δ (the fixed-point method of the
   references' `hypergrad.fixed_point`).
The model stays in inference mode (BatchNorm statistics fixed, no dropout), as the references' model.eval(); the
batches get the protocol's augmentation (BackdoorBench's training transform). Under FT-head only the head moves (the
hypergradient of the frozen encoder is not computed): I-BAU unlearns with the head alone.
Sources: YiZeng623/I-BAU defense.py and BackdoorBench defense/i-bau.py with config/defense/i-bau/config.yaml:
rounds 5, K = 5, inner SGD lr 10, penalty 1e-3 on ‖δ‖², Φ's step 0.1 (both: `GradientDescent(loss_inner, 0.1)`;
the iteration contracts where 0 < step x curvature of L_in < 2), 1% of each outer batch perturbed (both:
`portion = 0.01`; the floor of one image is ours, so that small batches keep the adversarial term), Adam 1e-3
(the official `--lr` default; BackdoorBench's config has 1e-4, backdoor-toolbox 5e-4), batch 100 (official). Φ
reads the predictions ŷ of the batch the outer step trains on, the inner problem δ solved (the references use the
true labels of their first batch). The batch is the smaller of `batch_size` and the reserve, rounded down to a
multiple of the devices. quick uses batch 16: its reserve (70 images) is one batch at 100, so a round was one δ
step and one θ step (5 Adam steps in all); at 16 a round is 4 + 4 steps.
"""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx

from jaxpurify import augment, finetune, parallel, stages
from jaxpurify.data.device import DeviceDataset
from jaxpurify.defenses.baselines import _repair
from jaxpurify.defenses.baselines.inputs import Inputs
from jaxpurify.errors import UserError
from jaxpurify.train.state import TrainState, apply_gradients, make_optimizer

KIND = "training"
CLEAN_DATA = True


def check(block, config, victim_counts: np.ndarray, reserve_counts: np.ndarray) -> None:
  """UserError when the reserve cannot fill one batch over the devices (perturbed_fraction's, rounds' and
  fixed_point_iters' ranges: `validation`'s rules)."""
  del config, victim_counts
  reserve, devices = int(reserve_counts.sum()), jax.device_count()
  if _repair.batch_size(reserve, block.batch_size, devices) == 0:
    raise UserError(f"I-BAU unlearns on the reserved clean set, which holds {reserve} images, fewer than one batch "
                    f"over the {devices} devices; raise config.baseline.clean_fraction")


def perturbed_count(batch_size: int, fraction: float) -> int:
  """How many images of an outer batch carry δ: int(fraction x batch) (the references'), at least 1."""
  return max(1, int(fraction * batch_size))


def inner_loss(delta: jax.Array, classify, x: jax.Array, targets: jax.Array, penalty: float) -> jax.Array:
  """δ [H, W, 3]; classify: images [B, H, W, 3] in [0, 1] -> logits [B, C]; x [B, H, W, 3]; targets int [B] ->
  −mean_b CE(classify(x_b + δ), targets_b) + penalty·‖δ‖², a scalar (minimising it maximises the CE)."""
  ce = optax.softmax_cross_entropy_with_integer_labels(classify(x + delta), targets).mean()
  return -ce + penalty * jnp.sum(jnp.square(delta))


def implicit_hypergradient(outer_loss, fixed_point_map, delta, theta, iters: int):
  """The hypergradient of outer_loss(δ*(θ), θ) at an (approximate) fixed point δ = Φ(δ, θ), by the fixed-point
  method: v_0 = 0, v_{k+1} = v_k·∂Φ/∂δ + ∂L/∂δ for `iters` steps, then ∂L/∂θ + v·∂Φ/∂θ (vector-Jacobian products).

  outer_loss(δ, θ) -> scalar; fixed_point_map Φ(δ, θ) -> a tree like δ; δ, θ: pytrees. -> (L(δ, θ), a tree like θ).
  """
  loss, (outer_delta, outer_theta) = jax.value_and_grad(outer_loss, argnums=(0, 1))(delta, theta)
  _, along_delta = jax.vjp(lambda d: fixed_point_map(d, theta), delta)

  def iterate(_, v):
    return jax.tree.map(jnp.add, along_delta(v)[0], outer_delta)

  v = jax.lax.fori_loop(0, iters, iterate, jax.tree.map(jnp.zeros_like, outer_delta))
  _, along_theta = jax.vjp(lambda t: fixed_point_map(delta, t), theta)
  return loss, jax.tree.map(jnp.add, outer_theta, along_theta(v)[0])


def make_step(graphdef, tx, block, augment_config, mean, std, steps_per_epoch: int, trainable=None):
  """-> step(state, batch, key) -> (state, metrics): one I-BAU step of a Classifier in inference mode; pure, jit it
  with the state donated.

  Steps alternate by epochs of `steps_per_epoch`: in each round of two, the first epoch's steps update δ
  (state.extra['delta'] [H, W, 3], reset to 0 at the round's first step) and the second's update θ with
  `implicit_hypergradient` (δ fixed). batch: 'image' uint8 [B, H, W, 3] and 'label' int32 [B], sharded along
  `data`. trainable: finetune.head_only or None; the frozen params get no gradient. block: inner_lr,
  fixed_point_lr, delta_penalty, perturbed_fraction, fixed_point_iters. metrics: loss (the step's objective,
  L_in or L_out), unlearning (1 on θ steps), delta_l2, accuracy (on the clean batch) and θ's health norms (0 on
  δ steps).
  """
  mean, std = jnp.asarray(mean), jnp.asarray(std)
  penalty = block.delta_penalty

  def classifier(state: TrainState):
    """-> classify(params, images in [0, 1]) -> logits, inference mode, frozen params without gradient."""
    def classify(params, images):
      if trainable is not None:
        params = jax.tree.map(lambda p, keep: p if keep else jax.lax.stop_gradient(p), params, trainable(params))
      return nnx.merge(graphdef, params, state.batch_stats, copy=True)(augment.normalize(images, mean, std))
    return classify

  def metrics(loss, unlearning, delta, accuracy, health):
    return {"loss": loss, "unlearning": jnp.float32(unlearning), "delta_l2": jnp.sqrt(jnp.sum(jnp.square(delta))),
            "accuracy": accuracy, **health}

  def maximise(state: TrainState, delta, x, labels, key):
    del key
    classify = classifier(state)
    logits = classify(state.params, x)
    predictions = jnp.argmax(logits, -1)
    loss, grad = jax.value_and_grad(inner_loss)(delta, lambda images: classify(state.params, images), x,
                                                  predictions, penalty)
    delta = delta - block.inner_lr * grad
    zero = jnp.zeros((), jnp.float32)
    health = {"l2_grads": zero, "l2_params": optax.global_norm(state.params), "l2_updates": zero}
    accuracy = jnp.mean(predictions == labels)
    return state.replace(step=state.step + 1, extra={"delta": delta}), metrics(loss, 0, delta, accuracy, health)

  def unlearn(state: TrainState, delta, x, labels, key):
    classify = classifier(state)
    predictions = jnp.argmax(classify(state.params, x), -1)
    chosen = jax.random.permutation(key, x.shape[0])[:perturbed_count(x.shape[0], block.perturbed_fraction)]
    carries = jnp.zeros(x.shape[0], x.dtype).at[chosen].set(1.0)[:, None, None, None]

    def outer_loss(d, params):
      return optax.softmax_cross_entropy_with_integer_labels(classify(params, x + carries * d), labels).mean()

    def fixed_point_map(d, params):
      descent = jax.grad(inner_loss)(d, lambda images: classify(params, images), x, predictions, penalty)
      return d - block.fixed_point_lr * descent

    loss, grads = implicit_hypergradient(outer_loss, fixed_point_map, delta, state.params, block.fixed_point_iters)
    accuracy = jnp.mean(predictions == labels)
    state, health = apply_gradients(state, tx, grads, state.batch_stats, extra={"delta": delta})
    return state, metrics(loss, 1, delta, accuracy, health)

  def step(state: TrainState, batch, key):
    key = jax.random.fold_in(key, state.step)
    aug_key, pick_key = jax.random.split(key)
    x = augment.to_float(augment.crop_flip(aug_key, batch["image"], augment_config.padding,
                                           augment_config.flip_prob))
    phase = state.step % (2 * steps_per_epoch)
    delta = jnp.where(phase == 0, 0.0, state.extra["delta"])
    return jax.lax.cond(phase < steps_per_epoch, maximise, unlearn, state, delta, x, batch["label"], pick_key)

  return step


def unlearn_stage(inputs: Inputs, block, run) -> tuple[TrainState, int]:
  """I-BAU from the undefended classifier on the whole reserve (stage ibau_unlearn_<protocol>) -> (its final state,
  the images perturbed per outer batch)."""
  config, mesh, protocol = inputs.config, inputs.mesh, inputs.protocol
  stage = f"ibau_unlearn_{protocol}"
  graphdef, undefended = inputs.model
  train = ml_collections.ConfigDict({
      **config.finetune[protocol].train.to_dict(), "epochs": 2 * block.rounds, "log_every": block.log_every,
      "batch_size": _repair.batch_size(len(inputs.reserve_labels), block.batch_size, jax.device_count())})
  dataset = DeviceDataset({"image": inputs.reserve_images, "label": inputs.reserve_labels.astype(np.int32)}, mesh,
                          train.batch_size, config.seed)
  per_epoch = dataset.steps_per_epoch
  trainable = finetune.head_only if protocol == "ft_head" else None
  tx = make_optimizer(block.optim, block.rounds * per_epoch, per_epoch, trainable=trainable)  # θ steps only
  image_shape = inputs.reserve_images.shape[1:]
  state = jax.jit(lambda s: TrainState(jnp.zeros((), jnp.int32), s.params, s.batch_stats, tx.init(s.params),
                                       {"delta": jnp.zeros(image_shape, jnp.float32)}),
                  out_shardings=parallel.replicated(mesh))(undefended)
  step = jax.jit(make_step(graphdef, tx, block, config.finetune.augment, config.model.mean, config.model.std,
                           per_epoch, trainable), donate_argnums=0)
  num_steps = 2 * block.rounds * per_epoch
  state = stages.trained(run, stage, state, num_steps, lambda: stages.train(
      run, stage, state, step, dataset.batch, train, num_steps, mesh, config.seed),
                         {"examples": dataset.num_examples})
  return state, perturbed_count(train.batch_size, block.perturbed_fraction)


def train(inputs: Inputs, block, run):
  """I-BAU -> (graphdef, final state, {'perturbed_per_batch': images carrying δ in each outer batch})."""
  state, perturbed = unlearn_stage(inputs, block, run)
  return inputs.model[0], state, {"perturbed_per_batch": perturbed}
