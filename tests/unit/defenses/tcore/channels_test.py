"""Channel filtering: UCLC against NumPy and by hand, the ResNet's conv+BN pairs, CLP's threshold on an encoder
whose UCLCs are known by hand, masks applied to the encoder and kept through training, and the trusted sweep."""

import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from jaxpurify import finetune
from jaxpurify.defenses.tcore import channels
from jaxpurify.encoders import Encoder, build_backbone, encode_fn
from jaxpurify.models import ResNet

MODEL = ml_collections.ConfigDict(dict(name="resnet18", width=4, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25),
                                       dtype="float32"))
HEAD = ml_collections.ConfigDict(dict(hidden=(16, 8), dropout=0.0))
TARGET = "stage4.block1.conv2"  # its BatchNorm is params['stages'][3][1]['bn2'], 32 channels
# Width-4 resnet18 in forward order: (name, kernel shape).
LAYERS = [("stem", (3, 3, 3, 4))]
for _s, (_cin, _c) in enumerate([(4, 4), (4, 8), (8, 16), (16, 32)]):
  LAYERS += [(f"stage{_s + 1}.block0.conv1", (3, 3, _cin, _c)), (f"stage{_s + 1}.block0.conv2", (3, 3, _c, _c))]
  LAYERS += [(f"stage{_s + 1}.block0.shortcut", (1, 1, _cin, _c))] if _s else []
  LAYERS += [(f"stage{_s + 1}.block1.conv1", (3, 3, _c, _c)), (f"stage{_s + 1}.block1.conv2", (3, 3, _c, _c))]


def _numpy_uclc(kernel, scale, var, eps):
  kh, kw, cin, cout = kernel.shape
  return np.array([np.linalg.svd(kernel[..., k].reshape(kh * kw, cin).T, compute_uv=False)[0]
                   * abs(scale[k] / np.sqrt(var[k] + eps)) for k in range(cout)])


@pytest.mark.parametrize("eps", [1e-5, 0.0])
def test_uclc_equals_a_numpy_svd_per_output_channel(eps):
  rng = np.random.default_rng(0)
  kernel = rng.normal(size=(3, 2, 5, 7)).astype(np.float32)
  scale, var = rng.normal(size=7).astype(np.float32), rng.uniform(1e-5, 2, 7).astype(np.float32)
  want = _numpy_uclc(kernel, scale, var, eps)
  np.testing.assert_allclose(channels.uclc(kernel, scale, var, eps=eps), want, rtol=1e-5)
  np.testing.assert_allclose(jax.jit(channels.uclc)(kernel, scale, var, eps), want, rtol=1e-5)


def test_uclc_of_a_rank_one_kernel_is_the_product_of_norms():
  # kernel[i, j, c, 0] = spatial[i, j] * channel[c]: as a [C_in, kh*kw] matrix it is the rank-1 outer(channel,
  # spatial), so sigma_max = |channel| * |spatial| = 5 * sqrt(5). Flattening [kh, kw, C_in] straight into
  # [C_in, kh*kw] would give [[3, 4, 0, 0], [0, 0, 6, 8]], whose sigma_max is 10.
  spatial, channel = np.array([[1.0, 0.0], [0.0, 2.0]]), np.array([3.0, 4.0])
  kernel = (spatial[:, :, None] * channel)[..., None].astype(np.float32)
  np.testing.assert_allclose(np.linalg.svd(kernel[..., 0].reshape(2, 4), compute_uv=False)[0], 10.0, rtol=1e-6)
  # BN factor |-2 / sqrt(4)| = 1 without eps; with eps = 12: |-2 / sqrt(16)| = 0.5.
  np.testing.assert_allclose(channels.uclc(kernel, jnp.array([-2.0]), jnp.array([4.0]), eps=0.0),
                             [5 * np.sqrt(5)], rtol=1e-6)
  np.testing.assert_allclose(channels.uclc(kernel, jnp.array([-2.0]), jnp.array([4.0]), eps=12.0),
                             [2.5 * np.sqrt(5)], rtol=1e-6)


def test_uclc_dense_is_the_incoming_weight_norm_times_the_bn_factor():
  kernel = np.array([[3.0, 0.0], [4.0, 1.0]], np.float32)
  np.testing.assert_allclose(channels.uclc_dense(kernel), [5.0, 1.0])
  np.testing.assert_allclose(channels.uclc_dense(kernel, jnp.array([1.0, -3.0]), jnp.array([3.0, 8.0]), eps=1.0),
                             [2.5, 1.0])
  rng = np.random.default_rng(1)
  kernel = rng.normal(size=(6, 5)).astype(np.float32)
  scale, var = rng.normal(size=5).astype(np.float32), rng.uniform(0.1, 2, 5).astype(np.float32)
  want = _numpy_uclc(kernel.reshape(1, 1, 6, 5), scale, var, 1e-5)  # a 1x1 conv is a dense layer
  np.testing.assert_allclose(channels.uclc_dense(kernel, scale, var), want, rtol=1e-5)


def test_the_resnet_has_twenty_conv_bn_pairs_in_forward_order():
  encoder = build_backbone(MODEL, 0)
  layers = channels.conv_bn_layers(encoder)
  assert [(layer.name, layer.kernel.shape) for layer in layers] == LAYERS
  assert all(layer.scale.shape == layer.var.shape == layer.kernel.shape[-1:] for layer in layers)
  # Against the module itself: the pairs are the convs and BatchNorms the forward applies one after the other.
  model = nnx.merge(encoder.graphdef, encoder.params, encoder.batch_stats)
  block = model.stages[1][0]
  for layer, (conv, bn) in [(layers[0], (model.stem_conv, model.stem_bn)), (layers[5], (block.conv1, block.bn1)),
                            (layers[7], (block.shortcut[0], block.shortcut[1]))]:
    np.testing.assert_array_equal(layer.kernel, conv.kernel[...])
    np.testing.assert_array_equal(layer.scale, bn.scale[...])
    np.testing.assert_array_equal(layer.var, bn.var[...])
  assert layers[7].bn_path == ("stages", 1, 0, "shortcut", 1)


def test_a_pair_whose_conv_is_missing_and_an_encoder_without_pairs_are_refused(monkeypatch):
  encoder = build_backbone(MODEL, 0)
  pairs = ResNet.conv_bn_pairs
  monkeypatch.setattr(ResNet, "conv_bn_pairs", lambda self: pairs(self) + [("extra", ("stages", 2, 1, "conv9"),
                                                                             ("stages", 2, 1, "bn2"))])
  with pytest.raises(ValueError, match="stages.2.1.bn2 of layer extra has no conv partner at stages.2.1.conv9"):
    channels.conv_bn_layers(encoder)
  monkeypatch.delattr(ResNet, "conv_bn_pairs")
  with pytest.raises(ValueError, match="ResNet names no conv\+BatchNorm pairs"):
    channels.conv_bn_layers(encoder)


def _crafted() -> Encoder:
  """A width-4 resnet18 whose UCLCs are known by hand: kernels of ones and running variances of ones, so that
  UCLC_k = sqrt(C_in * kh * kw) * scale_k (eps 0); scales alternate 1, 1.1 (every channel within 1 std of its
  layer), except the stem's [1, 1, 1, 2] and channel 5 of TARGET at 100."""
  encoder = build_backbone(MODEL, 0)

  def pick(path, x):
    return {"kernel": np.ones_like(x), "scale": 1.0 + 0.1 * (np.arange(len(x)) % 2), "var": np.ones_like(x)}.get(
        path[-1].key, x)

  params = jax.tree_util.tree_map_with_path(pick, nnx.to_pure_dict(encoder.params))
  stats = jax.tree_util.tree_map_with_path(pick, nnx.to_pure_dict(encoder.batch_stats))
  params["stem_bn"]["scale"] = np.array([1.0, 1.0, 1.0, 2.0])
  params["stages"][3][1]["bn2"]["scale"][5] = 100.0
  states = jax.tree.map(lambda x: x, (encoder.params, encoder.batch_stats))
  for state, pure in zip(states, (params, stats)):
    nnx.replace_by_pure_dict(state, jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), pure))
  return Encoder(encoder.graphdef, *states)


def test_clp_prunes_exactly_the_outlier_and_ddof_matters():
  encoder = _crafted()
  scores = channels.layer_uclc(encoder)
  np.testing.assert_allclose(scores["stem"], np.sqrt(27) * np.array([1, 1, 1, 2]), rtol=1e-5)
  np.testing.assert_allclose(scores["stage2.block0.shortcut"], 2 * np.array([1, 1.1] * 4), rtol=1e-5)
  np.testing.assert_allclose(scores[TARGET][4:8], np.sqrt(32 * 9) * np.array([1, 100, 1, 1.1]), rtol=1e-5)
  pruned = lambda masks: {k: v for k, v in channels.pruned_counts(masks).items() if v}
  masks = channels.layer_masks(encoder, 3.0)
  assert pruned(masks) == {TARGET: 1} and not masks[TARGET][5]
  assert set(masks) == {name for name, _ in LAYERS}
  assert pruned(channels.layer_masks(encoder, math.inf)) == {}
  # The stem's [1, 1, 1, 2]: channel 3 is sqrt(3) = 1.73 std (ddof 0) or 1.5 std (ddof 1) above the mean.
  assert pruned(channels.layer_masks(encoder, 1.6, ddof=0)) == {"stem": 1, TARGET: 1}
  assert pruned(channels.layer_masks(encoder, 1.6, ddof=1)) == {TARGET: 1}


def _jittered() -> Encoder:
  """A width-4 resnet18 with every parameter and running statistic moved off its init (biases non-zero)."""
  encoder, rng = build_backbone(MODEL, 0), np.random.default_rng(2)
  shift = lambda x: x + rng.uniform(0.1, 0.5, x.shape).astype(np.float32)
  return encoder._replace(params=jax.tree.map(shift, encoder.params),
                          batch_stats=jax.tree.map(shift, encoder.batch_stats))


def _some_masks():
  masks = {name: np.ones(shape[-1], bool) for name, shape in LAYERS}
  masks[TARGET][[1, 5]] = False
  masks["stem"][0] = False
  return masks


def test_apply_masks_zeroes_exactly_the_pruned_scale_and_bias_and_leaves_the_input_alone():
  encoder = _jittered()
  pure = lambda e: (nnx.to_pure_dict(e.params), nnx.to_pure_dict(e.batch_stats))
  before = jax.tree.map(np.array, pure(encoder))
  pruned = channels.apply_masks(encoder, _some_masks())
  want = jax.tree.map(np.array, before[0])
  for bn, idx in ((want["stages"][3][1]["bn2"], [1, 5]), (want["stem_bn"], [0])):
    bn["scale"][idx] = bn["bias"][idx] = 0
  jax.tree.map(np.testing.assert_array_equal, pure(pruned), (want, before[1]))
  jax.tree.map(np.testing.assert_array_equal, pure(encoder), before)
  with pytest.raises(ValueError, match="unknown layers"):
    channels.apply_masks(encoder, {"stage9.block0.conv1": np.ones(4, bool)})


def test_the_masked_forward_equals_bn_params_zeroed_by_hand():
  encoder = _jittered()
  by_hand = jax.tree.map(np.array, nnx.to_pure_dict(encoder.params))
  by_hand["stages"][3][1]["bn2"]["scale"][[1, 5]] = by_hand["stages"][3][1]["bn2"]["bias"][[1, 5]] = 0
  by_hand["stem_bn"]["scale"][0] = by_hand["stem_bn"]["bias"][0] = 0
  reference = jax.tree.map(lambda x: x, encoder.params)
  nnx.replace_by_pure_dict(reference, by_hand)
  images = np.random.default_rng(0).integers(0, 256, (4, 8, 8, 3), dtype=np.uint8)
  masked = encode_fn(channels.apply_masks(encoder, _some_masks()), MODEL)(images)
  np.testing.assert_allclose(masked, encode_fn(encoder._replace(params=reference), MODEL)(images), atol=1e-6)
  assert np.abs(masked - encode_fn(encoder, MODEL)(images)).max() > 1e-3


def test_param_mask_keeps_pruned_channels_of_a_classifier_at_zero():
  encoder = _jittered()
  _, params, _ = nnx.split(finetune.build_classifier(encoder, 3, HEAD, 0), nnx.Param, nnx.BatchStat)
  encoder_mask = channels.param_mask(encoder, _some_masks())
  assert jax.tree.structure(encoder_mask) == jax.tree.structure(encoder.params)
  multipliers = finetune.classifier_mask(params, encoder_mask)
  assert jax.tree.structure(multipliers) == jax.tree.structure(params)
  assert all(m.dtype == jnp.float32 for m in jax.tree.leaves(multipliers))
  revived = jax.tree.map(lambda p: p + 1.0, params)  # as after an update that moved every parameter
  out = jax.jit(lambda p, m: jax.tree.map(lambda a, b: a * b, p, m))(revived, multipliers)
  want = jax.tree.map(np.array, nnx.to_pure_dict(revived))
  for bn, idx in ((want["backbone"]["stages"][3][1]["bn2"], [1, 5]), (want["backbone"]["stem_bn"], [0])):
    bn["scale"][idx] = bn["bias"][idx] = 0
  jax.tree.map(np.testing.assert_array_equal, nnx.to_pure_dict(out), want)


def _zero_scales(encoder: Encoder) -> int:
  params = nnx.to_pure_dict(encoder.params)
  return sum(int((np.asarray(leaf) == 0).sum()) for path, leaf in jax.tree_util.tree_leaves_with_path(params)
             if path[-1].key == "scale")


def test_sweep_takes_the_most_pruning_within_tolerance():
  # On the crafted encoder (ddof 1), u = 0.5 prunes the stem's 2, TARGET's 100 and the 1.1 half of the 18 other
  # layers; u = 1.6 and u = 3 prune TARGET's 100 alone; inf nothing. Each pruned channel costs 0.01 of score.
  encoder = _crafted()
  many = 1 + 1 + 4 * 4 // 2 + 5 * 8 // 2 + 5 * 16 // 2 + 4 * 32 // 2  # 134
  score = {0: 1.0, 1: 0.99, many: 0.5}
  score_fn = lambda e: score[_zero_scales(e)]
  grid = (3.0, math.inf, 0.5, 1.6)  # tried in increasing order
  masks, u, record = channels.select_masks(encoder, "sweep", 3.0, grid, 0.015, score_fn)
  assert u == 1.6 and channels.pruned_counts(masks)[TARGET] == 1 and not masks[TARGET][5]
  assert record == {"base_score": 1.0, "tried": [{"u": 0.5, "score": 0.5, "pruned_total": many},
                                                 {"u": 1.6, "score": 0.99, "pruned_total": 1}]}
  masks, u, record = channels.select_masks(encoder, "sweep", 3.0, grid, 0.005, score_fn)
  assert u == math.inf and all(m.all() for m in masks.values()) and len(record["tried"]) == 4
  masks, u, record = channels.select_masks(encoder, "sweep", 3.0, (0.5, 3.0), 0.005, score_fn)
  assert u == math.inf and all(m.all() for m in masks.values()) and len(record["tried"]) == 2


def test_plain_is_clps_rule_and_unknown_rules_are_refused():
  encoder = _crafted()
  masks, u, record = channels.select_masks(encoder, "plain", 1.6, (), 0.0, None, ddof=0)
  want = channels.layer_masks(encoder, 1.6, ddof=0)
  assert u == 1.6 and record == {"pruned_total": 2} and masks.keys() == want.keys()
  assert all((masks[k] == want[k]).all() for k in want)
  with pytest.raises(ValueError, match="unknown channel-filter rule"):
    channels.select_masks(encoder, "per_channel_trusted", 3.0, (), 0.0, None)
