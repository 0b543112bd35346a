"""ANP: Adversarial Neuron Pruning (Wu & Wang, NeurIPS 2021; baselines.md 3.3).

Backdoor neurons are the ones whose perturbation most easily breaks the model. ANP gives each BatchNorm channel of
the undefended classifier's backbone a mask m in [0, 1] (on its scale) and multiplicative noise δ, ξ in [-eps, eps]
(on its scale and bias: γ·(m + δ), β·(1 + ξ); `_neuron_masks`) and, on the fit part of the reserve, solves
  min_m  alpha · CE(m) + (1 - alpha) · max_{δ, ξ} CE(m, δ, ξ)
with one jitted step per iteration (stage anp_masks_<protocol>): the noise drawn uniformly in [-eps, eps], then
`pgd_steps` signed-gradient ascent steps of eps / pgd_steps on it, then one SGD step (momentum 0.9) on the masks,
clipped to [0, 1]. That is the official code's (csdongxian/ANP_backdoor optimize_mask_cifar.py), but the noise is
projected back into [-eps, eps] after each ascent step, the bound the paper states (the code leaves it unclipped,
up to 2 eps). Channels whose mask ends <= a threshold are pruned in the undefended classifier, the threshold swept
from 0 to max_threshold in threshold_step and chosen on the reserve's held-out split (`_neuron_masks`; the official
code and BackdoorBench read the test set there).

Defaults: backdoor-toolbox other_defense.py and the official code: eps 0.4, 1 ascent step, alpha 0.2, 2000
iterations at batch 128, thresholds up to 0.9 in steps of 0.05, at most 10% relative accuracy drop; the mask lr is
BackdoorBench's 0.01 (config/defense/anp/config.yaml; the official code and the toolbox use 0.2). The masks are
learnt in inference mode (`_neuron_masks.logits`: the model the pruning keeps), where a mask gradient is not damped
by the next BatchNorm's re-normalisation: at 0.2 the masks collapsed on the quick threat-2 BadNets cell (the fit
part's clean accuracy under them fell to chance within 100 iterations, at eps 0.4, 0.2 and 0.1 alike); at 0.01 it
stays at 0.96 or more. Under FT-head ANP prunes the victim's encoder channels (the only BatchNorms) and keeps the
victim's head: the encoder is what ANP made of it. quick: the defaults.
"""

import jax
import jax.numpy as jnp
import numpy as np

from jaxpurify import stages
from jaxpurify.data.device import DeviceDataset
from jaxpurify.defenses.baselines import _neuron_masks, _repair
from jaxpurify.defenses.baselines.inputs import Inputs
from jaxpurify.errors import UserError
from jaxpurify.train.state import TrainState, apply_gradients

KIND = "training"
CLEAN_DATA = True


def check(block, config, victim_counts: np.ndarray, reserve_counts: np.ndarray) -> None:
  """UserError when the reserve's fit part is smaller than one batch (the ranges: `validation`'s rules)."""
  del victim_counts
  labels = np.repeat(np.arange(len(reserve_counts)), reserve_counts)
  fit, _ = _repair.held_out(labels, config.baseline.held_out_fraction, config.seed)
  devices = jax.device_count()
  if _repair.batch_size(len(fit), block.batch_size, devices) == 0:
    raise UserError(f"ANP learns its masks on the reserve's fit part, {len(fit)} images, fewer than one batch over "
                    f"the {devices} devices; raise config.baseline.clean_fraction")


def _uniform_like(key: jax.Array, tree, eps: float):
  """A tree like `tree` of independent uniform draws in [-eps, eps]."""
  leaves, treedef = jax.tree.flatten(tree)
  keys = jax.random.split(key, len(leaves))
  return treedef.unflatten([jax.random.uniform(k, x.shape, x.dtype, -eps, eps) for k, x in zip(keys, leaves)])


def adversarial_noise(key: jax.Array, loss_fn, masks, eps: float, steps: int):
  """ANP's inner maximisation: (δ, ξ), trees like `masks`, drawn uniformly in [-eps, eps], then `steps` times moved
  by eps / steps along the sign of the gradient of loss_fn(δ, ξ) (ascent) and clipped to [-eps, eps]."""
  delta_key, xi_key = jax.random.split(key)
  noise = (_uniform_like(delta_key, masks, eps), _uniform_like(xi_key, masks, eps))
  for _ in range(steps):
    grads = jax.grad(lambda n: loss_fn(*n))(noise)
    noise = jax.tree.map(lambda n, g: jnp.clip(n + eps / steps * jnp.sign(g), -eps, eps), noise, grads)
  return noise


def make_step(graphdef, paths: dict[str, tuple], tx, block, config):
  """-> step(state, batch, key) -> (state, metrics): one ANP mask iteration; pure, jit it with the state donated.

  state: a TrainState whose params are the masks {layer: float32 [C]}. batch: 'image' uint8 [B, H, W, 3] and
  'label' int32 [B] sharded along `data`, 'model' {'params', 'batch_stats'} of the classifier (replicated).
  metrics: loss (the minimised mix), natural and robust (the cross-entropies without and with the noise), accuracy
  (without noise, on the augmented batch), mask_mean and the health norms. The noise is drawn afresh each iteration
  from the step's key (the official reset(rand_init=True)), so the state holds only the masks and their optimiser.
  """
  eps, alpha = block.eps, block.alpha

  def step(state: TrainState, batch, key):
    key = jax.random.fold_in(key, state.step)
    aug_key, noise_key = jax.random.split(key)
    x, labels, model = _neuron_masks.augmented(aug_key, batch["image"], config), batch["label"], batch["model"]

    def forward(scale, bias=None):
      params = _neuron_masks.scaled(model["params"], paths, scale, bias)
      return _neuron_masks.logits(graphdef, params, model["batch_stats"], x)

    def noisy_ce(masks, delta, xi):
      scale = jax.tree.map(jnp.add, masks, delta)
      return _neuron_masks.cross_entropy(forward(scale, jax.tree.map(lambda n: 1.0 + n, xi)), labels)

    masks = jax.lax.stop_gradient(state.params)
    delta, xi = adversarial_noise(noise_key, lambda d, n: noisy_ce(masks, d, n), masks, eps, block.pgd_steps)

    def loss_fn(masks):
      clean_logits = forward(masks)
      natural = _neuron_masks.cross_entropy(clean_logits, labels)
      robust = noisy_ce(masks, delta, xi)
      return alpha * natural + (1 - alpha) * robust, (natural, robust, clean_logits)

    (loss, (natural, robust, clean_logits)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    state, health = apply_gradients(state, tx, grads, state.batch_stats)
    state = _neuron_masks.clipped(state)
    mask_mean = jnp.mean(jnp.concatenate([m.ravel() for m in jax.tree.leaves(state.params)]))
    accuracy = jnp.mean(jnp.argmax(clean_logits, -1) == labels)
    return state, {"loss": loss, "natural": natural, "robust": robust, "accuracy": accuracy, "mask_mean": mask_mean,
                   **health}

  return step


def learn_masks(inputs: Inputs, block, run, fit: np.ndarray) -> dict[str, np.ndarray]:
  """ANP's masks on the reserve positions `fit` (stage anp_masks_<protocol>) -> {layer: float32 [C]} in [0, 1]."""
  config, protocol, mesh = inputs.config, inputs.protocol, inputs.mesh
  stage = f"anp_masks_{protocol}"
  graphdef, model = inputs.model
  batch_size = _repair.batch_size(len(fit), block.batch_size, jax.device_count())
  dataset = DeviceDataset({"image": inputs.reserve_images[fit], "label": inputs.reserve_labels[fit].astype(np.int32)},
                          mesh, batch_size, config.seed)
  tx = _neuron_masks.mask_optimizer(block.mask_lr)
  state = _neuron_masks.mask_state(_neuron_masks.ones(graphdef, model), tx, mesh)
  step = jax.jit(make_step(graphdef, _neuron_masks.bn_paths(graphdef, model), tx, block, config), donate_argnums=0)
  train = _neuron_masks.train_config(inputs, block, batch_size)
  state = stages.trained(run, stage, state, block.iters, lambda: stages.train(
      run, stage, state, step, _neuron_masks.with_model(dataset, model), train, block.iters, mesh, config.seed),
                         {"examples": dataset.num_examples})
  return {name: np.asarray(v) for name, v in jax.device_get(state.params).items()}


def train(inputs: Inputs, block, run):
  """ANP on the undefended classifier -> (graphdef, the classifier with its low-mask channels pruned, {'pruned':
  {layer: count}, 'threshold', 'held_out_acc', 'held_out_acc_unpruned', 'sweep'})."""
  fit, held = _repair.held_out(inputs.reserve_labels, inputs.config.baseline.held_out_fraction, inputs.config.seed)
  masks = learn_masks(inputs, block, run, fit)
  state, diagnostics = _neuron_masks.prune_by_values(inputs, block, masks, held)
  return inputs.model[0], state, diagnostics
