"""FP (fine-pruning): the activation ranking and the pruning levels against hand-computed values, the masks that zero
the ranked feature channels (and why the last conv alone does not), the stopping rule on a synthetic accuracy curve,
`train` on a tiny classifier (pruned channels still 0 after fine-tuning, the search cached for a resumed run, the
same on 8 devices as on 1) and bad input."""

import jax
import ml_collections
import numpy as np
import pytest
from flax import nnx

from helpers import assert_trees_close
from helpers import config as load_config
from jaxpurify import finetune, parallel, validation
from jaxpurify.defenses.baselines import _repair, fp
from jaxpurify.defenses.baselines.inputs import Inputs
from jaxpurify.defenses.tcore import channels
from jaxpurify.encoders import build_backbone, encode_fn
from jaxpurify.errors import UserError
from jaxpurify.pipeline import Run
from jaxpurify.train.state import create_state, make_optimizer

MODEL = ml_collections.ConfigDict(dict(name="resnet18", width=4, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25),
                                       dtype="float32"))
STREAM = ["stage4.block0.conv2", "stage4.block0.shortcut", "stage4.block1.conv2"]  # BNs at stages[3][b]


def test_channels_rank_by_mean_activation_least_active_first():
  features = np.array([[0.0, 2.0, 1.0, 0.5, 1.0],
                       [0.2, 0.0, 1.0, 0.5, 3.0],
                       [0.1, 1.0, 1.0, 0.5, 2.0]])
  # means 0.1, 1.0, 1.0, 0.5, 2.0: channel 0, then 3, then the tied 1 and 2 by index, then 4
  np.testing.assert_array_equal(fp.pruning_order(features), [0, 3, 1, 2, 4])


def test_levels_step_by_the_rounded_up_share_and_never_prune_everything():
  assert fp.prune_levels(64, 0.01) == list(range(1, 64))  # quick's 64 channels: one at a time
  assert fp.prune_levels(512, 0.01) == list(range(6, 512, 6))  # ceil(5.12) = 6, as BackdoorBench steps
  assert fp.prune_levels(10, 0.25) == [3, 6, 9]
  assert fp.prune_levels(10, 1.0) == []


def test_the_search_stops_before_the_first_level_over_the_budget():
  curve = {2: 0.95, 4: 1.0, 6: 0.90, 8: 0.85, 10: 0.95}  # base 0.95: within 10% means >= 0.855
  asked = []

  def accuracy_at(level):
    asked.append(level)
    return curve[level]

  chosen = fp.largest_within_budget([2, 4, 6, 8, 10], accuracy_at, 0.95, 0.1)
  assert chosen == (6, 0.90, [[2, 0.95], [4, 1.0], [6, 0.90], [8, 0.85]])  # a rise does not stop it; 10 not tried
  assert asked == [2, 4, 6, 8]
  assert fp.largest_within_budget([2, 4, 6, 8, 10], curve.get, 0.95, 0.0)[:2] == (4, 1.0)
  assert fp.largest_within_budget([6, 8], curve.get, 1.0, 0.05) == (0, 1.0, [[6, 0.9]])
  # the edge is inside the budget: 18 of 21 right against 20 of 21 is a relative drop of exactly 0.1
  assert fp.largest_within_budget([1], {1: 18 / 21}.get, 20 / 21, 0.1)[0] == 1


def _jittered():
  """A width-4 resnet18 with every parameter and statistic moved off its init (every pooled channel active)."""
  encoder, rng = build_backbone(MODEL, 0), np.random.default_rng(2)

  def shift(x):
    return x + rng.uniform(0.1, 0.5, x.shape).astype(np.float32)

  return encoder._replace(params=jax.tree.map(shift, encoder.params),
                          batch_stats=jax.tree.map(shift, encoder.batch_stats))


def test_the_pruned_feature_channels_are_exactly_zero_where_the_last_conv_alone_leaves_them():
  encoder = _jittered()
  assert [layer.name for layer in fp.stream_layers(encoder)] == STREAM
  images = np.random.default_rng(0).integers(0, 256, (8, 8, 8, 3), dtype=np.uint8)
  features = np.asarray(encode_fn(encoder, MODEL)(images))
  pruned = fp.pruning_order(features)[:5]
  masks = fp.feature_masks(encoder, pruned)
  assert list(masks) == STREAM and all(np.flatnonzero(~keep).tolist() == sorted(pruned) for keep in masks.values())
  out = np.asarray(encode_fn(channels.apply_masks(encoder, masks), MODEL)(images))
  assert np.all(out[:, pruned] == 0) and np.all(np.delete(out, pruned, axis=1).max(axis=0) > 0)
  last_only = channels.apply_masks(encoder, {STREAM[-1]: masks[STREAM[-1]]})  # BackdoorBench's older layer4 mask
  assert np.all(np.asarray(encode_fn(last_only, MODEL)(images))[:, pruned].max(axis=0) > 0)


def _inputs(mesh, seed: int = 0) -> Inputs:
  """The tiny FP config's Inputs on `mesh` as FP reads them: a 32-image reserve (4 classes) with random features
  [32, 32] to rank, and a random classifier on a tiny encoder (resnet10, 32 feature channels) as the undefended
  model (FT-all)."""
  config = load_config("baseline:defense=fp,threat=2,attack=badnets,tiny")
  encoder, rng = build_backbone(config.model, seed), np.random.default_rng(seed)
  images, labels = rng.integers(0, 256, (32, 8, 8, 3), dtype=np.uint8), np.repeat(np.arange(4), 8)
  features = rng.uniform(0, 1, (32, 32)).astype(np.float32)
  tx = make_optimizer(ml_collections.ConfigDict(dict(name="sgd", lr=0.1, momentum=0.0, weight_decay=0.0)))
  model = create_state(lambda: finetune.build_classifier(encoder, 4, config.finetune.head, seed), tx, mesh)
  return Inputs(config, mesh, "ft_all", encoder, images[:0], labels[:0], 4, images, labels, model, features[:0],
                features, np.zeros((0, 4), np.float32), np.zeros((32, 4), np.float32))


def _stream_bns(graphdef, state) -> dict:
  """{layer: its BatchNorm's pure params} over the classifier's stream layers."""
  encoder = _repair.backbone(graphdef, state)
  params = nnx.to_pure_dict(encoder.params)
  bns = {}
  for layer in fp.stream_layers(encoder):
    bn = params
    for key in layer.bn_path:
      bn = bn[key]
    bns[layer.name] = bn
  return bns


@pytest.mark.extended  # a search and 2 epochs of FT-all fine-tuning: its compile alone is over CI's share for FP
def test_train_keeps_the_pruned_channels_at_zero_and_resumes_from_its_record(tmp_path, monkeypatch):
  inputs = _inputs(jax.make_mesh((1,), ("data",), devices=jax.devices()[:1]))  # 8 devices: the extended test
  block = inputs.config.baseline.fp
  block.max_acc_drop = 0.5  # a random head on random images: let pruning go some way
  run = Run(inputs.config, str(tmp_path))
  head_before = np.array(nnx.to_pure_dict(inputs.model[1].params)["head"]["fc3"]["kernel"])  # training donates it
  graphdef, state, diagnostics = fp.train(inputs, block, run)
  record = run.done("fp_prune_ft_all")
  masks = {name: np.asarray(keep) for name, keep in record["masks"].items()}
  pruned = np.flatnonzero(~masks["stage4.block0.conv2"])  # the tiny resnet10's stream: one block, 32 channels
  assert list(masks) == ["stage4.block0.conv2", "stage4.block0.shortcut"] and 0 < len(pruned) < 32
  assert diagnostics == {"pruned": {name: len(pruned) for name in masks}, "pruned_fraction": len(pruned) / 32,
                         **{k: record[k] for k in ("held_out_acc", "held_out_acc_unpruned")}}
  assert [level for level, _ in record["tried"]][:len(pruned)] == list(range(1, len(pruned) + 1))
  fit, _ = _repair.held_out(inputs.reserve_labels, inputs.config.baseline.held_out_fraction, inputs.config.seed)
  np.testing.assert_array_equal(pruned, np.sort(fp.pruning_order(inputs.reserve_features[fit])[:len(pruned)]))
  for name, bn in _stream_bns(graphdef, state).items():  # fine-tuned for 2 epochs, the pruned scale and bias still 0
    np.testing.assert_array_equal(np.asarray(bn["scale"]) != 0, masks[name])
    assert np.all(np.asarray(bn["bias"])[pruned] == 0)
  trained = jax.tree.map(np.asarray, nnx.to_pure_dict(state.params))
  assert np.abs(trained["head"]["fc3"]["kernel"] - head_before).max() > 1e-4

  def search_again(*_):
    raise AssertionError("the pruning search ran again")

  monkeypatch.setattr(fp, "choose_pruning", search_again)
  _, resumed, again = fp.train(inputs, block, run)
  assert again == diagnostics
  jax.tree.map(np.testing.assert_array_equal, nnx.to_pure_dict(resumed.params), trained)


@pytest.mark.extended  # the whole method twice (search and fine-tuning), on 1 and on 8 devices
def test_train_on_eight_devices_equals_one_device(tmp_path):
  out = []
  for name, mesh in (("one", jax.make_mesh((1,), ("data",), devices=jax.devices()[:1])),
                     ("eight", parallel.make_mesh())):
    inputs = _inputs(mesh)
    inputs.config.baseline.fp.max_acc_drop = 0.5
    _, state, diagnostics = fp.train(inputs, inputs.config.baseline.fp, Run(inputs.config, str(tmp_path / name)))
    out.append((diagnostics, jax.device_get(nnx.to_pure_dict(state.params))))
  assert out[1][0] == out[0][0]
  assert_trees_close(out[1][1], out[0][1])


@pytest.mark.parametrize("field, value, message", [
    ("prune_step", 0.0, "prune_step must be in \\(0, 1\\], got 0.0"),
    ("prune_step", 1.5, "prune_step must be in \\(0, 1\\], got 1.5"),
    ("max_acc_drop", 1.0, "max_acc_drop must be in \\[0, 1\\), got 1.0"),
    ("max_acc_drop", -0.1, "max_acc_drop must be in \\[0, 1\\), got -0.1")])
def test_bad_settings_fail_in_one_line(field, value, message):
  config = load_config("baseline:defense=fp,threat=2,attack=badnets,tiny")
  block = config.baseline.fp
  fp.check(block, config, np.full(8, 16), np.full(8, 2))
  block[field] = value
  with pytest.raises(UserError, match=message) as err:
    validation.check_ranges(config)
  assert "\n" not in str(err.value)


def test_a_reserve_without_a_held_out_split_or_a_batch_is_refused():
  config = load_config("baseline:defense=fp,threat=2,attack=badnets,tiny")
  block = config.baseline.fp
  with pytest.raises(UserError, match="has no class with 2 images"):
    fp.check(block, config, np.full(8, 16), np.full(8, 1))
  with pytest.raises(UserError, match="holds 7 images, fewer than one batch over the 8 devices"):
    fp.check(block, config, np.full(7, 16), np.array([2, 1, 1, 1, 1, 1, 0]))
