"""T-Core's selective encoder channel filtering, built on CLP (Zheng et al., ECCV 2022; tcore.md 4.3 and 5.3).

A channel's upper bound of the channel Lipschitz constant (UCLC) is the largest singular value of its conv
kernel scaled by its BatchNorm's |scale / std|. Backdoor channels are sensitive to a small trigger, so their
UCLC stands out in their layer: channels above mean + u * std of the layer are candidates, and pruning one sets
its BatchNorm scale and bias to 0. "Selective" (a reconstruction): the trusted data choose u, the most pruning
whose trusted-set score stays within a tolerance of the unpruned encoder's.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxpurify.encoders import Encoder

RULES = ("plain", "sweep")


def uclc(kernel: jax.Array, bn_scale: jax.Array, bn_var: jax.Array, eps: float = 1e-5) -> jax.Array:
  """kernel [kh, kw, C_in, C_out], BN scale and running variance [C_out] -> UCLC [C_out]: for each output channel
  the largest singular value of its kernel as a [C_in, kh * kw] matrix, times |scale / sqrt(var + eps)|.
  (CLP's code uses no eps: pass eps=0.)"""
  kh, kw, cin, cout = kernel.shape
  per_channel = jnp.transpose(kernel, (3, 2, 0, 1)).reshape(cout, cin, kh * kw)
  sigma = jnp.linalg.svd(per_channel, compute_uv=False)[:, 0]
  return sigma * jnp.abs(bn_scale / jnp.sqrt(bn_var + eps))


def uclc_dense(kernel: jax.Array, bn_scale=None, bn_var=None, eps: float = 1e-5) -> jax.Array:
  """The linear-layer variant (ViT-style encoders, MLP heads): kernel [C_in, C_out] -> [C_out], the norm of each
  neuron's incoming weights (the largest singular value of a 1 x C_in matrix), times |scale / sqrt(var + eps)|
  when a BatchNorm follows."""
  score = jnp.linalg.norm(kernel, axis=0)
  if bn_scale is not None:
    score = score * jnp.abs(bn_scale / jnp.sqrt(bn_var + eps))
  return score


def _pure(state) -> dict:
  return nnx.to_pure_dict(state)


def conv_bn_layers(encoder: Encoder) -> list[tuple[str, tuple, tuple]]:
  """Every conv followed by a BatchNorm of the ResNet, in forward order -> [(name, conv path, bn path)], paths
  being key tuples into the params' pure dict (e.g. ('stages', 0, 1, 'conv2'))."""
  params = _pure(encoder.params)
  layers = [("stem", ("stem_conv",), ("stem_bn",))]
  for s, stage in sorted(params["stages"].items()):
    for b, block in sorted(stage.items()):
      prefix = f"stage{s + 1}.block{b}"
      convs = sorted(k for k in block if isinstance(k, str) and k.startswith("conv"))
      for conv in convs:
        bn = "bn" + conv[len("conv"):]
        if bn not in block:
          raise ValueError(f"{prefix}.{conv} has no BatchNorm {bn}")
        layers.append((f"{prefix}.{conv}", ("stages", s, b, conv), ("stages", s, b, bn)))
      if "shortcut" in block:
        layers.append((f"{prefix}.shortcut", ("stages", s, b, "shortcut", 0), ("stages", s, b, "shortcut", 1)))
  return layers


def _get(tree: dict, path: tuple):
  for key in path:
    tree = tree[key]
  return tree


def layer_uclc(encoder: Encoder, eps: float = 0.0) -> dict[str, np.ndarray]:
  """{layer name: UCLC [C]} over conv_bn_layers."""
  params, stats = _pure(encoder.params), _pure(encoder.batch_stats)
  out = {}
  for name, conv, bn in conv_bn_layers(encoder):
    out[name] = np.asarray(uclc(_get(params, conv)["kernel"], _get(params, bn)["scale"], _get(stats, bn)["var"], eps))
  return out


def threshold_masks(scores: dict[str, np.ndarray], u: float, ddof: int = 1) -> dict[str, np.ndarray]:
  """{layer: keep bool [C]}: False where a score exceeds mean + u * std of its layer (std with `ddof`)."""
  if math.isinf(u):
    return {name: np.ones(len(s), bool) for name, s in scores.items()}
  return {name: s <= s.mean() + u * s.std(ddof=ddof) for name, s in scores.items()}


def layer_masks(encoder: Encoder, u: float, ddof: int = 1, eps: float = 0.0) -> dict[str, np.ndarray]:
  """CLP's rule on every conv+BN layer of the encoder: {layer name: keep bool [C]}."""
  return threshold_masks(layer_uclc(encoder, eps), u, ddof)


def apply_masks(encoder: Encoder, masks: dict[str, np.ndarray]) -> Encoder:
  """A new Encoder whose pruned channels have BatchNorm scale and bias 0 (the input is left untouched)."""
  params = jax.tree.map(lambda x: x, _pure(encoder.params))
  for name, _, bn in conv_bn_layers(encoder):
    if name in masks:
      block = _get(params, bn)
      keep = jnp.asarray(masks[name], block["scale"].dtype)
      block["scale"], block["bias"] = block["scale"] * keep, block["bias"] * keep
  state = jax.tree.map(lambda x: x, encoder.params)
  nnx.replace_by_pure_dict(state, params)
  return Encoder(encoder.graphdef, state, encoder.batch_stats)


def classifier_param_mask(params, masks: dict[str, np.ndarray]):
  """For a Classifier's params (encoder under 'backbone'): a tree like `params` of float32 multipliers, the keep
  mask on pruned layers' BatchNorm scale and bias, 1.0 elsewhere."""
  backbone = Encoder(None, params["backbone"], None)
  multipliers = jax.tree.map(lambda _: jnp.ones((), jnp.float32), params)
  pure = _pure(multipliers)
  for name, _, bn in conv_bn_layers(backbone):
    if name in masks and not masks[name].all():
      keep = jnp.asarray(masks[name], jnp.float32)
      block = _get(pure["backbone"], bn)
      block["scale"], block["bias"] = keep, keep
  nnx.replace_by_pure_dict(multipliers, pure)
  return multipliers


def pruned_counts(masks: dict[str, np.ndarray]) -> dict[str, int]:
  return {name: int((~np.asarray(keep)).sum()) for name, keep in masks.items()}


def select_masks(encoder: Encoder, rule: str, u: float, u_grid, acc_tol: float, score_fn, ddof: int = 1,
                 eps: float = 0.0):
  """-> (masks, chosen u, record). 'plain': CLP's threshold u. 'sweep': the smallest u of u_grid (the most
  pruning) whose score_fn(pruned encoder) >= score_fn(encoder) - acc_tol; none -> no pruning (u = inf).
  record: the base score and, per tried u, its score and total of pruned channels."""
  if rule not in RULES:
    raise ValueError(f"unknown channel-filter rule {rule!r}; use one of {RULES}")
  scores = layer_uclc(encoder, eps)
  if rule == "plain":
    masks = threshold_masks(scores, u, ddof)
    return masks, u, {"pruned_total": sum(pruned_counts(masks).values())}
  base = score_fn(encoder)
  record = {"base_score": base, "tried": []}
  for candidate in sorted(u_grid):
    masks = threshold_masks(scores, candidate, ddof)
    score = score_fn(apply_masks(encoder, masks))
    record["tried"].append({"u": candidate, "score": score, "pruned_total": sum(pruned_counts(masks).values())})
    if score >= base - acc_tol:
      return masks, candidate, record
  return threshold_masks(scores, math.inf, ddof), math.inf, record
