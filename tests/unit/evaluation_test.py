"""Downstream evaluation against independent NumPy / optax references, on 8 fake devices."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl.testing import absltest
from flax import nnx

from jaxpurify import evaluation, parallel
from jaxpurify.errors import UserError


def knn_reference(bank, bank_labels, queries, num_classes, k, t):
  """BadEncoder's knn_predict, one query at a time, in float64."""
  bank = bank / np.linalg.norm(bank, axis=1, keepdims=True)
  queries = queries / np.linalg.norm(queries, axis=1, keepdims=True)
  preds = []
  for q in queries.astype(np.float64):
    sims = bank @ q
    top = np.argsort(-sims)[:k]
    scores = np.zeros(num_classes)
    for i in top:
      scores[bank_labels[i]] += np.exp(sims[i] / t)
    preds.append(np.argmax(scores))
  return np.array(preds)


def blobs(rng, centers, n):
  """Gaussian blobs around `centers` [C, D]: features [n, D] float32, labels [n]."""
  labels = rng.integers(0, len(centers), n)
  return (centers[labels] + 0.3 * rng.normal(size=(n, centers.shape[1]))).astype(np.float32), labels


def ce_loss(head, x, y):
  return optax.softmax_cross_entropy_with_integer_labels(head(x), y).mean()


def tree_allclose(a, b, **tol):
  for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    np.testing.assert_allclose(np.asarray(u), np.asarray(v), **tol)


class CountingMLP(evaluation.MLPHead):
  traces = 0

  def __call__(self, x, *, rngs=None):
    CountingMLP.traces += 1
    return super().__call__(x, rngs=rngs)


class CountingProbe(evaluation.LinearProbe):
  traces = 0

  def __call__(self, x, *, rngs=None):
    CountingProbe.traces += 1
    return super().__call__(x, rngs=rngs)


class MetricsTest(absltest.TestCase):

  def test_hand_computed(self):
    labels = [0, 1, 2, 0, 1]
    pred_clean = [0, 1, 1, 0, 2]  # 3 of 5 right
    pred_triggered = [0, 0, 2, 1, 0]  # target 0: non-target rows 1, 2, 4 -> hits 1, 4; all rows -> hits 0, 1, 4
    metrics = evaluation.backdoor_metrics(pred_clean, labels, pred_triggered, target=0)
    self.assertEqual(metrics, {"acc": 0.6, "asr": 2 / 3, "asr_all": 0.6})
    self.assertIsInstance(metrics["asr"], float)

  def test_target_class_rows_count_only_in_asr_all(self):
    metrics = evaluation.backdoor_metrics([1, 1, 1, 1], [1, 1, 0, 2], [1, 1, 0, 0], target=1)
    self.assertEqual(metrics, {"acc": 0.5, "asr": 0.0, "asr_all": 0.5})

  def test_clean_only(self):
    self.assertEqual(evaluation.backdoor_metrics(np.array([3, 3]), np.array([3, 2])), {"acc": 0.5})

  def test_triggered_needs_target(self):
    with self.assertRaises(UserError):
      evaluation.backdoor_metrics([0], [0], [0], target=None)


class KnnTest(absltest.TestCase):

  def test_matches_numpy(self):
    rng = np.random.default_rng(0)
    bank, labels = rng.normal(size=(300, 8)).astype(np.float32), rng.integers(0, 5, 300)
    queries = rng.normal(size=(70, 8)).astype(np.float32)
    expected = knn_reference(bank, labels, queries, 5, k=20, t=0.5)
    for mesh in (None, parallel.make_mesh()):  # 70 queries in chunks of 32: the last chunk is padded
      got = evaluation.knn_predict(bank, labels, queries, 5, k=20, t=0.5, chunk_size=32, mesh=mesh)
      self.assertEqual(got.dtype, np.int32)
      np.testing.assert_array_equal(got, expected)

  def test_defaults_match_numpy(self):
    rng = np.random.default_rng(1)
    bank, labels = rng.normal(size=(400, 6)).astype(np.float32), rng.integers(0, 3, 400)
    queries = rng.normal(size=(50, 6)).astype(np.float32)
    np.testing.assert_array_equal(evaluation.knn_predict(bank, labels, queries, 3),
                                  knn_reference(bank, labels, queries, 3, k=200, t=0.5))


class ExtractFeaturesTest(absltest.TestCase):

  def setUp(self):
    super().setUp()
    self.mesh = parallel.make_mesh()
    self.w = np.random.default_rng(0).normal(size=(4 * 4 * 3, 5)).astype(np.float32)
    self.encode = jax.jit(lambda x: x.reshape(x.shape[0], -1).astype(jnp.float32) @ self.w - 100.0)
    self.images = np.random.default_rng(1).integers(0, 256, (37, 4, 4, 3), dtype=np.uint8)

  def test_padded_batches_equal_one_pass(self):
    feats = evaluation.extract_features(self.encode, self.images, 16, self.mesh)  # batches 16, 16, 5 (+11 pad)
    expected = np.array(self.encode(self.images))
    expected /= np.linalg.norm(expected, axis=1, keepdims=True)
    self.assertEqual((feats.shape, feats.dtype), ((37, 5), np.float32))
    np.testing.assert_allclose(feats, expected, rtol=1e-5, atol=1e-6)

  def test_batch_must_divide_by_devices(self):
    with self.assertRaises(UserError):
      evaluation.extract_features(self.encode, self.images, 12, self.mesh)


class MLPHeadTest(absltest.TestCase):

  def setUp(self):
    super().setUp()
    rng = np.random.default_rng(0)
    self.x = rng.normal(size=(50, 6)).astype(np.float32)
    self.y = rng.integers(0, 3, 50)
    self.head = evaluation.MLPHead(6, 3, hidden=(16, 8), dropout=0.0, rngs=nnx.Rngs(params=jax.random.key(0)))

  def test_first_full_batch_step_is_adam_by_hand(self):
    lr = 1e-2
    trained, _ = evaluation.fit_mlp(self.head, self.x, self.y, jax.random.key(1), epochs=1, lr=lr, batch_size=50)
    params = nnx.state(self.head, nnx.Param)
    grads = nnx.state(nnx.grad(ce_loss)(self.head, jnp.asarray(self.x), jnp.asarray(self.y)), nnx.Param)
    # Adam's first step: m_hat = g, v_hat = g^2, so the update is -lr * g / (|g| + eps).
    expected = jax.tree.map(lambda p, g: p - lr * g / (jnp.abs(g) + 1e-8), params, grads)
    tree_allclose(nnx.state(trained, nnx.Param), expected, rtol=1e-5, atol=1e-6)

  def test_matches_python_loop_with_partial_batch(self):
    trained, losses = evaluation.fit_mlp(self.head, self.x, self.y, jax.random.key(1), epochs=2, lr=1e-2,
                                         batch_size=16)
    graphdef, params = nnx.split(self.head)
    tx = optax.adam(1e-2)
    opt_state = tx.init(params)
    epoch_losses = []
    for _ in range(2):
      batch_losses = []
      for start in range(0, 50, 16):  # 16, 16, 16, 2
        x, y = self.x[start:start + 16], self.y[start:start + 16]
        loss, grads = jax.value_and_grad(lambda p: ce_loss(nnx.merge(graphdef, p), x, y))(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        batch_losses.append(float(loss) * len(x))
      epoch_losses.append(sum(batch_losses) / 50)
    tree_allclose(nnx.state(trained), params, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(losses, epoch_losses, rtol=1e-5)

  def test_traces_once_across_calls(self):
    heads = [CountingMLP(6, 3, hidden=(16, 8), dropout=0.5, rngs=nnx.Rngs(params=jax.random.key(i)))
             for i in range(2)]
    evaluation.predict(evaluation.fit_mlp(heads[0], self.x, self.y, jax.random.key(0), epochs=2)[0], self.x)
    traces = CountingMLP.traces
    trained, _ = evaluation.fit_mlp(heads[1], self.x + 1, self.y, jax.random.key(1), epochs=2, lr=3e-4)
    evaluation.predict(trained, self.x)
    self.assertGreater(traces, 0)
    self.assertEqual(CountingMLP.traces, traces)

  def test_dropout_depends_on_key(self):
    head = evaluation.MLPHead(6, 3, hidden=(16, 8), rngs=nnx.Rngs(params=jax.random.key(0)))
    fit = [evaluation.fit_mlp(head, self.x, self.y, jax.random.key(k), epochs=1, batch_size=8)[0] for k in (1, 1, 2)]
    kernels = [np.asarray(h.fc1.kernel[...]) for h in fit]
    np.testing.assert_array_equal(kernels[0], kernels[1])
    self.assertFalse(np.allclose(kernels[0], kernels[2]))


class LinearProbeTest(absltest.TestCase):

  def setUp(self):
    super().setUp()
    rng = np.random.default_rng(0)
    self.x = rng.normal(size=(40, 5)).astype(np.float32)
    self.y = rng.integers(0, 3, 40)
    self.probe = evaluation.LinearProbe(self.x, 3, rngs=nnx.Rngs(params=jax.random.key(0)))

  def test_matches_torch_style_sgd_loop(self):
    lr, momentum, batch = 0.1, 0.9, 16
    trained, losses = evaluation.fit_linear(self.probe, self.x, self.y, jax.random.key(1), epochs=3, lr=lr,
                                            milestones=(1, 2), batch_size=batch, shuffle=False)
    z = self.x / np.linalg.norm(self.x, axis=1, keepdims=True)
    z = (z - z.mean(0)) / z.std(0)
    w, b = np.asarray(self.probe.fc.kernel[...]), np.asarray(self.probe.fc.bias[...])
    buf_w, buf_b = np.zeros_like(w), np.zeros_like(b)

    def loss(w, b, x, y):
      return optax.softmax_cross_entropy_with_integer_labels(x @ w + b, y).mean()

    for epoch in range(3):
      epoch_lr = lr * 0.1 ** epoch  # decays at the start of epochs 1 and 2
      for start in range(0, 40, batch):  # 16, 16, 8
        gw, gb = jax.grad(loss, argnums=(0, 1))(w, b, z[start:start + batch], self.y[start:start + batch])
        buf_w, buf_b = momentum * buf_w + gw, momentum * buf_b + gb
        w, b = w - epoch_lr * buf_w, b - epoch_lr * buf_b
    np.testing.assert_allclose(trained.fc.kernel[...], w, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(trained.fc.bias[...], b, rtol=1e-4, atol=1e-6)
    self.assertEqual(losses.shape, (3,))

  def test_shuffle_is_deterministic_in_key(self):
    fit = [evaluation.fit_linear(self.probe, self.x, self.y, jax.random.key(k), epochs=2, batch_size=8)[0]
           for k in (1, 1, 2)]
    kernels = [np.asarray(p.fc.kernel[...]) for p in fit]
    np.testing.assert_array_equal(kernels[0], kernels[1])
    self.assertFalse(np.allclose(kernels[0], kernels[2]))

  def test_traces_once_across_calls(self):
    probes = [CountingProbe(self.x + i, 3, rngs=nnx.Rngs(params=jax.random.key(i))) for i in range(2)]
    evaluation.fit_linear(probes[0], self.x, self.y, jax.random.key(0), epochs=2)
    traces = CountingProbe.traces
    evaluation.fit_linear(probes[1], self.x, self.y, jax.random.key(1), epochs=2, lr=0.05, momentum=0.5)
    self.assertGreater(traces, 0)
    self.assertEqual(CountingProbe.traces, traces)


class EvaluateTest(absltest.TestCase):
  """Every protocol separates Gaussian blobs; a trigger that moves features to the target blob scores ASR 1."""

  def setUp(self):
    super().setUp()
    rng = np.random.default_rng(0)
    self.centers = rng.normal(size=(4, 16)).astype(np.float32)
    self.train = blobs(rng, self.centers, 200)
    self.test = blobs(rng, self.centers, 100)
    self.triggered = (self.centers[2] + 0.3 * rng.normal(size=(100, 16))).astype(np.float32)

  def check(self, protocol, mesh=None, **kwargs):
    metrics = evaluation.evaluate(protocol, *self.train, *self.test, 4, jax.random.key(0),
                                  triggered_test_feats=self.triggered, target=2, mesh=mesh, **kwargs)
    self.assertEqual({k: metrics[k] for k in ("acc", "asr", "asr_all")}, {"acc": 1.0, "asr": 1.0, "asr_all": 1.0})
    return metrics

  def test_mlp(self):
    key = jax.random.key(0)
    head, losses = evaluation.train_mlp(*self.train, 4, key, hidden=(64, 32), epochs=20, lr=1e-3)
    self.assertEqual(evaluation.backdoor_metrics(evaluation.predict(head, self.train[0]), self.train[1]),
                     {"acc": 1.0})
    self.assertLess(losses[-1], losses[0])
    metrics = self.check("mlp", hidden=(64, 32), epochs=20, lr=1e-3)
    self.assertAlmostEqual(metrics["loss"], float(losses[-1]), places=5)

  def test_linear(self):
    probe, _ = evaluation.train_linear(*self.train, 4, jax.random.key(0), epochs=5, milestones=(3,))
    self.assertEqual(evaluation.backdoor_metrics(evaluation.predict(probe, self.train[0]), self.train[1]),
                     {"acc": 1.0})
    self.check("linear", mesh=parallel.make_mesh(), epochs=5, milestones=(3,))

  def test_knn(self):
    self.assertNotIn("loss", self.check("knn", k=20, t=0.1))

  def test_clean_only(self):
    self.assertEqual(set(evaluation.evaluate("knn", *self.train, *self.test, 4, jax.random.key(0))), {"acc"})

  def test_unknown_protocol(self):
    with self.assertRaisesRegex(UserError, "unknown evaluation protocol"):
      evaluation.evaluate("svm", *self.train, *self.test, 4, jax.random.key(0))


if __name__ == "__main__":
  absltest.main()
