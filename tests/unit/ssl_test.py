"""MoCo v2 and BYOL: losses against NumPy, the queue, the momentum update, sharded steps equal single-device ones."""


import jax
import numpy as np
import pytest
from absl.testing import absltest

from configs import byol as byol_config
from configs import moco as moco_config
from helpers import assert_trees_close
from jaxpurify.data.device import DeviceDataset
from jaxpurify.errors import UserError
from jaxpurify.losses import byol_loss, moco_infonce
from jaxpurify.ssl import METHODS, moco
from jaxpurify.train.state import create_state, make_optimizer

BATCH = 16
TINY_ARCH = "resnet10"
NOT_PREDICTOR = lambda path, _: path[0] != "predictor"  # an nnx filter: BYOL's target paths


def unit_rows(x):
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


def moco_reference(q, k, queue, t):
  """Loop over queries: -log(exp(q·k / t) / (exp(q·k / t) + sum_j exp(q·queue_j / t)))."""
  q, k, queue = unit_rows(q.astype(np.float64)), unit_rows(k.astype(np.float64)), queue.astype(np.float64)
  losses = []
  for qi, ki in zip(q, k):
    positive = np.exp(qi @ ki / t)
    losses.append(-np.log(positive / (positive + np.exp(queue @ qi / t).sum())))
  return np.mean(losses)


def byol_reference(p, z):
  """Mean over rows of the squared distance between the unit vectors."""
  p, z = unit_rows(p.astype(np.float64)), unit_rows(z.astype(np.float64))
  return np.mean(np.sum((p - z) ** 2, axis=-1))


def tiny_config(method):
  """Width 4, one block per stage (TINY_ARCH), small heads, a queue of 3 batches.

  SGD: parameter differences are then lr x gradient differences (Adam would blow float noise in tiny
  gradients up to lr-sized steps).
  """
  config = {"moco": moco_config, "byol": byol_config}[method].get_config("quick")
  config.model.update(name=TINY_ARCH, width=4)
  config.pretrain.head.update(hidden=16, dim=8)
  config.pretrain.train.batch_size = BATCH
  config.pretrain.optim.update(name="sgd", lr=0.05, momentum=0.9, schedule="constant")
  if method == "moco":
    config.pretrain.moco.queue_size = 3 * BATCH
  else:
    config.pretrain.byol.predictor_hidden = 16
  return config


def run_two_steps(method, config, tx, graphdef, state, mesh, images):
  """Two steps on `mesh` from `state` -> (host copies of the states before, after 1 and 2 steps, losses, metrics)."""
  dataset = DeviceDataset({"image": images}, mesh, batch_size=BATCH, seed=0)
  step = jax.jit(METHODS[method].make_step(graphdef, tx, config), donate_argnums=0)
  states, losses = [jax.device_get(state)], []
  with jax.set_mesh(mesh):
    for i in range(2):
      state, metrics = step(state, dataset.batch(i), jax.random.key(3))
      states.append(jax.device_get(state))
      losses.append(float(metrics["loss"]))
  return states, losses, metrics


def assert_leaves_close(test, a, b, atol):
  """Elementwise, for arrays computed on one device (the EMA updates)."""
  test.assertEqual(jax.tree.structure(a), jax.tree.structure(b))
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_allclose(x, y, rtol=1e-4, atol=atol)


class LossesTest(absltest.TestCase):

  def setUp(self):
    super().setUp()
    rng = np.random.default_rng(0)
    self.a, self.b = rng.normal(size=(2, 16, 5)).astype(np.float32)
    self.queue = unit_rows(rng.normal(size=(24, 5))).astype(np.float32)

  def test_moco_infonce_matches_reference(self):
    for t in (0.2, 0.07):
      np.testing.assert_allclose(moco_infonce(self.a, self.b, self.queue, t),
                                 moco_reference(self.a, self.b, self.queue, t), rtol=1e-5)

  def test_byol_loss_matches_reference_and_bounds(self):
    np.testing.assert_allclose(byol_loss(self.a, self.b), byol_reference(self.a, self.b), rtol=1e-5)
    np.testing.assert_allclose(byol_loss(self.a, 3 * self.a), 0.0, atol=1e-6)
    np.testing.assert_allclose(byol_loss(self.a, -self.a), 4.0, rtol=1e-6)

  def test_sharded_equals_unsharded_and_targets_get_no_gradient(self):
    mesh = jax.make_mesh((8,), ("data",))
    rows = jax.NamedSharding(mesh, jax.P("data"))
    a, b = jax.device_put(self.a, rows), jax.device_put(self.b, rows)
    with jax.set_mesh(mesh):
      np.testing.assert_allclose(jax.jit(moco_infonce)(a, b, jax.device_put(self.queue, rows), 0.2),
                                 moco_infonce(self.a, self.b, self.queue, 0.2), rtol=1e-6)
      np.testing.assert_allclose(jax.jit(byol_loss)(a, b), byol_loss(self.a, self.b), rtol=1e-6)
    grads = jax.grad(moco_infonce, argnums=(0, 1, 2))(self.a, self.b, self.queue, 0.2)
    self.assertEqual([bool(np.any(g)) for g in grads], [True, False, False])
    grads = jax.grad(byol_loss, argnums=(0, 1))(self.a, self.b)
    self.assertEqual([bool(np.any(g)) for g in grads], [True, False])


class MocoPartsTest(absltest.TestCase):

  def test_enqueue_positions_wrap_around_and_pointer(self):
    queue = np.zeros((6, 2), np.float32)
    keys = lambda v: np.full((2, 2), v, np.float32)
    queue, ptr = moco.enqueue(queue, np.int32(2), keys(1.0))
    np.testing.assert_array_equal(queue[:, 0], [0, 0, 1, 1, 0, 0])
    self.assertEqual(int(ptr), 4)
    queue, ptr = moco.enqueue(queue, ptr, keys(2.0))
    self.assertEqual(int(ptr), 0)  # wrapped
    queue, ptr = moco.enqueue(queue, ptr, keys(3.0))
    np.testing.assert_array_equal(queue[:, 0], [3, 3, 1, 1, 2, 2])
    self.assertEqual(int(ptr), 2)
    with self.assertRaisesRegex(ValueError, "multiple"):
      moco.enqueue(queue, ptr, np.zeros((4, 2), np.float32))

  def test_enqueue_gathers_sharded_keys(self):
    mesh = jax.make_mesh((8,), ("data",))
    keys = np.arange(16, dtype=np.float32).reshape(8, 2)
    queue = jax.device_put(np.zeros((16, 2), np.float32), jax.NamedSharding(mesh, jax.P()))  # as in the state
    keys_sharded = jax.device_put(keys, jax.NamedSharding(mesh, jax.P("data")))
    with jax.set_mesh(mesh):
      queue, ptr = jax.jit(moco.enqueue)(queue, np.int32(8), keys_sharded)
    np.testing.assert_array_equal(queue[8:], keys)
    np.testing.assert_array_equal(queue[:8], 0)
    self.assertEqual(int(ptr), 0)

  def test_momentum_update_formula(self):
    target = {"w": np.array([1.0, 2.0]), "block": {"b": np.array(10.0)}}
    online = {"w": np.array([3.0, -2.0]), "block": {"b": np.array(0.0)}}
    out = moco.momentum_update(target, online, 0.9)
    np.testing.assert_allclose(out["w"], [0.9 * 1 + 0.1 * 3, 0.9 * 2 - 0.1 * 2])
    np.testing.assert_allclose(out["block"]["b"], 9.0)

  def test_queue_must_be_a_multiple_of_the_batch(self):
    config = tiny_config("moco")
    config.pretrain.moco.queue_size = 40
    with self.assertRaisesRegex(UserError, "config.pretrain.moco.queue_size.*config.pretrain.train.batch_size"):
      moco.make_step(None, None, config)


class StepsTest(absltest.TestCase):
  """Each method's step on 1 and on 8 devices; its momentum/EMA target follows the formula over two steps."""

  def setUp(self):
    super().setUp()
    self.images = np.random.default_rng(0).integers(0, 256, (2 * BATCH, 32, 32, 3), dtype=np.uint8)
    self.one = jax.make_mesh((1,), ("data",), devices=jax.devices()[:1])
    self.eight = jax.make_mesh((8,), ("data",))

  def check_sharded_equals_single_device(self, method):
    """Losses of two steps and the whole state after the first agree; returns (config, 8-device states)."""
    config, module = tiny_config(method), METHODS[method]
    tx = make_optimizer(config.pretrain.optim)
    graphdef, state_8 = create_state(lambda: module.build_model(config), tx, self.eight,
                                     lambda s: module.init_extra(config, s))
    # The same initial state on one device, through the host (own buffers: both states get donated).
    state_1 = jax.device_put(jax.device_get(state_8), jax.NamedSharding(self.one, jax.P()))
    states_1, losses_1, _ = run_two_steps(method, config, tx, graphdef, state_1, self.one, self.images)
    states_8, losses_8, metrics = run_two_steps(method, config, tx, graphdef, state_8, self.eight, self.images)
    np.testing.assert_allclose(losses_8, losses_1, rtol=1e-4)
    # After the first step only: a tiny BYOL net amplifies float noise ~1000x in the next gradient.
    assert_trees_close(states_8[1].params, states_1[1].params)
    assert_trees_close(states_8[1].extra, states_1[1].extra)  # MoCo's queue holds forward outputs
    self.assertEqual(set(metrics), {"loss", "l2_grads", "l2_params", "l2_updates"})
    self.assertNotEqual(losses_8[0], losses_8[1])  # the step did update the parameters
    return config, states_8

  def test_moco(self):
    config, (s0, s1, s2) = self.check_sharded_equals_single_device("moco")
    m = config.pretrain.moco.momentum
    # The key encoder moves towards the query encoder from before each step's update.
    assert_leaves_close(self, s1.extra["target_params"], s0.params, atol=1e-7)
    assert_leaves_close(self, s2.extra["target_params"], moco.momentum_update(s0.params, s1.params, m), atol=1e-7)
    # Keys fill the queue in order from 0; what is left is the initial unit-norm noise.
    queue0, queue2 = s0.extra["queue"], s2.extra["queue"]
    self.assertEqual((int(s1.extra["queue_ptr"]), int(s2.extra["queue_ptr"])), (BATCH, 2 * BATCH))
    np.testing.assert_array_equal(queue2[2 * BATCH:], queue0[2 * BATCH:])
    np.testing.assert_array_equal(queue2[:BATCH], s1.extra["queue"][:BATCH])
    self.assertFalse(np.allclose(queue2[:2 * BATCH], queue0[:2 * BATCH]))
    np.testing.assert_allclose(np.linalg.norm(queue2, axis=1), 1.0, rtol=1e-5)

  @pytest.mark.extended  # 29 s; MoCo's sharded step (the same EMA target update) runs by default
  def test_byol(self):
    config, (s0, s1, s2) = self.check_sharded_equals_single_device("byol")
    ema = config.pretrain.byol.ema
    self.assertEqual(set(s0.params), {"backbone", "head", "predictor"})
    self.assertEqual(set(s0.extra["target_params"]), {"backbone", "head"})
    assert_leaves_close(self, s0.extra["target_params"], s0.params.filter(NOT_PREDICTOR), atol=0)
    # The target moves towards the online network after each step's update.
    for before, after in ((s0, s1), (s1, s2)):
      expected = moco.momentum_update(before.extra["target_params"], after.params.filter(NOT_PREDICTOR), ema)
      assert_leaves_close(self, after.extra["target_params"], expected, atol=1e-7)

if __name__ == "__main__":
  absltest.main()
