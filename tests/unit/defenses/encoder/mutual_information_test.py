"""MIMIC's MI estimator: the DV bound against NumPy, the statistics network against the concatenating MLP of
TNet.py, the marginal's permutation of the valid rows, the estimator reaching the known MI of correlated
Gaussians, the layer weights against hand-computed values, bad settings; `-m extended`: the estimator step on 8
devices against 1, and `layer_mi` on a tiny encoder (its batches against the encoder's own forward)."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from flax import nnx

from helpers import assert_trees_close
from jaxpurify import encoders, parallel
from jaxpurify.defenses.encoder import _mutual_information as mi
from jaxpurify.errors import UserError
from jaxpurify.train.state import create_state

ADAM = ml_collections.ConfigDict(dict(mi_lr=1e-2, mi_weight_decay=1e-5))


def _one_device_mesh():
  return jax.make_mesh((1,), ("data",), devices=jax.devices()[:1])


def test_dv_bound_matches_numpy_over_the_valid_rows_without_overflow():
  rng = np.random.default_rng(0)
  t_joint, t_marginal = rng.normal(0, 2, 12), rng.normal(90, 3, 12)  # exp(90+) overflows float32
  valid = np.arange(12) % 4 != 1
  expected = t_joint[valid].mean() - np.log(np.mean(np.exp(t_marginal[valid])))  # float64
  got = mi.dv_bound(jnp.asarray(t_joint, jnp.float32), jnp.asarray(t_marginal, jnp.float32), jnp.asarray(valid))
  assert float(got) == pytest.approx(expected, abs=1e-4)
  every = t_joint.mean() - np.log(np.mean(np.exp(t_marginal)))
  assert float(mi.dv_bound(jnp.asarray(t_joint, jnp.float32), jnp.asarray(t_marginal, jnp.float32))) == \
      pytest.approx(every, abs=1e-4)


def test_statistics_network_is_tnets_mlp_on_the_concatenation_with_torchs_init():
  maps_dim, feature_dim, hidden = 6, 3, 16
  net = mi.StatisticsNetwork(maps_dim, feature_dim, hidden, rngs=nnx.Rngs(0))
  rng = np.random.default_rng(1)
  maps, features, shuffled = (rng.normal(size=(5, k)).astype(np.float32) for k in (maps_dim, feature_dim, feature_dim))
  w1 = np.concatenate([np.asarray(net.map_in.kernel[...]), np.asarray(net.feature_in.kernel[...])])
  relu = lambda z: np.maximum(z, 0.0)

  def tnet(m, f):  # estimator/TNet.py: dense1(cat) -> relu -> dense2 -> relu -> dense3
    h = relu(np.concatenate([m, f], 1) @ w1 + np.asarray(net.map_in.bias[...]))
    h = relu(h @ np.asarray(net.hidden.kernel[...]) + np.asarray(net.hidden.bias[...]))
    return (h @ np.asarray(net.out.kernel[...]) + np.asarray(net.out.bias[...]))[:, 0]

  joint, marginal = net.pair(jnp.asarray(maps), jnp.asarray(features), jnp.asarray(shuffled))
  np.testing.assert_allclose(joint, tnet(maps, features), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(marginal, tnet(maps, shuffled), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(net(jnp.asarray(maps), jnp.asarray(features)), joint, rtol=1e-6, atol=1e-6)
  bound = (maps_dim + feature_dim) ** -0.5  # torch.nn.Linear: U(-1/sqrt(fan_in), 1/sqrt(fan_in)), fan_in of the cat
  assert 0.8 * bound < np.abs(w1).max() <= bound and np.abs(np.asarray(net.map_in.bias[...])).max() <= bound
  assert 0.8 * hidden ** -0.5 < np.abs(np.asarray(net.hidden.kernel[...])).max() <= hidden ** -0.5


def test_marginal_permutes_the_valid_rows_among_themselves_on_eight_devices():
  mesh = parallel.make_mesh()
  valid = np.array([1, 1, 0, 1, 1, 1, 0, 1, 1, 1, 1, 1, 1, 1, 0, 1], bool)
  features = np.arange(16, dtype=np.float32)[:, None] * np.ones((1, 3), np.float32)
  shuffle = jax.jit(mi.marginal)
  moved = 0
  for seed in range(4):
    out = np.asarray(shuffle(*parallel.put_batch((features, valid), mesh), jax.random.key(seed)))
    np.testing.assert_array_equal(out[:, 0], out[:, 2])  # whole rows move
    assert sorted(out[valid, 0]) == sorted(features[valid, 0])
    assert set(out[~valid, 0]) <= set(features[~valid, 0])
    moved += int(np.sum(out[valid, 0] != features[valid, 0]))
  assert moved > 30  # 13 valid rows x 4 draws; a uniform permutation keeps ~1 row in place per draw


def _gaussian_batches(d: int, rho: float, n: int, mesh, seed: int):
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(n, d)).astype(np.float32)
  y = (rho * x + np.sqrt(1 - rho ** 2) * rng.normal(size=(n, d))).astype(np.float32)
  return [parallel.put_batch({"map": x, "feature": y, "valid": np.ones(n, bool)}, mesh)]


def test_estimator_reaches_the_mutual_information_of_correlated_gaussians():
  # d independent pairs with correlation rho: I = -d/2 log(1 - rho^2) = 1.022 nats for d=2, rho=0.8. The DV bound of
  # the optimal T over these 2048 samples has a spread (sd) of 0.05 nats (Monte Carlo over draws), and a trained T
  # stays a little below it (a lower bound); 0.15 covers both, while an estimator that never shuffles (0) or
  # forgets a pair (0.51) fails.
  d, rho = 2, 0.8
  truth = -d / 2 * np.log(1 - rho ** 2)
  mesh = parallel.make_mesh()
  per_epoch = mi.estimates(_gaussian_batches(d, rho, 2048, mesh, 0), 32, 40, mi.estimator_optimizer(ADAM), mesh,
                           jax.random.key(0))
  assert per_epoch.shape == (40,) and per_epoch[0] < 0.5 * truth  # it learnt: the untrained T is far below
  assert np.mean(per_epoch[-10:]) == pytest.approx(truth, abs=0.15)


def test_layer_weights_share_the_momentum_by_mi():
  weights = mi.layer_weights({"layer1": 1.0, "layer2": 3.0, "layer3": 0.0, "layer4": 4.0}, 1000.0, 10000.0)
  assert weights == pytest.approx((2250.0, 4750.0, 1000.0, 6000.0))
  assert mi.layer_weights({"layer1": 0.0, "layer2": 0.0}, 1000.0, 10000.0) == pytest.approx((6000.0, 6000.0))


def test_bad_settings_name_the_field():
  block = ml_collections.ConfigDict(dict(mi_epochs=5, mi_last_epochs=6, mi_batch_size=64))
  with pytest.raises(UserError, match="mi_last_epochs=6"):
    mi.check_block(block, 8)
  block.mi_last_epochs, block.mi_batch_size = 5, 60
  with pytest.raises(UserError, match="mi_batch_size=60"):
    mi.check_block(block, 8)
  with pytest.raises(UserError, match="at least 2 images"):
    mi.layer_mi(None, None, np.zeros((1, 8, 8, 3), np.uint8), ("layer1",), block, None, 0)


@pytest.mark.extended
def test_estimator_step_on_eight_devices_equals_one_device():
  sgd = optax.sgd(0.05)
  out = []
  for mesh in (_one_device_mesh(), parallel.make_mesh()):
    batch = _gaussian_batches(3, 0.7, 64, mesh, 1)[0]
    batch["valid"] = parallel.put_batch(np.arange(64) < 53, mesh)  # a padded last batch
    graphdef, state = create_state(lambda: mi.StatisticsNetwork(3, 3, 16, rngs=nnx.Rngs(0)), sgd, mesh)
    step = jax.jit(mi.make_step(graphdef, sgd), donate_argnums=0)
    for _ in range(3):
      state, metrics = step(state, batch, jax.random.key(0))
    bound = jax.jit(mi.make_estimate(graphdef))(state.params, batch, jax.random.key(5))
    out.append((float(metrics["loss"]), float(bound), jax.device_get(state.params)))
  assert out[1][0] == pytest.approx(out[0][0], rel=1e-4) and out[1][1] == pytest.approx(out[0][1], rel=1e-4)
  assert_trees_close(out[1][2], out[0][2])


@pytest.mark.extended
def test_layer_mi_on_a_tiny_encoder():
  model = ml_collections.ConfigDict(dict(name="resnet10", width=4, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25),
                                         dtype="float32"))
  mesh = parallel.make_mesh()
  encoder = encoders.build_backbone(model, 0)
  encoder = encoders.Encoder(encoder.graphdef, *parallel.put_replicated((encoder.params, encoder.batch_stats), mesh))
  images = np.random.default_rng(0).integers(0, 256, (37, 16, 16, 3), dtype=np.uint8)
  # the batches: the images in order, the stage's output flattened and the pooled feature L2-normalised
  batches = mi.layer_batches(encoder, model, images, "layer2", 16, mesh)
  assert len(batches) == 3 and [int(np.sum(b["valid"])) for b in batches] == [16, 16, 5]
  feature = np.asarray(encoders.encode_fn(encoder, model)(images))
  got = np.concatenate([np.asarray(b["feature"]) for b in batches])[:37]
  np.testing.assert_allclose(got, feature / np.linalg.norm(feature, axis=1, keepdims=True), rtol=1e-5, atol=1e-6)
  module = nnx.merge(encoder.graphdef, encoder.params, encoder.batch_stats)
  _, taps = module((images[20:30].astype(np.float32) / 255 - 0.5) / 0.25, train=False)
  np.testing.assert_allclose(np.asarray(batches[1]["map"])[4:14], np.asarray(taps["layer2"]).reshape(10, -1),
                             rtol=1e-4, atol=1e-5)
  block = ml_collections.ConfigDict(dict(mi_epochs=3, mi_lr=1e-3, mi_weight_decay=1e-5, mi_hidden=32,
                                         mi_batch_size=16, mi_last_epochs=2))
  result = mi.layer_mi(encoder, model, images, ("layer1", "layer4"), block, mesh, 0)
  assert list(result) == ["layer1", "layer4"] and all(np.isfinite(v) and v >= 0 for v in result.values())
