"""CIFAR ResNets: output shapes, parameter counts against torchvision's, inference vs training BN."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import ml_collections
from absl.testing import absltest, parameterized
from flax import nnx

from jaxpurify.errors import UserError
from jaxpurify.models import build_encoder, build_ssl_model, describe
from jaxpurify.models.batch_norm import BatchNorm


def n_params(build):
  """Parameter count of the module `build()` makes, from an abstract (unallocated) init."""
  return sum(x.size for x in jax.tree.leaves(nnx.state(nnx.eval_shape(build), nnx.Param)))


class ModelsTest(parameterized.TestCase):

  @parameterized.parameters(("resnet18", 8, 64), ("resnet34", 4, 32), ("resnet50", 4, 128))
  def test_shapes(self, name, width, feature_dim):
    model = nnx.eval_shape(lambda: build_encoder(name, width, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(model)
    forward = lambda s, x: nnx.merge(graphdef, s)(x, train=False)
    feature, taps = jax.eval_shape(forward, state, jnp.zeros((2, 32, 32, 3)))
    self.assertEqual(feature.shape, (2, feature_dim))
    expansion = feature_dim // (8 * width)
    self.assertEqual(model.tap_names, ("layer1", "layer2", "layer3", "layer4"))
    self.assertEqual(list(taps), list(model.tap_names))  # in forward order
    self.assertEqual([taps[name].shape for name in model.tap_names],
                     [(2, 32 // 2**i, 32 // 2**i, width * 2**i * expansion) for i in range(4)])
    config = ml_collections.ConfigDict(dict(name=name, width=width))
    self.assertEqual(describe(config, 32), (feature_dim, {name: taps[name].shape[1:] for name in model.tap_names}))

  def test_resnet18_parameter_count_matches_torchvision_cifar_variant(self):
    # torchvision resnet18: 11,689,512 params; minus fc (512*1000 + 1000), minus the 7x7 stem
    # (3*64*49), plus the 3x3 stem (3*64*9) = 11,168,832.
    self.assertEqual(n_params(lambda: build_encoder("resnet18", 64, rngs=nnx.Rngs(0))), 11_168_832)

  def test_resnet50_parameter_count_matches_torchvision_cifar_variant(self):
    # torchvision resnet50: 25,557,032; minus fc (2048*1000 + 1000) and the 7x7 stem, plus 3x3 stem.
    expected = 25_557_032 - 2_049_000 - 3 * 64 * 49 + 3 * 64 * 9
    self.assertEqual(n_params(lambda: build_encoder("resnet50", 64, rngs=nnx.Rngs(0))), expected)

  def test_ssl_head_dims(self):
    cfg = ml_collections.ConfigDict(dict(name="resnet18", width=8, dtype="float32"))
    head = ml_collections.ConfigDict(dict(hidden=0, dim=16))
    model = nnx.eval_shape(lambda: build_ssl_model(cfg, head, seed=0))
    graphdef, state = nnx.split(model)
    forward = lambda s, x: nnx.merge(graphdef, s)(x, train=True)
    feature, projection, _ = jax.eval_shape(forward, state, jnp.ones((4, 32, 32, 3)))
    self.assertEqual((feature.shape, projection.shape), ((4, 64), (4, 16)))
    self.assertEqual(model.head.fc1.kernel.shape, (64, 64))
    self.assertIsNone(model.head.fc1.bias)

  def test_train_mode_updates_batch_stats_eval_mode_does_not(self):
    graphdef, params, stats = nnx.split(build_encoder("resnet18", 4, rngs=nnx.Rngs(0)), nnx.Param, nnx.BatchStat)

    @functools.partial(jax.jit, static_argnums=3)
    def stats_after_call(params, stats, x, train: bool):
      model = nnx.merge(graphdef, params, stats)
      model(x, train=train)
      return nnx.state(model, nnx.BatchStat)

    stats_after = lambda x, train: stats_after_call(params, stats, x, train)
    x = jax.random.normal(jax.random.key(1), (4, 32, 32, 3))
    before = stats["stem_bn"]["mean"][...]
    np.testing.assert_array_equal(stats_after(x, False)["stem_bn"]["mean"][...], before)
    self.assertFalse(np.allclose(stats_after(x, True)["stem_bn"]["mean"][...], before))

  @parameterized.parameters(jnp.float32, jnp.bfloat16)
  def test_batch_norm_is_flax_batch_norm_in_both_modes(self, dtype):
    """models.BatchNorm against nnx.BatchNorm from the same state: outputs and running statistics bitwise equal in
    training and inference mode."""
    make = lambda cls: cls(5, momentum=0.9, epsilon=1e-5, dtype=dtype, rngs=nnx.Rngs(0))
    ours, flax_bn = make(BatchNorm), make(nnx.BatchNorm)
    for bn in (ours, flax_bn):
      bn.scale[...], bn.bias[...] = jnp.arange(1.0, 6.0), jnp.arange(5.0) / 3
      bn.mean[...], bn.var[...] = jnp.full((5,), 0.3), jnp.full((5,), 2.0)
    x = jax.random.normal(jax.random.key(1), (4, 3, 3, 5)) * 3 + 1
    for train in (True, False):
      outputs = []
      for bn in (ours, flax_bn):
        graphdef, state = nnx.split(bn)

        @jax.jit
        def forward(state, x, graphdef=graphdef, train=train):
          model = nnx.merge(graphdef, state)
          return model(x, use_running_average=not train), nnx.state(model, nnx.BatchStat)
        outputs.append(forward(state, x))
      jax.tree.map(np.testing.assert_array_equal, outputs[0], outputs[1])

  def test_training_trace_never_builds_a_tracer_error_message(self):
    """nnx.BatchNorm's indexed store of its statistics reads a tracer's `sharding`, whose AttributeError message
    walks the whole trace (quadratic tracing); our ResNet's training forward traces without one."""
    from jax._src.interpreters import partial_eval  # pylint: disable=g-import-not-at-top
    graphdef, params, stats = nnx.split(build_encoder("resnet18", 4, rngs=nnx.Rngs(0)), nnx.Param, nnx.BatchStat)

    def train_forward(params, stats, x):
      model = nnx.merge(graphdef, params, stats)
      return model(x, train=True)[0], nnx.state(model, nnx.BatchStat)

    x = jnp.zeros((2, 32, 32, 3))
    real = partial_eval.DynamicJaxprTracer._origin_msg
    with absltest.mock.patch.object(partial_eval.DynamicJaxprTracer, "_origin_msg", autospec=True,
                                    side_effect=real) as origin:
      jax.make_jaxpr(train_forward)(params, stats, x)
      self.assertEqual(origin.call_count, 0)
      flax_graphdef, flax_state = nnx.split(nnx.BatchNorm(4, rngs=nnx.Rngs(0)))
      jax.make_jaxpr(lambda state, y: nnx.merge(flax_graphdef, state)(y, use_running_average=False))(
          flax_state, jnp.ones((2, 4)))
      self.assertGreater(origin.call_count, 0)  # the check sees the slow path where it is taken

  def test_unknown_model(self):
    with self.assertRaisesRegex(UserError, "config.model.name"):
      build_encoder("vgg", 8, rngs=nnx.Rngs(0))


if __name__ == "__main__":
  absltest.main()
