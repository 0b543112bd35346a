"""T-Core's selective encoder channel filtering, built on CLP (Zheng et al., ECCV 2022; tcore.md 4.3 and 5.3).

A channel's upper bound of the channel Lipschitz constant (UCLC) is the largest singular value of its conv
kernel scaled by its BatchNorm's |scale / std|. Backdoor channels are sensitive to a small trigger, so their
UCLC stands out in their layer: channels above mean + u * std of the layer are candidates, and pruning one sets
its BatchNorm scale and bias to 0. "Selective" (a reconstruction): the trusted data choose u, the most pruning
whose trusted-set score stays within a tolerance of the unpruned encoder's.

Masks are {layer name: keep bool [C]}, layer names as `conv_bn_layers` gives them ("stem", "stage1.block0.conv1",
"stage2.block0.shortcut", ...).
"""

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxpurify.encoders import Encoder

RULES = ("plain", "sweep")


def uclc(kernel: jax.Array, bn_scale: jax.Array, bn_var: jax.Array, eps: float = 1e-5) -> jax.Array:
  """kernel [kh, kw, C_in, C_out], BN scale and running variance [C_out] -> UCLC [C_out].

  Output channel k's UCLC is the largest singular value of kernel[..., k] as a [C_in, kh * kw] matrix (PyTorch's
  weight[k] flattened), times |scale_k / sqrt(var_k + eps)|. CLP's code uses no eps: pass eps=0.
  """
  kh, kw, cin, cout = kernel.shape
  per_channel = jnp.transpose(kernel, (3, 2, 0, 1)).reshape(cout, cin, kh * kw)
  sigma = jnp.linalg.svd(per_channel, compute_uv=False)[:, 0]
  return sigma * jnp.abs(bn_scale / jnp.sqrt(bn_var + eps))


def uclc_dense(kernel: jax.Array, bn_scale=None, bn_var=None, eps: float = 1e-5) -> jax.Array:
  """The linear-layer variant (ViT-style encoders, MLP heads): kernel [C_in, C_out] -> [C_out].

  Neuron k's score is the norm of its incoming weights kernel[:, k] (the largest singular value of a 1 x C_in
  matrix), times |scale_k / sqrt(var_k + eps)| when a BatchNorm (scale, var [C_out]) follows.
  """
  score = jnp.linalg.norm(kernel, axis=0)
  if bn_scale is not None:
    score = score * jnp.abs(bn_scale / jnp.sqrt(bn_var + eps))
  return score


class ConvBN(NamedTuple):
  """A conv followed by a BatchNorm: kernel [kh, kw, C_in, C_out]; the BN's scale and running var [C_out];
  bn_path, the BN's key path in the encoder's pure dicts (e.g. ('stages', 0, 1, 'bn2'))."""
  name: str
  kernel: jax.Array
  scale: jax.Array
  var: jax.Array
  bn_path: tuple


def _get(tree: dict, path: tuple):
  for key in path:
    tree = tree[key]
  return tree


def _pairs(params: dict) -> list[tuple[str, tuple, tuple]]:
  """A CIFAR ResNet's pure params -> [(layer name, conv path, BN path)] in forward order.

  Pairs by name: stem_conv -> stem_bn, convK -> bnK, shortcut[0] -> shortcut[1]; a BN without its conv raises.
  """
  if "stem_bn" not in params or "stages" not in params:
    raise ValueError(f"not a CIFAR ResNet (top-level params {sorted(map(str, params))})")
  pairs = [("stem", ("stem_conv",), ("stem_bn",))]
  for s, stage in sorted(params["stages"].items()):
    for b, block in sorted(stage.items()):
      at, prefix = ("stages", s, b), f"stage{s + 1}.block{b}"
      for bn in sorted((k for k in block if k.startswith("bn")), key=lambda k: int(k[2:])):
        pairs.append((f"{prefix}.conv{bn[2:]}", at + (f"conv{bn[2:]}",), at + (bn,)))
      if "shortcut" in block:
        pairs.append((f"{prefix}.shortcut", at + ("shortcut", 0), at + ("shortcut", 1)))
  for name, conv, bn in pairs:
    try:
      _get(params, conv)["kernel"]
    except (KeyError, TypeError):
      raise ValueError(f"BatchNorm {'.'.join(map(str, bn))} of layer {name} has no conv partner at "
                       f"{'.'.join(map(str, conv))}") from None
  return pairs


def conv_bn_layers(encoder: Encoder) -> list[ConvBN]:
  """Every conv followed by a BatchNorm in the encoder's ResNet, in forward order (stem, then each block's
  conv1..convN and its shortcut)."""
  params, stats = nnx.to_pure_dict(encoder.params), nnx.to_pure_dict(encoder.batch_stats)
  return [ConvBN(name, _get(params, conv)["kernel"], _get(params, bn)["scale"], _get(stats, bn)["var"], bn)
          for name, conv, bn in _pairs(params)]


def layer_uclc(encoder: Encoder, eps: float = 0.0) -> dict[str, np.ndarray]:
  """{layer name: UCLC [C]} over conv_bn_layers (eps 0: CLP's code)."""
  return {layer.name: np.asarray(uclc(layer.kernel, layer.scale, layer.var, eps)) for layer in conv_bn_layers(encoder)}


def threshold_masks(scores: dict[str, np.ndarray], u: float, ddof: int = 1) -> dict[str, np.ndarray]:
  """{layer: scores [C]} -> {layer: keep bool [C]}, False where a score exceeds mean + u * std of its layer (std
  with `ddof`; torch's default is 1). u = inf keeps every channel."""
  if math.isinf(u):
    return {name: np.ones(len(s), bool) for name, s in scores.items()}
  return {name: s <= s.mean() + u * s.std(ddof=ddof) for name, s in scores.items()}


def layer_masks(encoder: Encoder, u: float, ddof: int = 1, eps: float = 0.0) -> dict[str, np.ndarray]:
  """CLP's rule on every conv+BN layer of the encoder: {layer name: keep bool [C]}."""
  return threshold_masks(layer_uclc(encoder, eps), u, ddof)


def _checked(pairs, masks: dict[str, np.ndarray], params: dict) -> list[tuple[tuple, np.ndarray]]:
  """[(BN path, keep bool [C])] of the masked layers; unknown layer names or wrong lengths raise."""
  paths = {name: bn for name, _, bn in pairs}
  if unknown := sorted(set(masks) - set(paths)):
    raise ValueError(f"channel masks name unknown layers {unknown}")
  out = []
  for name, keep in masks.items():
    keep, want = np.asarray(keep, bool), np.shape(_get(params, paths[name])["scale"])
    if keep.shape != want:
      raise ValueError(f"channel mask of {name} has shape {keep.shape}, the layer {want}")
    out.append((paths[name], keep))
  return out


def apply_masks(encoder: Encoder, masks: dict[str, np.ndarray]) -> Encoder:
  """A new Encoder whose pruned channels (False in `masks`) have BatchNorm scale and bias 0; the input encoder
  is left untouched."""
  params = nnx.to_pure_dict(encoder.params)  # fresh dicts, so assigning into them leaves the input alone
  for bn_path, keep in _checked(_pairs(params), masks, params):
    bn = _get(params, bn_path)
    bn["scale"] = bn["scale"] * jnp.asarray(keep, bn["scale"].dtype)
    bn["bias"] = bn["bias"] * jnp.asarray(keep, bn["bias"].dtype)
  state = jax.tree.map(lambda x: x, encoder.params)  # new Variables
  nnx.replace_by_pure_dict(state, params)
  return Encoder(encoder.graphdef, state, encoder.batch_stats)


def classifier_param_mask(params, masks: dict[str, np.ndarray]):
  """A Classifier's params (nnx.State; the encoder under 'backbone') -> a tree of the same structure of float32
  multipliers: the keep mask [C] on the BatchNorm scale and bias of layers with pruned channels, 1.0 elsewhere.

  `jax.tree.map(lambda p, m: p * m, params, mask)` after every update keeps the pruned channels at 0.
  """
  multipliers = jax.tree.map(lambda _: jnp.ones((), jnp.float32), params)
  pure = nnx.to_pure_dict(multipliers)
  backbone = nnx.to_pure_dict(params["backbone"])
  for bn_path, keep in _checked(_pairs(backbone), masks, backbone):
    if not keep.all():
      bn = _get(pure["backbone"], bn_path)
      bn["scale"] = bn["bias"] = jnp.asarray(keep, jnp.float32)
  nnx.replace_by_pure_dict(multipliers, pure)
  return multipliers


def pruned_counts(masks: dict[str, np.ndarray]) -> dict[str, int]:
  """{layer: number of pruned channels}."""
  return {name: int((~np.asarray(keep, bool)).sum()) for name, keep in masks.items()}


def select_masks(encoder: Encoder, rule: str, u: float, u_grid, acc_tol: float, score_fn, ddof: int = 1,
                 eps: float = 0.0):
  """-> (masks, chosen u, record).

  'plain': CLP's threshold u. 'sweep': the smallest u of u_grid (the most pruning) whose
  score_fn(pruned encoder) >= score_fn(encoder) - acc_tol; none -> no pruning (u = inf). score_fn maps an Encoder
  to a float, higher is better (e.g. a trusted-set accuracy). record: the pruned total for 'plain'; for 'sweep'
  the base score and, per tried u, its score and pruned total.
  """
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
