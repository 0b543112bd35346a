"""T-Core's selective encoder channel filtering, built on CLP (Zheng et al., ECCV 2022; tcore.md 4.3 and 5.3).

A channel's upper bound of the channel Lipschitz constant (UCLC) is the largest singular value of its conv
kernel scaled by its BatchNorm's |scale / std|. Backdoor channels are sensitive to a small trigger, so their
UCLC stands out in their layer: channels above mean + u * std of the layer are candidates, and pruning one sets
its BatchNorm scale and bias to 0. "Selective" (a reconstruction): the trusted data choose u, the most pruning
whose trusted-set score stays within a tolerance of the unpruned encoder's.

The prunable layers are the encoder's to say (`prunable_layers`, one `Prunable` record each): a ResNet's convs
followed by a BatchNorm (`conv_bn_pairs`; pruned through the BatchNorm's scale and bias), a ViT's MLP hidden units
(`mlp_units`; scored on fc1's kernel with the LayerNorm scale before it folded in, pruned through fc1's kernel
column and bias: GELU(0) = 0, so the unit adds nothing to fc2). Masks are {layer name: keep bool [C]}, layer names
as the encoder gives them ("stem", "stage1.block0.conv1", "stage2.block0.shortcut", ...; "block1.mlp", ...).
"""

import functools
import math
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxpurify.defenses.tcore import sift
from jaxpurify.encoders import Encoder
from jaxpurify.errors import moved

RULES = ("plain", "sweep")
__getattr__ = moved(__name__, {"classifier_param_mask": "jaxpurify.defenses.tcore.channels.param_mask (over the "
                                                          "encoder's params) with jaxpurify.finetune.classifier_mask"})


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
  """The linear-layer variant (MLP heads, a ViT's MLPs through `mlp_uclc`): kernel [C_in, C_out] -> [C_out].

  Neuron k's score is the norm of its incoming weights kernel[:, k] (the largest singular value of a 1 x C_in
  matrix), times |scale_k / sqrt(var_k + eps)| when a BatchNorm (scale, var [C_out]) follows.
  """
  score = jnp.linalg.norm(kernel, axis=0)
  if bn_scale is not None:
    score = score * jnp.abs(bn_scale / jnp.sqrt(bn_var + eps))
  return score


def mlp_uclc(kernel: jax.Array, ln_scale: jax.Array) -> jax.Array:
  """A pre-norm MLP's hidden units: fc1 kernel W [D, H] and the scale γ [D] of the LayerNorm before it -> [H].

  fc1(LN(x)) = (γ ⊙ x̂) W + (β W + b) with x̂ the normalised input, so the linear map acting on x̂ is diag(γ) W and
  unit k's score is ‖γ ⊙ W[:, k]‖₂ (`uclc_dense` of diag(γ) W; β and b shift, they do not scale).
  """
  return uclc_dense(ln_scale[:, None] * kernel)


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


def _pairs(encoder: Encoder, params: dict) -> list[tuple[str, tuple, tuple]]:
  """[(layer name, conv path, BN path)] in forward order, as the encoder's module names them (`conv_bn_pairs`);
  a BN whose conv is missing from `params` (the encoder's pure params) raises."""
  model = nnx.merge(encoder.graphdef, encoder.params, encoder.batch_stats)
  if not hasattr(model, "conv_bn_pairs"):
    raise ValueError(f"{type(model).__name__} names no conv+BatchNorm pairs (conv_bn_pairs); UCLC needs them")
  pairs = model.conv_bn_pairs()
  for name, conv, bn in pairs:
    try:
      _get(params, conv)["kernel"]
    except (KeyError, TypeError):
      raise ValueError(f"BatchNorm {'.'.join(map(str, bn))} of layer {name} has no conv partner at "
                       f"{'.'.join(map(str, conv))}") from None
  return pairs


def conv_bn_layers(encoder: Encoder) -> list[ConvBN]:
  """Every conv followed by a BatchNorm in the encoder, in forward order (a ResNet: the stem, then each block's
  conv1..convN and its shortcut)."""
  params, stats = nnx.to_pure_dict(encoder.params), nnx.to_pure_dict(encoder.batch_stats)
  return [ConvBN(name, _get(params, conv)["kernel"], _get(params, bn)["scale"], _get(stats, bn)["var"], bn)
          for name, conv, bn in _pairs(encoder, params)]


class Prunable(NamedTuple):
  """A layer of prunable units. leaves: key paths, into the encoder's pure params, of the arrays whose last axis
  indexes the units (pruning unit k zeroes [..., k] of each); score: () -> UCLC [C], computed when called."""
  name: str
  leaves: tuple[tuple, ...]
  score: Callable[[], jax.Array]


def prunable_layers(encoder: Encoder, eps: float = 0.0) -> list[Prunable]:
  """The encoder's prunable layers in forward order: a ResNet's conv+BN layers (`conv_bn_layers`: BatchNorm scale
  and bias; `uclc` with BatchNorm eps `eps`), a ViT's MLP hidden layers (`mlp_units`: fc1's kernel columns and
  bias; `mlp_uclc`, no eps)."""
  model = nnx.merge(encoder.graphdef, encoder.params, encoder.batch_stats)
  if hasattr(model, "conv_bn_pairs"):
    return [Prunable(layer.name, (layer.bn_path + ("scale",), layer.bn_path + ("bias",)),
                     functools.partial(uclc, layer.kernel, layer.scale, layer.var, eps))
            for layer in conv_bn_layers(encoder)]
  if hasattr(model, "mlp_units"):
    params = nnx.to_pure_dict(encoder.params)
    return [Prunable(name, (fc1 + ("kernel",), fc1 + ("bias",)),
                     functools.partial(mlp_uclc, _get(params, fc1)["kernel"], _get(params, norm)["scale"]))
            for name, fc1, norm in model.mlp_units()]
  raise ValueError(f"{type(model).__name__} names no prunable units (conv_bn_pairs or mlp_units); UCLC needs them")


def layer_uclc(encoder: Encoder, eps: float = 0.0) -> dict[str, np.ndarray]:
  """{layer name: UCLC [C]} over prunable_layers (eps 0: CLP's code)."""
  return {layer.name: np.asarray(layer.score()) for layer in prunable_layers(encoder, eps)}


def threshold_masks(scores: dict[str, np.ndarray], u: float, ddof: int = 1) -> dict[str, np.ndarray]:
  """{layer: scores [C]} -> {layer: keep bool [C]}, False where a score exceeds mean + u * std of its layer (std
  with `ddof`; torch's default is 1). u = inf keeps every channel."""
  if math.isinf(u):
    return {name: np.ones(len(s), bool) for name, s in scores.items()}
  return {name: s <= s.mean() + u * s.std(ddof=ddof) for name, s in scores.items()}


def layer_masks(encoder: Encoder, u: float, ddof: int = 1, eps: float = 0.0) -> dict[str, np.ndarray]:
  """CLP's rule on every prunable layer of the encoder: {layer name: keep bool [C]}."""
  return threshold_masks(layer_uclc(encoder, eps), u, ddof)


def _checked(encoder: Encoder, masks: dict[str, np.ndarray], params: dict) -> list[tuple[tuple, np.ndarray]]:
  """[(leaf paths, keep bool [C])] of the masked layers; unknown layer names or wrong lengths raise."""
  layers = {layer.name: layer.leaves for layer in prunable_layers(encoder)}
  if unknown := sorted(set(masks) - set(layers)):
    raise ValueError(f"channel masks name unknown layers {unknown}")
  out = []
  for name, keep in masks.items():
    keep, want = np.asarray(keep, bool), np.shape(_get(params, layers[name][0]))[-1:]
    if keep.shape != want:
      raise ValueError(f"channel mask of {name} has shape {keep.shape}, the layer {want}")
    out.append((layers[name], keep))
  return out


def apply_masks(encoder: Encoder, masks: dict[str, np.ndarray]) -> Encoder:
  """A new Encoder whose pruned units (False in `masks`) are zeroed in their layer's leaves (a conv+BN: BatchNorm
  scale and bias; a ViT MLP: fc1's kernel column and bias); the input encoder is left untouched."""
  params = nnx.to_pure_dict(encoder.params)  # fresh dicts, so assigning into them leaves the input alone
  for leaves, keep in _checked(encoder, masks, params):
    for path in leaves:
      parent = _get(params, path[:-1])
      parent[path[-1]] = parent[path[-1]] * jnp.asarray(keep, parent[path[-1]].dtype)
  state = jax.tree.map(lambda x: x, encoder.params)  # new Variables
  nnx.replace_by_pure_dict(state, params)
  return Encoder(encoder.graphdef, state, encoder.batch_stats)


def param_mask(encoder: Encoder, masks: dict[str, np.ndarray]):
  """-> a tree like encoder.params of float32 multipliers: the keep mask [C] on the leaves of layers with pruned
  units (broadcast along their last axis), 1.0 elsewhere. Multiplying the params by it after every update keeps
  the pruned units at 0 (`finetune.finetune_training(..., encoder_mask=...)`)."""
  multipliers = jax.tree.map(lambda _: jnp.ones((), jnp.float32), encoder.params)
  pure, params = nnx.to_pure_dict(multipliers), nnx.to_pure_dict(encoder.params)
  for leaves, keep in _checked(encoder, masks, params):
    if not keep.all():
      for path in leaves:
        _get(pure, path[:-1])[path[-1]] = jnp.asarray(keep, jnp.float32)
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


def filter_stage(run, config, encoder: Encoder, images, labels, trusted: np.ndarray, mesh):
  """Stage tcore_filter: the unit masks of the encoder's prunable layers -> ({layer: keep bool [C]}, record)."""
  if (record := run.done("tcore_filter")) is not None:
    return {k: np.array(v, bool) for k, v in record["masks"].items()}, record
  f = config.tcore.filter
  trusted_labels = labels[trusted]

  def trusted_accuracy(candidate: Encoder) -> float:
    """Leave-one-out 1-nearest-neighbour accuracy of the trusted set on the final features."""
    features, = sift.depth_features(candidate, config.model, images[trusted], config.evaluate.batch_size, mesh,
                                    ("pooled",))
    rank, _ = sift.neighbour_ranks(features, trusted_labels, config.tcore.sift.chunk_rows)
    return float(np.mean(np.asarray(rank) == 1))

  masks, chosen_u, sweep = select_masks(encoder, f.rule, f.u, tuple(f.u_grid), f.acc_tol,
                                                 trusted_accuracy, f.std_ddof, f.bn_eps)
  record = {"u": chosen_u, "rule": f.rule, "pruned": pruned_counts(masks), "sweep": sweep,
            "masks": {k: np.asarray(v).tolist() for k, v in masks.items()}}
  run.finish("tcore_filter", record)
  return masks, record
