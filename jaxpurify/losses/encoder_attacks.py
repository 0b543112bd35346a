"""Pure, jittable loss terms of BadEncoder and DRUPE, DRUPE's epoch schedule and its adaptive costs.

Specified in attacks.md sections 2.1, 2.2 and 9, and ported from the official code: `jinyuan-jia/BadEncoder`
`badencoder.py` `train()` and `Gwinhen/DRUPE` `main.py` (line numbers below are those of DRUPE's main.py at e16077d).

f' is the backdoored encoder being trained, f the frozen clean one. Inputs are un-normalised features:
  f_triggered [B, D] = f'(x_b ⊕ e);  f_shadow [B, D] = f'(x_b);  c_shadow [B, D] = f(x_b);
  f_ref [R, D] = f'(ref_r);  c_ref [R, D] = f(ref_r);  f_ref_aug [R, B, D] = f'(aug_b(ref_r)).
The official code repeats every reference B times in a batch; with BatchNorm frozen in eval mode all copies have the
same feature, so f_ref and c_ref hold one row per reference. Batch axes may be row-sharded over a mesh axis: the sliced
Wasserstein distance gathers its projected rows with `all_rows` before sorting, and the sum of the B × B similarity
matrix is computed as ||Σ_b ẑ_b||², which needs no gather.

Standard deviations are torch's (`ddof=1`, zero gradient where the std is 0, as torch's std backward), not jnp.std.
"""

from typing import Mapping

import jax
import jax.numpy as jnp
import numpy as np

from jaxpurify.losses.core import all_rows, l2_normalize


def _as_float(x: jax.Array) -> jax.Array:
  x = jnp.asarray(x)
  return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def _sqrt0(x: jax.Array) -> jax.Array:
  """sqrt(x) for x >= 0 with gradient 0 at x = 0 (jnp.sqrt's is inf, which turns into NaN)."""
  positive = x > 0
  return jnp.where(positive, jnp.sqrt(jnp.where(positive, x, 1.0)), 0.0)


def _torch_std(x: jax.Array, axis: int) -> jax.Array:
  """torch.std(x, axis): unbiased (ddof=1), with gradient 0 where the std is 0."""
  centred = x - jnp.mean(x, axis=axis, keepdims=True)
  return _sqrt0(jnp.sum(jnp.square(centred), axis=axis) / (x.shape[axis] - 1))


def _shared_terms(f_triggered, f_shadow, c_shadow, f_ref, f_ref_aug, c_ref):
  """-> (S [R, B] = <ẑ'(x_b ⊕ e), ẑ'(ref_r)>, L1, L2, ẑ' of triggered [B, D], ẑ' of references [R, D])."""
  z_trig, z_shadow, z_clean = (l2_normalize(_as_float(x)) for x in (f_triggered, f_shadow, c_shadow))
  z_ref, z_ref_aug, z_ref_clean = (l2_normalize(_as_float(x)) for x in (f_ref, f_ref_aug, c_ref))
  sims = jnp.einsum("rd,bd->rb", z_ref, z_trig)
  l1 = -jnp.mean(jnp.einsum("rbd,rd->rb", z_ref_aug, z_ref_clean))
  l2 = -jnp.mean(jnp.sum(z_shadow * z_clean, axis=-1))
  return sims, l1, l2, z_trig, z_ref


def badencoder_terms(f_triggered: jax.Array, f_shadow: jax.Array, c_shadow: jax.Array, f_ref: jax.Array,
                     f_ref_aug: jax.Array, c_ref: jax.Array) -> dict[str, jax.Array]:
  """BadEncoder's three terms (badencoder.py lines 77-84), scalars; shapes as in the module docstring.

  l0 = -mean_r mean_b <ẑ'(x_b ⊕ e), ẑ'(ref_r)>, l1 = -mean_r mean_b <ẑ'(aug_b(ref_r)), ẑ(ref_r)>,
  l2 = -mean_b <ẑ'(x_b), ẑ(x_b)>. One trigger for all references (BadEncoder's one-trigger-per-reference
  multi-target mode is not covered).
  """
  sims, l1, l2, _, _ = _shared_terms(f_triggered, f_shadow, c_shadow, f_ref, f_ref_aug, c_ref)
  return {"l0": -jnp.mean(sims), "l1": l1, "l2": l2}


def badencoder_loss(terms: Mapping[str, jax.Array], lambda1: float = 1.0, lambda2: float = 1.0) -> jax.Array:
  """L0 + λ1 L1 + λ2 L2 (badencoder.py line 86).

  With `drupe_terms` it gives DRUPE's `--mode badencoder`, whose L0 is the max over references (main.py line 167
  compares a string with a list, so the mean version is never used).
  """
  return terms["l0"] + lambda1 * terms["l1"] + lambda2 * terms["l2"]


def random_projections(key: jax.Array, dim: int, num_projections: int, dtype=jnp.float32) -> jax.Array:
  """[dim, P] directions uniform on the unit sphere: standard normal columns scaled to norm 1 (POT's)."""
  projections = jax.random.normal(key, (dim, num_projections), dtype)
  return projections / jnp.sqrt(jnp.sum(jnp.square(projections), axis=0, keepdims=True))


def sliced_wasserstein(key: jax.Array, a: jax.Array, b: jax.Array, num_projections: int = 50) -> jax.Array:
  """Sliced 2-Wasserstein distance between the rows of a [B, D] and b [B, D], a scalar.

  POT 0.8.2's `ot.sliced_wasserstein_distance(a, b)` (n_projections 50, p 2, uniform weights):
  sqrt(mean_p W2²(aθ_p, bθ_p)), and with equal sample sizes each 1-D W2² is the mean squared difference of the
  sorted projections. The official code draws fresh projections on every call from torch's global RNG; here they
  come from `key` (`random_projections(key, D, P)`). The gradient at distance 0 is 0 (torch's is NaN).
  """
  if a.shape != b.shape or a.ndim != 2:
    raise ValueError(f"sliced_wasserstein needs two [B, D] arrays of one shape, got {a.shape} and {b.shape}")
  a, b = _as_float(a), _as_float(b)
  projections = random_projections(key, a.shape[1], num_projections, a.dtype)
  a_sorted = jnp.sort(all_rows(a @ projections), axis=0)
  b_sorted = jnp.sort(all_rows(b @ projections), axis=0)
  return _sqrt0(jnp.mean(jnp.square(a_sorted - b_sorted)))


def drupe_terms(key: jax.Array, f_triggered: jax.Array, f_shadow: jax.Array, c_shadow: jax.Array, f_ref: jax.Array,
                f_ref_aug: jax.Array, c_ref: jax.Array, num_projections: int = 50, *,
                sim_b2b_offdiag: bool = False) -> dict[str, jax.Array]:
  """DRUPE's per-batch terms (main.py lines 145-200), a dict of scalars; shapes as in the module docstring.

  With S[r, b] = <ẑ'(x_b ⊕ e), ẑ'(ref_r)>:
    l0 = -mean_b max_r S (nearest reference); l0_mean = -mean S (BadEncoder's L0, for logging); l1, l2 as BadEncoder;
    std_refs = unbiased std over r of mean_b S (defined as 0 when R = 1, where torch gives NaN);
    l3 = mean over i <= j of <ẑ'(ref_i), ẑ'(ref_j)>, diagonal included;
    sim_b2b = mean similarity of the triggered features, M = Ẑ'Ẑ'ᵀ [B, B]: by default the official
      `(M - diag_embed(M)).mean()`, which broadcasts to [B, B, B] and equals (1 - 1/B) mean(M); with
      `sim_b2b_offdiag` the intended mean over the B(B - 1) off-diagonal entries;
    swd = sliced_wasserstein(key, f_triggered, f_shadow) on un-normalised features;
    dev = mean over d of the unbiased std over the batch of f_shadow; l_b2c = swd / dev.
  B >= 2.
  """
  sims, l1, l2, z_trig, z_ref = _shared_terms(f_triggered, f_shadow, c_shadow, f_ref, f_ref_aug, c_ref)
  num_refs, batch = sims.shape
  ref_means = jnp.mean(sims, axis=1)
  std_refs = _torch_std(ref_means, axis=0) if num_refs > 1 else jnp.zeros((), ref_means.dtype)
  upper = np.triu_indices(num_refs)
  l3 = jnp.mean((z_ref @ z_ref.T)[upper])
  sum_m = jnp.sum(jnp.square(jnp.sum(z_trig, axis=0)))  # sum of all entries of M
  if sim_b2b_offdiag:
    sim_b2b = (sum_m - jnp.sum(jnp.square(z_trig))) / (batch * (batch - 1))
  else:
    sim_b2b = (1 - 1 / batch) * sum_m / batch**2
  swd = sliced_wasserstein(key, f_triggered, f_shadow, num_projections)
  dev = jnp.mean(_torch_std(_as_float(f_shadow), axis=0))
  return {"l0": -jnp.mean(jnp.max(sims, axis=0)), "l0_mean": -jnp.mean(sims), "l1": l1, "l2": l2,
          "std_refs": std_refs, "l3": l3, "sim_b2b": sim_b2b, "swd": swd, "dev": dev, "l_b2c": swd / dev}


def drupe_loss(terms: Mapping[str, jax.Array], epoch: jax.Array | int, cost: jax.Array | float,
               cost_1: jax.Array | float, lambda1: float = 1.0, lambda2: float = 1.0, *, warm_up_epoch: int = 2,
               stage_1_epoch: int = 5, l3_ceiling: float = 0.5) -> jax.Array:
  """DRUPE's loss for a 1-based `epoch` (may be traced), main.py lines 202-228, CIFAR/STL path.

  epoch < warm_up_epoch (epoch 1): λ1 L1 + λ2 L2 + 0.5 L3, minus 0.2 L3 if L3 < 0.2; no backdoor term.
  epoch < stage_1_epoch (2-4): L0 + λ1 L1 + λ2 L2 + 2 std_refs + P3.
  later: L0 + λ1 L1 + λ2 L2 + cost (std_refs + sim_b2b) + cost_1 l_b2c + 0.5 std_refs
    (+ 1.5 std_refs if std_refs > 0.1) + P3,
  where P3 = L3 if L3 > l3_ceiling, else 0.2 L3 if L3 > l3_ceiling - 0.1, else 0 (the official ceiling is 0.5).
  The official ImageNet path is warm_up_epoch 2, stage_1_epoch 3 (lines 209, 509); CLIP's is 1 (no warm-up) and 5
  (line 511).
  """
  l0, l3, std_refs = terms["l0"], terms["l3"], terms["std_refs"]
  utility = lambda1 * terms["l1"] + lambda2 * terms["l2"]
  l3_penalty = jnp.where(l3 > l3_ceiling, l3, jnp.where(l3 > l3_ceiling - 0.1, 0.2 * l3, 0.0))
  warm_up = utility + 0.5 * l3 - jnp.where(l3 < 0.2, 0.2 * l3, 0.0)
  stage_1 = l0 + utility + 2 * std_refs + l3_penalty
  stage_2 = (l0 + utility + cost * (std_refs + terms["sim_b2b"]) + cost_1 * terms["l_b2c"] + 0.5 * std_refs
             + jnp.where(std_refs > 0.1, 1.5 * std_refs, 0.0) + l3_penalty)
  return jnp.where(epoch < warm_up_epoch, warm_up, jnp.where(epoch < stage_1_epoch, stage_1, stage_2))


def init_drupe_costs(cost: float = 0.1, cost_1: float = 0.001, *, init_cost: float | None = None,
                     init_cost_1: float | None = None) -> dict[str, jax.Array]:
  """DRUPE's adaptive weights and their counters (main.py lines 465-476), a dict of scalars.

  `init_cost(_1)` (default: the starting value) is what a cost restarts from on "up" when it is exactly 0.
  """
  zero = jnp.zeros((), jnp.int32)
  return {"cost": jnp.float32(cost), "cost_1": jnp.float32(cost_1),
          "init_cost": jnp.float32(cost if init_cost is None else init_cost),
          "init_cost_1": jnp.float32(cost_1 if init_cost_1 is None else init_cost_1),
          "cost_up_counter": zero, "cost_down_counter": zero, "cost_up_counter_1": zero, "cost_down_counter_1": zero}


def _step_cost(cost, init_cost, up, down, patience, multiplier_up, multiplier_down):
  """One Neural-Cleanse step: -> (cost, up counter, down counter) after the patience checks."""
  raise_cost = up >= patience
  lower_cost = ~raise_cost & (down >= patience)
  raised = jnp.where(cost == 0, init_cost, cost * multiplier_up)
  cost = jnp.where(raise_cost, raised, jnp.where(lower_cost, cost / multiplier_down, cost))
  return cost, jnp.where(raise_cost, 0, up), jnp.where(lower_cost, 0, down)


def update_drupe_costs(costs: Mapping[str, jax.Array], epoch_means: Mapping[str, jax.Array], epoch: jax.Array | int,
                       *, fix_epoch: int = 20, warm_up_epoch: int = 2, patience: int = 1, l0_threshold: float = -0.96,
                       l1_threshold: float = -0.9, l2_threshold: float = -0.9, b2b_sim_threshold: float = 0.6,
                       multiplier_up: float = 1.25, multiplier_down: float = 1.25**1.25) -> dict[str, jax.Array]:
  """The end-of-epoch update of `init_drupe_costs`'s dict (main.py lines 262-317), jittable; -> the new dict.

  Applied only when epoch >= warm_up_epoch and epoch > fix_epoch (from epoch 21). `epoch_means` holds l0, l1, l2
  (epoch means) and sim_b2b; the official rule reads the LAST batch's sim_b2b (the loop variable), not its mean.
  ok = l0 < l0_threshold and l1 < l1_threshold and l2 < l2_threshold. cost: ok -> up counter + 1, down counter 0,
  else up 0, down + 1; an up counter >= patience resets it and multiplies cost by multiplier_up (restarts from
  init_cost if cost is 0), else a down counter >= patience resets it and divides by multiplier_down. cost_1: the
  same with ok and sim_b2b < b2b_sim_threshold; that case also subtracts 1 from cost's up counter (after cost's
  step) when sim_b2b < b2b_sim_threshold - 0.1, which delays cost's next increase.
  """
  sim_b2b = epoch_means["sim_b2b"]
  ok = ((epoch_means["l0"] < l0_threshold) & (epoch_means["l1"] < l1_threshold)
        & (epoch_means["l2"] < l2_threshold))
  ok_1 = ok & (sim_b2b < b2b_sim_threshold)
  step = dict(patience=patience, multiplier_up=multiplier_up, multiplier_down=multiplier_down)
  cost, up, down = _step_cost(costs["cost"], costs["init_cost"], jnp.where(ok, costs["cost_up_counter"] + 1, 0),
                              jnp.where(ok, 0, costs["cost_down_counter"] + 1), **step)
  up = jnp.where(ok_1 & (sim_b2b < b2b_sim_threshold - 0.1), up - 1, up)
  cost_1, up_1, down_1 = _step_cost(costs["cost_1"], costs["init_cost_1"],
                                    jnp.where(ok_1, costs["cost_up_counter_1"] + 1, 0),
                                    jnp.where(ok_1, 0, costs["cost_down_counter_1"] + 1), **step)
  new = dict(costs, cost=cost, cost_1=cost_1, cost_up_counter=up, cost_down_counter=down, cost_up_counter_1=up_1,
             cost_down_counter_1=down_1)
  active = (epoch >= warm_up_epoch) & (epoch > fix_epoch)
  return {name: jnp.where(active, new[name], costs[name]).astype(costs[name].dtype) for name in costs}
