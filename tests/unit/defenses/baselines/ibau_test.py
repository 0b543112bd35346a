"""I-BAU: the fixed-point hypergradient against the implicit-function answer and finite differences on a quadratic
problem, the perturbed count, the check, and (`-m extended`) a round (δ step, then θ step) on 8 devices against 1
under FT-head with δ's restart at a round's first step."""

import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from helpers import assert_trees_close
from helpers import config as load_config
from jaxpurify import finetune, parallel, validation
from jaxpurify.defenses.baselines import ibau
from jaxpurify.encoders import build_backbone
from jaxpurify.errors import UserError
from jaxpurify.train.state import create_state, make_optimizer

MODEL = ml_collections.ConfigDict(dict(name="resnet10", width=4, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25),
                                       dtype="float32"))
HEAD = ml_collections.ConfigDict(dict(hidden=(16, 8), dropout=0.0))
AUGMENT = ml_collections.ConfigDict(dict(padding=0, flip_prob=0.0))
BLOCK = ml_collections.ConfigDict(dict(inner_lr=10.0, fixed_point_lr=0.1, delta_penalty=1e-3,
                                       perturbed_fraction=0.25, fixed_point_iters=5))


def _quadratic(seed=0):
  """Inner Φ(δ, θ) = δ − α(Aδ − Bθ) (gradient descent on ½δᵀAδ − δᵀBθ, optimum δ* = A⁻¹Bθ), outer
  L(δ, θ) = ½‖δ − c‖² + ½‖θ‖², θ a tree {'u': [2], 'v': [1]} read as the vector (u, v)."""
  rng = np.random.default_rng(seed)
  m = rng.normal(size=(3, 3))
  a, b, c = m @ m.T + np.eye(3), rng.normal(size=(3, 3)), rng.normal(size=3)
  alpha = 1 / np.linalg.eigvalsh(a).max()  # ‖I − αA‖ < 1: the fixed-point iteration converges

  def fixed_point_map(d, t):
    return d - alpha * (jnp.asarray(a, jnp.float32) @ d - jnp.asarray(b, jnp.float32) @ _flat(t))

  def outer_loss(d, t):
    return 0.5 * jnp.sum((d - c) ** 2) + 0.5 * jnp.sum(_flat(t) ** 2)

  theta = {"u": rng.normal(size=2).astype(np.float32), "v": rng.normal(size=1).astype(np.float32)}
  return a, b, c, alpha, fixed_point_map, outer_loss, theta


def _flat(theta):
  return jnp.concatenate([theta["u"], theta["v"]])


def test_hypergradient_is_the_truncated_neumann_series_and_converges_to_the_implicit_answer():
  a, b, c, alpha, fixed_point_map, outer_loss, theta = _quadratic()
  t = np.asarray(_flat(theta), np.float64)
  optimum = np.linalg.solve(a, b @ t)
  # K iterations from v = 0: v_K = Σ_{k<K} (I − αA)^k (δ* − c); hypergradient θ + αBᵀ v_K
  v = sum(np.linalg.matrix_power(np.eye(3) - alpha * a, k) @ (optimum - c) for k in range(5))
  loss, got = ibau.implicit_hypergradient(outer_loss, fixed_point_map, optimum.astype(np.float32), theta, 5)
  np.testing.assert_allclose(_flat(got), t + alpha * b.T @ v, rtol=1e-5, atol=1e-6)
  assert float(loss) == pytest.approx(0.5 * np.sum((optimum - c) ** 2) + 0.5 * np.sum(t**2), rel=1e-5)
  # many iterations: the implicit-function answer θ + Bᵀ A⁻¹ (δ* − c), and the finite differences of
  # F(θ) = L(δ*(θ), θ)
  _, got = ibau.implicit_hypergradient(outer_loss, fixed_point_map, optimum.astype(np.float32), theta, 400)
  got = np.asarray(_flat(got))
  np.testing.assert_allclose(got, t + b.T @ np.linalg.solve(a, optimum - c), rtol=1e-4, atol=1e-5)

  def total(s):
    return 0.5 * np.sum((np.linalg.solve(a, b @ s) - c) ** 2) + 0.5 * np.sum(s**2)

  differences = [(total(t + h) - total(t - h)) / 2e-6 for h in 1e-6 * np.eye(3)]
  np.testing.assert_allclose(got, differences, rtol=1e-4, atol=1e-5)


def test_perturbed_count_is_the_share_of_the_batch_at_least_one():
  assert ibau.perturbed_count(100, 0.01) == 1
  assert ibau.perturbed_count(256, 0.01) == 2
  assert ibau.perturbed_count(64, 0.01) == 1
  assert ibau.perturbed_count(8, 0.25) == 2


@functools.lru_cache(maxsize=1)
def _host_model():
  """(graphdef, tx, state) of a tiny classifier with δ = 0 on the host: SGD 0.1, FT-head's trainable set."""
  tx = make_optimizer(ml_collections.ConfigDict(dict(name="sgd", lr=0.1, momentum=0.0, weight_decay=0.0)),
                      trainable=finetune.head_only)
  mesh = jax.make_mesh((1,), ("data",), devices=jax.devices()[:1])
  graphdef, state = create_state(lambda: finetune.build_classifier(build_backbone(MODEL, 0), 3, HEAD, 0), tx, mesh,
                                 lambda _: {"delta": jnp.zeros((8, 8, 3), jnp.float32)})
  return graphdef, tx, jax.device_get(state)


@pytest.mark.extended  # a ResNet round compiled on 1 and 8 devices (~12 s)
def test_a_round_is_the_same_on_one_and_eight_devices_moves_only_the_head_and_the_next_restarts_delta():
  graphdef, tx, host = _host_model()
  step = jax.jit(ibau.make_step(graphdef, tx, BLOCK, AUGMENT, MODEL.mean, MODEL.std, 1, finetune.head_only))
  rng = np.random.default_rng(1)
  images, labels = rng.integers(0, 256, (8, 8, 8, 3), dtype=np.uint8), rng.integers(0, 3, 8).astype(np.int32)
  out = []
  for mesh in (jax.make_mesh((1,), ("data",), devices=jax.devices()[:1]), parallel.make_mesh()):
    state, batch = parallel.put_replicated(host, mesh), parallel.put_batch({"image": images, "label": labels}, mesh)
    maximised, first = step(state, batch, jax.random.key(0))  # step 0: δ
    unlearnt, second = step(maximised, batch, jax.random.key(0))  # step 1: θ through δ*
    out.append(jax.device_get((first, second, maximised.extra["delta"], unlearnt.params)))
  # a round's first step starts δ from 0: step 2 with another δ in the state repeats step 0 (no augmentation)
  restarted, _ = step(parallel.put_replicated(host.replace(step=np.int32(2), extra={"delta": np.ones((8, 8, 3),
                      np.float32)}), mesh), batch, jax.random.key(0))
  np.testing.assert_array_equal(jax.device_get(restarted.extra["delta"]), out[1][2])
  (first, second, delta, params), sharded = out
  assert (float(first["unlearning"]), float(second["unlearning"])) == (0.0, 1.0)
  assert float(first["delta_l2"]) > 0 and float(first["loss"]) < 0  # the inner loss is −CE + a small penalty
  assert_trees_close(params["backbone"], host.params["backbone"], rtol=0, atol=0)
  assert float(np.abs(params["head"]["fc3"]["kernel"] - host.params["head"]["fc3"]["kernel"]).max()) > 0
  # δ and the head's update: float32 sums in other orders through K + 2 chained derivative passes differ by ~1e-6
  # relative (seen: 3e-7, 2e-6); a sharding bug is O(1)
  _, sharded_second, sharded_delta, sharded_params = sharded
  assert_trees_close((sharded_delta, _head_update(sharded_params, host)), (delta, _head_update(params, host)),
                     rtol=1e-4, atol=1e-9)
  for name in ("loss", "delta_l2"):
    assert float(sharded_second[name]) == pytest.approx(float(second[name]), rel=1e-4)


def _head_update(params, start):
  return jax.tree.map(np.subtract, params["head"], start.params["head"])


def test_a_perturbed_share_outside_the_unit_interval_or_a_small_reserve_fails_in_one_line():
  config = load_config("baseline:defense=ibau,threat=2,attack=badnets,tiny")
  block = config.baseline.ibau
  ibau.check(block, config, np.full(8, 100), np.full(8, 10))
  block.perturbed_fraction = 0.0
  with pytest.raises(UserError, match=r"perturbed_fraction must be in \(0, 1\], got 0.0") as err:
    validation.check_ranges(config)
  assert "\n" not in str(err.value)
  block.perturbed_fraction = 0.01
  with pytest.raises(UserError, match="holds 4 images, fewer than one batch over the 8 devices"):
    ibau.check(block, config, np.full(8, 100), np.full(4, 1))
