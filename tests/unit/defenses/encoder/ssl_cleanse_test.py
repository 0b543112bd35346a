"""SSL-Cleanse: the kNN attack success and the MAD statistic against NumPy, Kneedle and SWK on a hand curve and on
planted clusters, the cost schedule against detector.py's control flow transliterated, the trigger pairs, the
mitigator's loss against its formula, its lr multiplier, and bad input; `-m extended`: the trigger and mitigator
steps on 8 devices against 1, and detect + purify end to end on a tiny random encoder, resumed."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from flax import nnx

from helpers import assert_trees_close
from helpers import config as load_config
from jaxpurify import encoders, parallel, validation
from jaxpurify.defenses.encoder import _ssl_cleanse_detect as detect_lib
from jaxpurify.defenses.encoder import _ssl_cleanse_mitigate as mitigate_lib
from jaxpurify.defenses.encoder import ssl_cleanse
from jaxpurify.errors import UserError
from jaxpurify.models import build_ssl_model
from jaxpurify.pipeline import Run
from jaxpurify.train.state import TrainState

CONFIG = "baseline:defense=ssl_cleanse,attack=badencoder,tiny"
MODEL = ml_collections.ConfigDict(dict(name="resnet10", width=4, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25),
                                       dtype="float32"))


def _numpy_knn_labels(queries, bank, labels, k):
  distances = ((queries[:, None] - bank[None]) ** 2).sum(-1)
  out = []
  for row in distances:
    counts = np.bincount(labels[np.argsort(row, kind="stable")[:k]], minlength=labels.max() + 1)
    out.append(np.flatnonzero(counts == counts.max())[0])  # a tie: the smallest label
  return np.array(out)


@pytest.mark.parametrize("k", [1, 4])
def test_knn_attack_success_is_the_numpy_fraction_of_queries_labelled_target(k):
  rng = np.random.default_rng(0)
  bank, labels = rng.normal(size=(40, 5)), rng.integers(0, 4, 40)
  queries = rng.normal(size=(30, 5))
  expected = _numpy_knn_labels(queries, bank, labels, k)
  for target in range(4):
    got = ssl_cleanse.knn_attack_success(jnp.asarray(queries, jnp.float32), jnp.asarray(bank, jnp.float32),
                                         jnp.asarray(labels, jnp.int32), target, 4, k)
    assert float(got) == pytest.approx(np.mean(expected == target))
  assert len(set(expected)) > 1  # the fractions differ by target


def test_knn_label_is_the_nearest_bank_row_and_a_tie_goes_to_the_smaller_label():
  bank = jnp.asarray([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0], [10.0, 10.0]])
  labels = jnp.asarray([2, 1, 0, 1], jnp.int32)
  queries = jnp.asarray([[1.0, 0.5], [9.0, 2.0], [4.0, 9.0]])
  assert detect_lib.knn_labels(queries, bank, labels, 3, 1).tolist() == [2, 1, 0]
  assert detect_lib.knn_labels(queries, bank, labels, 3, 2).tolist() == [1, 1, 0]  # {2, 1} -> 1, {1, 1}, {0, 1} -> 0


def _lower_median(x):
  return np.sort(x)[(len(x) - 1) // 2]


@pytest.mark.parametrize("sizes", [[0.02, 0.3, 0.25, 0.31, 0.28], [0.1, 0.5, 0.6, 0.9],
                                   [0.2, 0.25, 0.7, 0.4, 0.2, 0.9]])
def test_mad_anomaly_index_is_the_official_outlier_with_torch_lower_medians(sizes):
  sizes = np.asarray(sizes)
  median = _lower_median(sizes)
  mad = 1.4826 * _lower_median(np.abs(sizes - median)) / 0.6745
  index, got_median, got_mad = ssl_cleanse.mad_anomaly_index(sizes)
  assert got_median == pytest.approx(median) and got_mad == pytest.approx(mad)
  np.testing.assert_allclose(index, np.abs(sizes - median) / mad)


def test_mad_anomaly_index_by_hand_and_with_zero_mad():
  index, median, mad = ssl_cleanse.mad_anomaly_index([0.1, 0.5, 0.6, 0.9])  # numpy's median would be 0.55
  assert median == 0.5 and mad == pytest.approx(0.1 * 1.4826 / 0.6745)
  assert index[0] == pytest.approx(0.4 / (0.1 * 1.4826 / 0.6745))  # the official anomaly index, ~1.82
  index, median, mad = ssl_cleanse.mad_anomaly_index([1.0, 1.0, 0.3, 1.0])  # 3 of 4 never reached: size 1
  assert median == 1.0 and mad == 0.0 and index.tolist() == [0.0, 0.0, np.inf, 0.0]


def test_kneedle_and_swk_by_hand():
  ks = np.arange(1, 6)
  # scaled: x = 0, .25, .5, .75, 1; y = 1, 1/3, 1/9, 1/18, 0; 1 - x - y = 0, .42, .39, .19, 0
  assert detect_lib.kneedle(ks, np.array([10.0, 4.0, 2.0, 1.5, 1.0])) == 2
  chosen, votes = detect_lib.swk(np.arange(2, 8), np.array([9.0, 3.0, 2.8, 1.0, 0.9, 0.8]), 4)
  assert votes == [3, 5, 5] and chosen == 5
  assert detect_lib.swk(np.arange(2, 7), np.array([9.0, 3.0, 2.9, 1.0, 0.95]), 4) == (3, [3, 5])  # tie -> smaller


@pytest.mark.parametrize("planted_k", [6, 7])
def test_swk_finds_the_planted_clusters(planted_k):
  rng = np.random.default_rng(0)
  planted = np.repeat(np.arange(planted_k), 30)  # equidistant centres (10 e_c), unit noise: the elbow is planted_k
  features = (10 * np.eye(8)[planted] + rng.normal(0, 1, (30 * planted_k, 8))).astype(np.float32)
  block = ml_collections.ConfigDict(dict(num_clusters=0, min_clusters=2, max_clusters=12, window=5,
                                         kmeans_restarts=3))
  labels, clustering = detect_lib.cluster(features, block, 0)
  assert labels.max() + 1 == planted_k and sorted(map(int, clustering["sse"])) == list(range(2, 13))
  assert all(len(set(labels[planted == c])) == 1 for c in range(planted_k))  # each planted cluster is one label


def _official_schedule(asrs, regs, block):
  """detector.py's per-target loop body (early stop off), one target, as written there."""
  lam, set_c, up_c, down_c, reg_best, lams, bests = 0, 0, 0, 0, np.inf, [], []
  for asr, reg in zip(asrs, regs):
    if asr > block.attack_succ_threshold and reg < reg_best:
      reg_best = reg
    if lam == 0 and asr >= block.attack_succ_threshold:
      set_c += 1
      if set_c >= block.patience:
        lam, up_c, down_c = block.lam, 0, 0
    else:
      set_c = 0
    if asr >= block.attack_succ_threshold:
      up_c, down_c = up_c + 1, 0
    else:
      up_c, down_c = 0, down_c + 1
    if lam != 0 and up_c >= block.patience:
      up_c, lam = 0, lam * block.lam_multiplier
    elif lam != 0 and down_c >= block.patience:
      down_c, lam = 0, lam / block.lam_multiplier
    lams.append(lam)
    bests.append(reg_best)
  return lams, bests


def test_cost_schedule_is_detector_py_for_every_cluster_at_once():
  block = ml_collections.ConfigDict(dict(attack_succ_threshold=0.99, patience=2, lam=0.1, lam_multiplier=1.5))
  rng = np.random.default_rng(0)
  epochs, clusters = 40, 5
  asr = np.where(rng.uniform(size=(epochs, clusters)) < 0.7, 1.0, rng.choice([0.5, 0.99], (epochs, clusters)))
  reg = rng.uniform(0.05, 0.3, (epochs, clusters))
  schedule, lams, bests = detect_lib.initial_schedule(clusters), [], []
  for e in range(epochs):
    schedule, _ = detect_lib.next_schedule(schedule, asr[e], reg[e], block)
    lams.append(schedule.lam)
    bests.append(schedule.reg_best)
  for k in range(clusters):
    want_lams, want_bests = _official_schedule(asr[:, k], reg[:, k], block)
    np.testing.assert_allclose(np.array(lams)[:, k], want_lams)
    np.testing.assert_allclose(np.array(bests)[:, k], want_bests)
  assert len({round(x, 6) for x in np.ravel(lams)}) > 3  # costs set, raised and lowered


def test_trigger_pairs_draw_other_clusters_for_each_target_and_members_as_partners():
  labels = np.array([0] * 5 + [1] * 3 + [2] * 4)
  others, partners = detect_lib.trigger_pairs(labels, np.random.default_rng(0))
  assert others.shape == partners.shape == (3, 12 - 5)
  for k in range(3):
    assert np.all(labels[others[k]] != k) and len(set(others[k])) == 7 and np.all(labels[partners[k]] == k)


def test_mitigation_loss_is_the_official_formula():
  rng = np.random.default_rng(0)
  arrays = [rng.normal(size=(6, 5)).astype(np.float32) for _ in range(6)]
  nmse = lambda a, b: 2 - 2 * np.mean(np.sum(a * b, -1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1))
  loss_1, loss_4 = ssl_cleanse.mitigation_loss(*map(jnp.asarray, arrays))
  p0, t1, h2, h3, z2, t3 = arrays
  assert float(loss_1) == pytest.approx(2 * nmse(p0, t1) / 6, rel=1e-5)
  assert float(loss_4) == pytest.approx((nmse(h2, h3) + nmse(z2, t3)) / 6, rel=1e-5)


def test_lr_factor_warms_up_linearly_then_drops_at_epochs_minus_drop():
  factor = mitigate_lib.lr_factor(4, (3, 1, 12), 0.2, epochs=10, steps_per_epoch=2)  # milestones: steps 14, 18
  got = [float(factor(c)) for c in (0, 2, 3, 13, 14, 17, 18)]
  np.testing.assert_allclose(got, [0.25, 0.75, 1.0, 1.0, 0.2, 0.2, 0.04], rtol=1e-6)
  assert float(mitigate_lib.lr_factor(0, (), 0.2, 10, 2)(5)) == 1.0


def test_bad_settings_fail_in_one_line():
  config = load_config(CONFIG)
  ssl_cleanse.check(config.baseline.ssl_cleanse, config)
  for key, value, rule in (("num_clusters", 1, r"0 \(SWK chooses\) or an integer of at least 2"),
                           ("lam_multiplier", 1.0, "a number above 1"),
                           ("knn_sample_num", 0, "an integer of at least 1"),
                           ("head.dim", 0, "an integer of at least 1"), ("attack_succ_threshold", 1.5, r"in \(0, 1\]")):
    bad = load_config(CONFIG, f"baseline.ssl_cleanse.{key}={value}")
    with pytest.raises(UserError, match=f"config.baseline.ssl_cleanse.{key} must be {rule}") as err:
      ssl_cleanse.check(bad.baseline.ssl_cleanse, bad)
    assert "\n" not in str(err.value)
  swk = load_config(CONFIG, "baseline.ssl_cleanse.num_clusters=0", "baseline.ssl_cleanse.max_clusters=5")
  with pytest.raises(UserError, match="window must be at least 3 and at most max_clusters - min_clusters"):
    ssl_cleanse.check(swk.baseline.ssl_cleanse, swk)
  bad = load_config(CONFIG, "baseline.ssl_cleanse.trigger_lr=0.0")
  with pytest.raises(UserError, match="config.baseline.ssl_cleanse.trigger_lr must be a number above 0"):
    validation.check_ranges(bad)
  with pytest.raises(UserError, match="fewer than the 8 devices"):
    detect_lib.batch_size(32, 7, 8)


# --- extended: steps on 8 devices against 1, the whole method on a tiny encoder -----------------------------------


def _one_device():
  return jax.make_mesh((1,), ("data",), devices=jax.devices()[:1])


def _random_encoder(mesh, seed=0):
  encoder = encoders.build_backbone(MODEL, seed)
  return encoders.Encoder(encoder.graphdef, *parallel.put_replicated((encoder.params, encoder.batch_stats), mesh))


@pytest.mark.extended  # a ResNet trigger step compiled on 1 and 8 devices
def test_trigger_step_on_eight_devices_equals_one_device():
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (8, 3, 8, 8, 3), dtype=np.uint8)  # [B, K, H, W, 3]
  targets = rng.normal(size=(8, 3, 32)).astype(np.float32)  # resnet10 width 4: 32 features
  tx = optax.sgd(0.5)
  out = []
  for mesh in (_one_device(), parallel.make_mesh()):
    encoder = _random_encoder(mesh)
    raw = detect_lib.initial_triggers(jax.random.key(0), 3, 8, 8)
    state = parallel.put_replicated(TrainState(jnp.zeros((), jnp.int32), raw, {}, tx.init(raw)), mesh)
    step = jax.jit(detect_lib.make_trigger_step(encoder.graphdef, tx, MODEL), donate_argnums=0)
    batch = parallel.put_batch({"image": images, "target": targets}, mesh) | parallel.put_replicated(
        {"lam": np.array([0.0, 0.1, 10.0], np.float32),
         "encoder": {"params": encoder.params, "batch_stats": encoder.batch_stats}}, mesh)
    for _ in range(2):
      state, metrics = step(state, batch, jax.random.key(0))
    out.append((jax.device_get(metrics), jax.device_get(state.params)))
  (metrics_1, raw_1), (metrics_8, raw_8) = out
  np.testing.assert_allclose(metrics_8["asr_loss"], metrics_1["asr_loss"], rtol=1e-4)
  assert_trees_close(raw_8, raw_1)
  start = jax.device_get(detect_lib.initial_triggers(jax.random.key(0), 3, 8, 8))
  assert not np.allclose(raw_8["mask"], start["mask"])


@pytest.mark.extended  # the mitigator step (ResNet, projector, predictor, frozen target) on 1 and 8 devices
def test_mitigator_step_on_eight_devices_equals_one_device():
  config = load_config(CONFIG, "baseline.ssl_cleanse.optim.name=sgd", "baseline.ssl_cleanse.optim.lr=0.1",
                       "baseline.ssl_cleanse.optim.weight_decay=0.0", "baseline.ssl_cleanse.warmup_steps=0")
  config.model.update(MODEL.to_dict())
  block = config.baseline.ssl_cleanse
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (16, 8, 8, 3), dtype=np.uint8)
  triggers = {"mask": rng.uniform(0, 1, (2, 8, 8, 1)).astype(np.float32),
              "pattern": rng.uniform(0, 1, (2, 8, 8, 3)).astype(np.float32)}
  out = []
  for mesh in (_one_device(), parallel.make_mesh()):
    tx = mitigate_lib.optimizer(block, 1)
    graphdef, state = mitigate_lib.initial_state(block, config, _random_encoder(mesh), tx, mesh)
    target, start = jax.device_get(state.extra), (jax.device_get(state.params), jax.device_get(state.batch_stats))
    step = jax.jit(mitigate_lib.make_step(graphdef, _target_graphdef(config, block), tx, block, config.model),
                   donate_argnums=0)
    batch = parallel.put_batch({"image": images}, mesh) | parallel.put_replicated(triggers, mesh)
    for _ in range(2):
      state, metrics = step(state, batch, jax.random.key(0))
    out.append((jax.device_get(metrics), jax.device_get((state.params, state.batch_stats)),
                jax.device_get(state.extra), target, start))
  (metrics_1, params_1, *_), (metrics_8, params_8, extra_8, target_8, start_8) = out
  assert metrics_8["loss_4"] == pytest.approx(metrics_1["loss_4"], rel=1e-4)
  assert metrics_8["loss"] == pytest.approx(metrics_1["loss"], rel=1e-4)
  assert_trees_close(params_8, params_1)
  assert_trees_close(extra_8, target_8, rtol=0, atol=0)  # the target is frozen
  with pytest.raises(AssertionError):
    assert_trees_close(params_8, start_8)  # the online network moved


def _target_graphdef(config, block):
  """The graphdef of the frozen target (backbone and projector), as mitigate_lib.training builds it."""
  target = nnx.eval_shape(lambda: build_ssl_model(config.model, block.head, config.seed))
  return nnx.split(target, nnx.Param, nnx.BatchStat)[0]


@pytest.mark.extended  # detection (SWK, reversal, MAD) and mitigation on a tiny random encoder, then resumed
def test_detect_and_purify_end_to_end_and_resume(tmp_path):
  config = load_config(CONFIG, "baseline.ssl_cleanse.num_clusters=0", "baseline.ssl_cleanse.max_clusters=6",
                       "baseline.ssl_cleanse.window=3", "baseline.ssl_cleanse.trigger_epochs=2",
                       "baseline.ssl_cleanse.train.batch_size=16", "evaluate.batch_size=64")
  config.model.update(MODEL.to_dict())
  block, mesh = config.baseline.ssl_cleanse, parallel.make_mesh()
  images = np.random.default_rng(0).integers(0, 256, (48, 8, 8, 3), dtype=np.uint8)
  suspect = _random_encoder(mesh)
  run = Run(config, str(tmp_path))
  record = ssl_cleanse.detect(run, ssl_cleanse.DETECT_STAGE, block, config, suspect, images, mesh)
  k = record["clusters"]
  assert 3 <= k <= 5 and len(record["trigger_sizes"]) == k == len(record["attack_success"])
  assert record["flagged"] == (record["score"] > block.anomaly_threshold) and sum(record["cluster_sizes"]) == 48
  with np.load(tmp_path / ssl_cleanse.DETECT_STAGE / ssl_cleanse.TRIGGERS_FILE) as saved:
    assert saved["mask"].shape == (k, 8, 8, 1) and saved["pattern"].shape == (k, 8, 8, 3)
    assert 0 < saved["mask"].min() and saved["mask"].max() < 1
  defended, diagnostics = ssl_cleanse.purify(run, block, config, suspect, images, mesh, None)
  assert diagnostics["trigger_clusters"] == (record["flagged_clusters"] or list(range(k)))
  assert run.done(ssl_cleanse.MITIGATE_STAGE)["steps"] == 3  # 48 // 16 steps, 1 epoch
  moved = jax.tree.map(lambda a, b: np.abs(np.asarray(a) - np.asarray(b)).max(), defended.params, suspect.params)
  assert max(jax.tree.leaves(moved)) > 0
  again, _ = ssl_cleanse.purify(run, block, config, suspect, images, mesh, None)  # finished stages: loaded
  assert_trees_close(jax.device_get(again.params), jax.device_get(defended.params), rtol=0, atol=0)
