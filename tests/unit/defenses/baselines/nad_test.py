"""NAD: the weighted attention loss against NumPy, the student step's attention gradient against jax.grad of a
hand-written loss and the student step on 8 devices against 1 (`-m extended`: a ResNet compiled twice), and the
check."""

import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from flax import nnx

from helpers import assert_trees_close
from helpers import config as load_config
from jaxpurify import finetune, parallel
from jaxpurify.defenses.baselines import nad
from jaxpurify.encoders import build_backbone
from jaxpurify.errors import UserError
from jaxpurify.train.state import create_state, make_optimizer

MODEL = ml_collections.ConfigDict(dict(name="resnet10", width=4, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25),
                                       dtype="float32"))
HEAD = ml_collections.ConfigDict(dict(hidden=(16, 8), dropout=0.0))
AUGMENT = ml_collections.ConfigDict(dict(padding=0, flip_prob=0.0))
TAPS, BETAS = ("layer2", "layer3", "layer4"), (500.0, 1000.0, 1000.0)
LR = 1.0


def _numpy_attention(f, p):
  a = np.sum(np.abs(f) ** p, axis=-1)
  return a / (np.sqrt(np.sum(a**2, axis=(1, 2), keepdims=True)) + 1e-6)


def test_attention_loss_is_the_weighted_numpy_formula_on_the_named_taps():
  rng = np.random.default_rng(0)
  shapes = {"layer1": (3, 8, 8, 2), "layer2": (3, 8, 8, 4), "layer3": (3, 4, 4, 6), "layer4": (3, 2, 2, 8)}
  student = {k: rng.normal(size=s).astype(np.float32) for k, s in shapes.items()}
  teacher = {k: rng.normal(size=s[:3] + (s[3] + 1,)).astype(np.float32) for k, s in shapes.items()}
  for power in (2.0, 3.0):
    want = sum(beta * np.mean((_numpy_attention(student[t], power) - _numpy_attention(teacher[t], power)) ** 2)
               for t, beta in zip(TAPS, BETAS))
    got = nad.attention_loss(student, teacher, TAPS, BETAS, power)
    np.testing.assert_allclose(float(got), want, rtol=1e-5)


@functools.lru_cache(maxsize=1)
def _models():
  """(graphdef, tx, a tiny student's TrainState, a teacher's) on the host: SGD at LR without momentum or decay; the
  teacher is the student with every parameter scaled by a random factor in [0.5, 1.5)."""
  tx = make_optimizer(ml_collections.ConfigDict(dict(name="sgd", lr=LR, momentum=0.0, weight_decay=0.0)))
  mesh = jax.make_mesh((1,), ("data",), devices=jax.devices()[:1])
  graphdef, state = create_state(lambda: finetune.build_classifier(build_backbone(MODEL, 0), 3, HEAD, 0), tx, mesh)
  state, rng = jax.device_get(state), np.random.default_rng(2)
  teacher = state.replace(params=jax.tree.map(lambda p: p * rng.uniform(0.5, 1.5, p.shape).astype(p.dtype),
                                              state.params))
  return graphdef, tx, state, teacher


def _batch():
  """8 random 16x16 images and their labels (3 classes), on the host."""
  rng = np.random.default_rng(1)
  return rng.integers(0, 256, (8, 16, 16, 3), dtype=np.uint8), rng.integers(0, 3, 8).astype(np.int32)


def _setup(mesh):
  """The tiny student on `mesh`, NAD's student step (not donating) and the batch with the teacher."""
  graphdef, tx, state, teacher = _models()
  state, teacher = parallel.put_replicated((state, teacher), mesh)
  step = jax.jit(nad.make_student_step(graphdef, tx, AUGMENT, MODEL.mean, MODEL.std, TAPS, BETAS, 2.0))
  images, labels = _batch()
  batch = parallel.put_batch({"image": images, "label": labels}, mesh)
  batch["teacher"] = {"params": teacher.params, "batch_stats": teacher.batch_stats}
  return state, step, batch


def _hand_written_loss(graphdef, params, batch_stats, teacher, images, labels, betas):
  """(CE + A, A), A = Σ_k betas[k] mean((â_s − â_t)²) over TAPS with â = Σ_c F² / (its L2 norm over positions +
  1e-6), the student in training mode and the teacher in inference mode, on images without augmentation."""
  x = (images.astype(jnp.float32) / 255 - 0.5) / 0.25

  def normalised_map(f):
    a = jnp.sum(f * f, axis=-1)
    return a / (jnp.sqrt(jnp.sum(a * a, axis=(1, 2), keepdims=True)) + 1e-6)

  student = nnx.merge(graphdef, params, batch_stats, copy=True)
  feature, student_taps = student.backbone(x, True)
  _, teacher_taps = nnx.merge(graphdef, teacher.params, teacher.batch_stats).backbone(x, False)
  attention = sum(betas[k] * jnp.mean((normalised_map(student_taps[t]) - normalised_map(teacher_taps[t])) ** 2)
                  for k, t in enumerate(TAPS))
  logits = student.head(feature / jnp.linalg.norm(feature, axis=-1, keepdims=True))
  ce = -jnp.mean(jax.nn.log_softmax(logits)[jnp.arange(len(labels)), labels])
  return ce + attention, attention


@pytest.mark.extended  # a ResNet step compiled on 1 and 8 devices (~12 s)
def test_student_step_follows_the_hand_written_loss_and_is_the_same_on_one_and_eight_devices():
  out = []
  for mesh in (jax.make_mesh((1,), ("data",), devices=jax.devices()[:1]), parallel.make_mesh()):
    state, step, batch = _setup(mesh)
    state, metrics = step(state, batch, jax.random.key(0))
    out.append((metrics, jax.device_get((state.params, state.batch_stats))))
  # SGD without momentum or decay: the update is -LR x the gradient of CE + the weighted attention loss
  graphdef, _, start, teacher = _models()
  hand = jax.jit(jax.value_and_grad(functools.partial(_hand_written_loss, graphdef), has_aux=True))
  (total, attention), gradient = hand(start.params, start.batch_stats, teacher, *_batch(), np.asarray(BETAS))
  _, ce_gradient = hand(start.params, start.batch_stats, teacher, *_batch(), np.zeros(3))
  metrics, (params, _) = out[0]
  assert float(metrics["at"]) == pytest.approx(float(attention), rel=1e-4)
  assert float(metrics["loss"]) == pytest.approx(float(total), rel=1e-4)
  assert_trees_close(jax.tree.map(lambda a, b: (a - b) / LR, start.params, params), gradient, rtol=1e-3, atol=1e-5)
  # the attention term is a large part of that gradient, so a wrong attention gradient fails the line above
  attention_gradient = jax.tree.map(jnp.subtract, gradient, ce_gradient)
  assert float(optax.global_norm(attention_gradient)) > 0.2 * float(optax.global_norm(gradient))
  assert float(out[1][0]["loss"]) == pytest.approx(float(metrics["loss"]), rel=1e-4)
  assert_trees_close(out[1][1], out[0][1])


def test_betas_that_do_not_pair_with_the_taps_fail_in_one_line():
  config = load_config("baseline:defense=nad,threat=2,attack=badnets,tiny")
  block = config.baseline.nad
  nad.check(block, config, np.full(8, 100), np.full(8, 10))
  block.betas = (500.0, 1000.0)
  with pytest.raises(UserError, match=r"betas has 2 weights for 3 taps \(layer2, layer3, layer4\)") as err:
    nad.check(block, config, np.full(8, 100), np.full(8, 10))
  assert "\n" not in str(err.value)
  block.betas, block.taps = (1.0,), ("layer9",)
  with pytest.raises(UserError, match="names layer9, not taps of resnet10"):
    nad.check(block, config, np.full(8, 100), np.full(8, 10))
