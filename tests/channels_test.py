"""Channel filtering: UCLC against NumPy and by hand, CLP's threshold, masks applied to the encoder and kept
through training, and the trusted-data sweep."""

import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from jaxpurify import defenses, finetune
from jaxpurify.defenses import channels
from jaxpurify.encoders import build_backbone, encode_fn

MODEL = ml_collections.ConfigDict(dict(name="resnet18", width=4, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25)))
HEAD = ml_collections.ConfigDict(dict(hidden=(16, 8), dropout=0.0))


@pytest.mark.parametrize("eps", [1e-5, 0.0])
def test_uclc_equals_a_numpy_svd_per_output_channel(eps):
  rng = np.random.default_rng(0)
  kernel = rng.normal(size=(3, 3, 5, 7)).astype(np.float32)
  scale, var = rng.normal(size=7).astype(np.float32), rng.uniform(0.1, 2, 7).astype(np.float32)
  want = [np.linalg.svd(kernel[..., k].reshape(9, 5).T, compute_uv=False)[0] * abs(scale[k] / np.sqrt(var[k] + eps))
          for k in range(7)]
  np.testing.assert_allclose(defenses.uclc(kernel, scale, var, eps=eps), want, rtol=1e-5)


def test_uclc_of_a_rank_one_kernel_is_the_product_of_norms():
  # kernel[..., 0] = outer(spatial, channel): as a [C_in, kh*kw] matrix, sigma_max = |channel| * |spatial|.
  spatial, channel = np.arange(1.0, 5.0).reshape(2, 2), np.array([3.0, 4.0])
  kernel = (spatial[:, :, None] * channel[None, None, :])[..., None].astype(np.float32)
  out = channels.uclc(kernel, jnp.array([-2.0]), jnp.array([4.0]), eps=0.0)
  np.testing.assert_allclose(out, [5.0 * np.sqrt(30.0) * 1.0], rtol=1e-5)  # |-2 / sqrt(4)| = 1


def test_uclc_dense_is_the_incoming_weight_norm_times_the_bn_factor():
  kernel = np.array([[3.0, 0.0], [4.0, 1.0]], np.float32)
  np.testing.assert_allclose(channels.uclc_dense(kernel), [5.0, 1.0])
  np.testing.assert_allclose(channels.uclc_dense(kernel, jnp.array([1.0, 3.0]), jnp.array([3.0, 8.0]), eps=1.0),
                             [2.5, 1.0])


def test_the_resnet_has_twenty_conv_bn_layers_in_forward_order():
  layers = channels.conv_bn_layers(build_backbone(MODEL, 0))
  names = [name for name, _, _ in layers]
  assert len(names) == 20 and names[:3] == ["stem", "stage1.block0.conv1", "stage1.block0.conv2"]
  assert names[5:8] == ["stage2.block0.conv1", "stage2.block0.conv2", "stage2.block0.shortcut"]
  scores = channels.layer_uclc(build_backbone(MODEL, 0))
  assert scores["stem"].shape == (4,) and scores["stage4.block1.conv2"].shape == (32,)


def test_threshold_prunes_the_outlier_and_ddof_matters():
  scores = {"layer": np.array([1.0] * 9 + [10.0])}
  assert channels.pruned_counts(channels.threshold_masks(scores, 2.5)) == {"layer": 1}
  assert channels.pruned_counts(channels.threshold_masks(scores, math.inf)) == {"layer": 0}
  # mean 1.9, std 2.7 (ddof 0) or 2.846 (ddof 1): 10 > 1.9 + 3 * 2.7 = 10.0 is False; so is ddof 1; at u = 2.99
  # ddof 0 prunes (1.9 + 8.073 < 10) while ddof 1 does not (1.9 + 8.51 > 10).
  assert not channels.threshold_masks(scores, 2.99, ddof=0)["layer"][-1]
  assert channels.threshold_masks(scores, 2.99, ddof=1)["layer"][-1]


def _pruned_masks(encoder):
  masks = {name: np.ones(len(s), bool) for name, s in channels.layer_uclc(encoder).items()}
  masks["stage4.block1.conv2"][[1, 5]] = False
  masks["stem"][0] = False
  return masks


def test_masks_zero_the_bn_scale_and_bias_and_leave_the_input_encoder_alone():
  encoder = build_backbone(MODEL, 0)
  before = jax.tree.map(np.array, nnx.to_pure_dict(encoder.params))
  pruned = channels.apply_masks(encoder, _pruned_masks(encoder))
  after = nnx.to_pure_dict(pruned.params)
  bn = after["stages"][3][1]["bn2"]
  assert np.all(np.asarray(bn["scale"])[[1, 5]] == 0) and np.all(np.asarray(bn["bias"])[[1, 5]] == 0)
  assert np.count_nonzero(np.asarray(bn["scale"]) == 0) == 2
  assert np.asarray(after["stem_bn"]["scale"])[0] == 0
  jax.tree.map(np.testing.assert_array_equal, nnx.to_pure_dict(encoder.params), before)
  # Reference: the same zeros set by hand give the same forward.
  by_hand = jax.tree.map(np.array, before)
  by_hand["stages"][3][1]["bn2"]["scale"][[1, 5]] = 0
  by_hand["stages"][3][1]["bn2"]["bias"][[1, 5]] = 0
  by_hand["stem_bn"]["scale"][0] = by_hand["stem_bn"]["bias"][0] = 0
  reference = jax.tree.map(lambda x: x, encoder.params)
  nnx.replace_by_pure_dict(reference, by_hand)
  images = np.random.default_rng(0).integers(0, 256, (4, 8, 8, 3), dtype=np.uint8)
  np.testing.assert_allclose(encode_fn(pruned, MODEL)(images),
                             encode_fn(encoder._replace(params=reference), MODEL)(images), atol=1e-6)


def test_classifier_param_mask_keeps_pruned_channels_at_zero():
  encoder = build_backbone(MODEL, 0)
  masks = _pruned_masks(encoder)
  _, params, _ = nnx.split(finetune.build_classifier(encoder, 3, HEAD, 0), nnx.Param, nnx.BatchStat)
  multipliers = channels.classifier_param_mask(params, masks)
  noisy = jax.tree.map(lambda p: p + 1.0, params)  # as after an update that revived every channel
  out = nnx.to_pure_dict(jax.tree.map(lambda p, m: p * m, noisy, multipliers))
  bn = out["backbone"]["stages"][3][1]["bn2"]
  assert np.all(np.asarray(bn["scale"])[[1, 5]] == 0) and np.all(np.asarray(bn["bias"])[[0, 2, 3]] != 0)
  want = np.asarray(nnx.to_pure_dict(noisy)["head"]["fc1"]["kernel"])
  np.testing.assert_array_equal(out["head"]["fc1"]["kernel"], want)


def test_sweep_takes_the_most_pruning_within_tolerance():
  encoder = build_backbone(MODEL, 0)
  total = lambda e: sum(int((np.asarray(s["scale"]) == 0).sum()) for s in _bn_blocks(nnx.to_pure_dict(e.params)))
  base_zeros = total(encoder)
  score_fn = lambda e: 1.0 - 0.004 * (total(e) - base_zeros)  # each pruned channel costs 0.4 points
  grid = (1.0, 1.5, 2.0, 3.0)
  counts = {u: sum(channels.pruned_counts(channels.layer_masks(encoder, u)).values()) for u in grid}
  masks, u, record = channels.select_masks(encoder, "sweep", 3.0, grid, 0.01, score_fn)
  want = min((g for g in grid if 0.004 * counts[g] <= 0.01 + 1e-9), default=math.inf)
  assert u == want and len(record["tried"]) == sorted(grid).index(want) + 1 if want != math.inf else True
  plain, u_plain, _ = channels.select_masks(encoder, "plain", 2.0, grid, 0.01, score_fn)
  assert u_plain == 2.0 and all((plain[k] == channels.layer_masks(encoder, 2.0)[k]).all() for k in plain)


def _bn_blocks(tree):
  if isinstance(tree, dict):
    if "scale" in tree and "bias" in tree:
      yield tree
    for value in tree.values():
      yield from _bn_blocks(value)
