"""The training substrate: a sharded step equals the single-device step and traces once, deterministic data."""

import jax
import numpy as np
from absl.testing import absltest
from ml_collections import config_dict

from configs import simclr as simclr_config
from helpers import assert_trees_close
from jaxpurify.data.device import DeviceDataset, epoch_order
from jaxpurify.ssl import simclr
from jaxpurify.train.state import create_state, make_optimizer


def tiny_config():
  config = simclr_config.get_config("quick")
  config.model.update(name="resnet10", width=4)
  config.pretrain.head.dim = 8
  return config


def run_two_steps(config, mesh, images):
  """Two SimCLR steps on `mesh` from the same init and data; returns (losses, final params, last metrics, how
  often the jitted step was traced)."""
  tx = make_optimizer(config.pretrain.optim)
  graphdef, state = create_state(lambda: simclr.build_model(config), tx, mesh)
  dataset = DeviceDataset({"image": images}, mesh, batch_size=16, seed=0)
  inner, traces = simclr.make_step(graphdef, tx, config), []

  def counted(state, batch, key):
    traces.append(1)
    return inner(state, batch, key)

  step = jax.jit(counted, donate_argnums=0)
  key = jax.random.key(3)
  losses = []
  with jax.set_mesh(mesh):
    for i in range(2):
      state, metrics = step(state, dataset.batch(i), key)
      losses.append(float(metrics["loss"]))
  return losses, jax.device_get(state.params), metrics, len(traces)


class TrainTest(absltest.TestCase):

  def test_sharded_step_equals_single_device_step(self):
    config = tiny_config()
    # SGD: parameter differences are lr x gradient differences (Adam would amplify float noise in tiny
    # gradients to a full lr-sized step).
    config.pretrain.optim.update(name="sgd", lr=0.01, momentum=0.9)
    images = np.random.default_rng(0).integers(0, 256, (32, 32, 32, 3), dtype=np.uint8)
    one = jax.make_mesh((1,), ("data",), devices=jax.devices()[:1])
    eight = jax.make_mesh((8,), ("data",))
    losses_1, params_1, _, _ = run_two_steps(config, one, images)
    losses_8, params_8, metrics, traces = run_two_steps(config, eight, images)
    np.testing.assert_allclose(losses_8, losses_1, rtol=1e-4)
    assert_trees_close(params_8, params_1)
    self.assertEqual(set(metrics), {"loss", "l2_grads", "l2_params", "l2_updates"})
    self.assertNotEqual(losses_8[0], losses_8[1])  # the step did update the parameters
    self.assertEqual(traces, 1)  # the second step reused the first one's trace (no retrace on donated state)

  def test_data_order_is_a_function_of_seed_and_epoch(self):
    np.testing.assert_array_equal(epoch_order(1, 2, 50), epoch_order(1, 2, 50))
    self.assertFalse(np.array_equal(epoch_order(1, 2, 50), epoch_order(1, 3, 50)))
    self.assertEqual(sorted(epoch_order(1, 2, 50)), list(range(50)))

  def test_device_dataset_batches_cover_an_epoch_without_repeats(self):
    mesh = jax.make_mesh((8,), ("data",))
    images = np.arange(40, dtype=np.uint8).reshape(40, 1, 1, 1).repeat(3, axis=-1)
    dataset = DeviceDataset({"image": images, "label": np.arange(40, dtype=np.int32)}, mesh, batch_size=16, seed=5)
    self.assertEqual(dataset.steps_per_epoch, 2)  # drop_last: 40 // 16
    seen = [np.asarray(dataset.batch(s)["label"]) for s in range(2)]
    self.assertLen(set(np.concatenate(seen)), 32)
    batch = dataset.batch(0)
    np.testing.assert_array_equal(np.asarray(batch["image"])[:, 0, 0, 0], np.asarray(batch["label"]))
    self.assertEqual(batch["image"].sharding.spec[0], "data")
    self.assertEqual(batch["image"].addressable_shards[0].data.shape, (2, 1, 1, 3))
    np.testing.assert_array_equal(np.asarray(dataset.batch(2)["label"]), dataset.indices(2))

  def test_adamw_decays_weight_matrices_only_and_not_frozen_leaves(self):
    """One AdamW step by hand (optax's bias-corrected first step is lr * g / (|g| + eps), ~ lr * sign(g)) plus the
    decoupled decay lr * wd * p on kernels only: biases, LayerNorm scales, the position embeddings and class token
    get none, and a frozen kernel neither moves nor decays."""
    rng = np.random.default_rng(0)
    shapes = {"fc": {"kernel": (3, 4), "bias": (4,)}, "norm": {"scale": (4,)}, "pos_embed": (1, 5, 4),
              "cls_token": (1, 1, 4), "frozen": {"kernel": (2, 2)}}
    params = jax.tree.map(lambda s: rng.normal(size=s).astype(np.float32), shapes,
                          is_leaf=lambda s: isinstance(s, tuple))
    grads = jax.tree.map(lambda p: rng.normal(size=p.shape).astype(np.float32), params)
    lr, wd = 0.1, 0.5
    trainable = jax.tree_util.tree_map_with_path(lambda path, _: path[0].key != "frozen", params)
    tx = make_optimizer(config_dict.ConfigDict(dict(name="adamw", lr=lr, weight_decay=wd, momentum=0.0)),
                        trainable=trainable)
    updates, _ = tx.update(grads, tx.init(params), params)
    decayed = {("fc", "kernel")}
    for path, update in jax.tree_util.tree_leaves_with_path(updates):
      keys = tuple(k.key for k in path)
      p, g = _leaf(params, keys), _leaf(grads, keys)
      expected = (np.zeros_like(p) if keys[0] == "frozen" else
                  -lr * g / (np.abs(g) + 1e-8) - (lr * wd * p if keys in decayed else 0))
      np.testing.assert_allclose(update, expected, rtol=1e-5, atol=2e-6, err_msg=str(keys))


def _leaf(tree, keys):
  for key in keys:
    tree = tree[key]
  return tree


if __name__ == "__main__":
  absltest.main()
