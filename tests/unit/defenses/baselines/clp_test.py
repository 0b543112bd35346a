"""CLP (channel Lipschitzness pruning, data-free): the pruned channels against a NumPy SVD reference per layer, the
classifier it returns (head untouched, exactly the masked BatchNorm scale and bias zeroed, the same twice), u = inf
and bad input."""

import math

import jax
import ml_collections
import numpy as np
import pytest
from flax import nnx

from helpers import config as load_config
from helpers import feature_inputs
from jaxpurify import finetune
from jaxpurify.defenses.baselines import clp
from jaxpurify.encoders import Encoder, build_backbone
from jaxpurify.errors import UserError
from jaxpurify.train.state import create_state, make_optimizer

MODEL = ml_collections.ConfigDict(dict(name="resnet10", width=4, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25),
                                       dtype="float32"))
HEAD = ml_collections.ConfigDict(dict(hidden=(16, 8), dropout=0.0))
# Width-4 resnet10, written out by hand: layer name -> (conv path, BatchNorm path) in the encoder's pure dicts.
LAYERS = {"stem": (("stem_conv",), ("stem_bn",))}
for _s in range(4):
  _at = ("stages", _s, 0)
  LAYERS.update({f"stage{_s + 1}.block0.conv1": (_at + ("conv1",), _at + ("bn1",)),
                 f"stage{_s + 1}.block0.conv2": (_at + ("conv2",), _at + ("bn2",))})
  if _s:
    LAYERS[f"stage{_s + 1}.block0.shortcut"] = (_at + ("shortcut", 0), _at + ("shortcut", 1))


def _get(tree, path):
  for key in path:
    tree = tree[key]
  return tree


def _encoder() -> Encoder:
  """A width-4 resnet10 with random kernels, BatchNorm scales spread over a decade (some channels stand out in their
  layer), non-zero biases and running variances away from 1."""
  encoder, rng = build_backbone(MODEL, 0), np.random.default_rng(3)

  def draw(path, x):
    shape, key = x.shape, path[-1].key
    draws = {"kernel": lambda: rng.normal(size=shape), "scale": lambda: rng.lognormal(0.0, 0.8, shape),
             "bias": lambda: rng.normal(size=shape), "var": lambda: rng.uniform(0.2, 3.0, shape)}
    return np.asarray(draws[key](), np.float32) if key in draws else x

  params = jax.tree.map(lambda x: x, encoder.params)
  stats = jax.tree.map(lambda x: x, encoder.batch_stats)
  nnx.replace_by_pure_dict(params, jax.tree_util.tree_map_with_path(draw, nnx.to_pure_dict(encoder.params)))
  nnx.replace_by_pure_dict(stats, jax.tree_util.tree_map_with_path(draw, nnx.to_pure_dict(encoder.batch_stats)))
  return Encoder(encoder.graphdef, params, stats)


def _reference_masks(encoder: Encoder, u: float, ddof: int = 1) -> dict[str, np.ndarray]:
  """CLP_prune in NumPy: per output channel k the top singular value of the PyTorch-layout weight[k] [C_in, kh*kw]
  times |scale_k / sqrt(var_k)|, pruned above mean + u * std of its layer."""
  params, stats = nnx.to_pure_dict(encoder.params), nnx.to_pure_dict(encoder.batch_stats)
  masks = {}
  for name, (conv, bn) in LAYERS.items():
    kernel = np.asarray(_get(params, conv)["kernel"], np.float64)  # [kh, kw, C_in, C_out]
    weight = np.transpose(kernel, (3, 2, 0, 1))  # torch's [C_out, C_in, kh, kw]
    scale = np.asarray(_get(params, bn)["scale"], np.float64)
    std = np.sqrt(np.asarray(_get(stats, bn)["var"], np.float64))
    lips = np.array([np.linalg.svd(w.reshape(w.shape[0], -1), compute_uv=False)[0] for w in weight])
    lips *= np.abs(scale / std)
    masks[name] = lips <= lips.mean() + u * lips.std(ddof=ddof)
  return masks


def _inputs(encoder: Encoder):
  """Inputs whose undefended model is a classifier (random head) on `encoder`."""
  tx = make_optimizer(ml_collections.ConfigDict(dict(name="sgd", lr=0.1, momentum=0.0, weight_decay=0.0)))
  mesh = jax.make_mesh((1,), ("data",), devices=jax.devices()[:1])
  model = create_state(lambda: finetune.build_classifier(encoder, 3, HEAD, 0), tx, mesh)
  return feature_inputs(np.zeros((1, 4), np.float32), np.zeros(1, np.int64), 3)._replace(model=model)


def _block(u: float):
  block = load_config("baseline:defense=clp,tiny").baseline.clp
  block.u = u
  return block


def test_pruned_channels_are_those_above_mean_plus_u_std_of_a_numpy_svd():
  encoder = _encoder()
  inputs = _inputs(encoder)
  want = _reference_masks(encoder, 1.5)
  _, state, diagnostics = clp.train(inputs, _block(1.5), run=None)
  assert diagnostics == {"pruned": {name: int((~keep).sum()) for name, keep in want.items()}, "u": 1.5}
  assert 0 < sum(diagnostics["pruned"].values()) and 0 in diagnostics["pruned"].values()  # a real choice
  pure = nnx.to_pure_dict(state.params)["backbone"]
  for name, (_, bn) in LAYERS.items():
    scale = np.asarray(_get(pure, bn)["scale"])
    np.testing.assert_array_equal(scale != 0, want[name], err_msg=name)
  # u = 3 (the default) on the same weights: the rule with torch's ddof 1, not NumPy's default 0
  _, _, diagnostics = clp.train(inputs, _block(3.0), run=None)
  assert diagnostics["pruned"] == {name: int((~keep).sum()) for name, keep in _reference_masks(encoder, 3.0).items()}


def test_the_classifier_keeps_its_head_and_loses_exactly_the_masked_bn_scale_and_bias():
  encoder = _encoder()
  inputs = _inputs(encoder)
  graphdef, undefended = inputs.model
  want = _reference_masks(encoder, 1.5)
  out_graphdef, state, _ = clp.train(inputs, _block(1.5), run=None)
  assert out_graphdef is graphdef
  before, after = nnx.to_pure_dict(undefended.params), nnx.to_pure_dict(state.params)
  expected = jax.tree.map(np.array, before)
  for name, (_, bn) in LAYERS.items():
    layer = _get(expected["backbone"], bn)
    layer["scale"][~want[name]] = layer["bias"][~want[name]] = 0
  jax.tree.map(np.testing.assert_array_equal, after, expected)  # the head's arrays included, unchanged
  jax.tree.map(np.testing.assert_array_equal, nnx.to_pure_dict(state.batch_stats),
               nnx.to_pure_dict(undefended.batch_stats))
  _, again, _ = clp.train(inputs, _block(1.5), run=None)  # deterministic
  jax.tree.map(np.testing.assert_array_equal, nnx.to_pure_dict(again.params), after)


def test_u_inf_prunes_nothing():
  inputs = _inputs(_encoder())
  _, state, diagnostics = clp.train(inputs, _block(math.inf), run=None)
  assert set(diagnostics["pruned"]) == set(LAYERS) and not any(diagnostics["pruned"].values())
  jax.tree.map(np.testing.assert_array_equal, nnx.to_pure_dict(state.params),
               nnx.to_pure_dict(inputs.model[1].params))


@pytest.mark.parametrize("field, value, message", [("u", -0.5, "u is -0.5; set it to 0 or more"),
                                                   ("u", math.nan, "u is nan; set it to 0 or more"),
                                                   ("std_ddof", 2, "std_ddof is 2; set it to 1"),
                                                   ("bn_eps", -1e-5, "bn_eps is -1e-05; set it to 0")])
def test_bad_settings_fail_in_one_line(field, value, message):
  config = load_config("baseline:defense=clp,tiny")
  block = config.baseline.clp
  clp.check(block, config, np.full(10, 100), np.full(10, 5))
  block[field] = value
  with pytest.raises(UserError, match=message) as err:
    clp.check(block, config, np.full(10, 100), np.full(10, 5))
  assert "\n" not in str(err.value)
