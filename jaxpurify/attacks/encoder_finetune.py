"""BadEncoder and DRUPE: fine-tune a copy of a clean encoder so that triggered inputs embed like the
target class's references while clean inputs keep the clean encoder's embedding (attacks.md 2.1, 2.2).

Only the backbone's convolution weights train: BatchNorm runs in inference mode with its affine parameters
frozen, and the projection head is not part of the state. The clean encoder's features of the (un-augmented)
shadow images and references are constants, computed once before training.

BatchNorm statistics (`config.attack.batch_norm`): `frozen` (the official code: the clean encoder's running
statistics throughout) or `clean` (our option, not the papers'): before each loss, a forward pass in training mode
on the step's clean shadow images moves the running statistics (momentum 0.9, no gradient), and every term is then
computed in inference mode with them. The backdoor is then implanted under the statistics a victim computes on
clean data, so re-estimating them alone does not undo it; fine-tuning the weights still can
(docs/encoder-attacks.md).

A ViT has no BatchNorm, and every one of its parameters trains, LayerNorm scales and biases included (our choice:
the papers attack ResNets only). What BadEncoder freezes is the normalisation that statistics of the clean
pre-training data fixed (running means and variances, and the affine parameters fitted to them); a LayerNorm
normalises each token by itself and keeps no statistics, so there is nothing of the kind to protect.
"""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxpurify import augment
from jaxpurify.encoders import Encoder
from jaxpurify.losses import encoder_attacks
from jaxpurify.train.state import TrainState, apply_gradients

MODES = ("badencoder", "drupe")
BATCH_NORM = ("frozen", "clean")  # config.attack.batch_norm
EPOCH_MEANS = ("l0", "l1", "l2")  # DRUPE's cost update reads these epoch means and the last batch's sim_b2b


def trainable_mask(encoder: Encoder):
  """A tree of bools over encoder.params: False for every BatchNorm scale and bias (all True for a ViT)."""
  model = nnx.merge(encoder.graphdef, encoder.params, encoder.batch_stats)
  batch_norms = {tuple(path) for path, node in nnx.iter_graph(model) if isinstance(node, nnx.BatchNorm)}

  def keep(path, _):
    keys = tuple(getattr(k, "key", None) for k in path)
    return not any(keys[:i] in batch_norms for i in range(1, len(keys) + 1))

  return jax.tree_util.tree_map_with_path(keep, encoder.params)


def init_state(encoder: Encoder, tx, mode: str, drupe_config=None) -> TrainState:
  """Step 0: a copy of the clean encoder's arrays (the step donates its state), DRUPE's adaptive costs."""
  params, batch_stats = jax.tree.map(jnp.copy, (encoder.params, encoder.batch_stats))
  extra = {}
  if mode == "drupe":
    extra = {"costs": encoder_attacks.init_drupe_costs(drupe_config.cost, drupe_config.cost_1),
             "sums": {name: jnp.zeros((), jnp.float32) for name in EPOCH_MEANS}}
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, batch_stats=batch_stats,
                    opt_state=tx.init(params), extra=extra)


def _rows_like(image: jax.Array, images: jax.Array) -> jax.Array:
  """[H, W, C] -> [B, H, W, C] copies, sharded like `images` [B, H, W, C]."""
  copies = jnp.broadcast_to(image, images.shape)
  sharding = jax.typeof(images).sharding
  if sharding.mesh.empty or all(axis is None for axis in sharding.spec):
    return copies
  return jax.sharding.reshard(copies, sharding.spec)


def make_step(graphdef, tx, config, steps_per_epoch: int, trigger):
  """-> step(state, batch, key) -> (state, metrics); pure, to be jitted with the state donated.

  batch: 'image' uint8 [B, H, W, 3] shadow images and 'clean_feature' [B, D] (the clean encoder's, sharded
  along `data`); 'reference' uint8 [R, H, W, 3] and 'clean_reference' [R, D] (replicated).
  trigger: uint8 [B, H, W, 3] -> uint8 [B, H, W, 3]. config.attack.mode picks the loss (MODES).
  """
  attack, mode = config.attack, config.attack.mode
  mean, std = jnp.asarray(config.model.mean), jnp.asarray(config.model.std)
  aug = attack.augment
  finetune = dict(crop=False, flip_prob=aug.flip_prob, jitter=tuple(aug.jitter), jitter_prob=aug.jitter_prob,
                  gray_prob=aug.gray_prob)

  def prepare(images):
    return augment.normalize(augment.to_float(images), mean, std)

  def step(state: TrainState, batch, key):
    key = jax.random.fold_in(key, state.step)
    aug_key, swd_key = jax.random.split(key)
    images, references = batch["image"], batch["reference"]
    shadow, triggered, plain_refs = prepare(images), prepare(trigger(images)), prepare(references)
    # B independent "finetune" augmentations of each reference, as the official data set builds them.
    refs_aug = [augment.normalize(augment.simclr_augment(jax.random.fold_in(aug_key, r),
                                                         _rows_like(references[r], images), **finetune), mean, std)
                for r in range(references.shape[0])]
    epoch = state.step // steps_per_epoch + 1  # 1-based, as DRUPE's schedule counts
    batch_stats = state.batch_stats
    if attack.batch_norm == "clean" and jax.tree.leaves(batch_stats):  # a ViT keeps no statistics
      batch_stats = clean_statistics(graphdef, state.params, batch_stats, shadow)

    def loss_fn(params):
      model = nnx.merge(graphdef, params, batch_stats, copy=True)
      embed = lambda x: model(x, train=False)[0]
      features = dict(f_triggered=embed(triggered), f_shadow=embed(shadow), c_shadow=batch["clean_feature"],
                      f_ref=embed(plain_refs), f_ref_aug=jnp.stack([embed(x) for x in refs_aug]),
                      c_ref=batch["clean_reference"])
      if mode == "badencoder":
        terms = encoder_attacks.badencoder_terms(**features)
        return encoder_attacks.badencoder_loss(terms, attack.lambda1, attack.lambda2), terms
      drupe = config.drupe
      terms = encoder_attacks.drupe_terms(swd_key, **features, num_projections=drupe.num_projections,
                                          sim_b2b_offdiag=drupe.sim_b2b_offdiag)
      costs = state.extra["costs"]
      loss = encoder_attacks.drupe_loss(terms, epoch, costs["cost"], costs["cost_1"], attack.lambda1,
                                        attack.lambda2, l3_ceiling=drupe.l3_ceiling)
      return loss, terms

    (loss, terms), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    extra = _drupe_epoch_end(state, terms, epoch, steps_per_epoch) if mode == "drupe" else None
    state, health = apply_gradients(state, tx, grads, batch_stats, extra)
    return state, {"loss": loss, **terms, **health}

  return step


def clean_statistics(graphdef, params, batch_stats, images: jax.Array):
  """BatchNorm running statistics moved by one training-mode forward pass on normalised clean `images`
  [B, H, W, 3]; no gradient flows through them."""
  model = nnx.merge(graphdef, jax.lax.stop_gradient(params), batch_stats, copy=True)
  model(images, train=True)
  return nnx.state(model, nnx.BatchStat)


def _drupe_epoch_end(state: TrainState, terms: dict, epoch, steps_per_epoch: int) -> dict:
  """Accumulates this step's terms; on an epoch's last step, updates the costs from the epoch means."""
  sums = {name: state.extra["sums"][name] + terms[name] for name in EPOCH_MEANS}
  last = (state.step + 1) % steps_per_epoch == 0
  means = {name: value / steps_per_epoch for name, value in sums.items()} | {"sim_b2b": terms["sim_b2b"]}
  updated = encoder_attacks.update_drupe_costs(state.extra["costs"], means, epoch)
  costs = jax.tree.map(lambda new, old: jnp.where(last, new, old), updated, state.extra["costs"])
  sums = jax.tree.map(lambda s: jnp.where(last, jnp.zeros_like(s), s), sums)
  return {"costs": costs, "sums": sums}


def shadow_indices(num_examples: int, fraction: float, seed: int) -> np.ndarray:
  """The shadow set: round(fraction * N) positions of the pre-training set, a permutation drawn with `seed`."""
  count = max(1, int(round(fraction * num_examples)))
  return np.random.default_rng(seed).permutation(num_examples)[:count]
