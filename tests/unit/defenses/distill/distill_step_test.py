"""The distillation defense: its step (sharded = single device, terms against a direct forward, frozen teacher),
the defender's subset, the Monitor's resume-aware records and the bad-input errors."""

import os
import tempfile
from unittest import mock

import jax
import numpy as np
import pytest
from absl.testing import absltest
from flax import nnx

from helpers import assert_trees_close, cli_main, config as load
from jaxpurify import encoders, experiments, losses, models, parallel, stages
from jaxpurify.defenses.distill import step as distill
from jaxpurify.defenses.distill import training as defense_stages
from jaxpurify.errors import UserError
from jaxpurify.ssl import simclr
from jaxpurify.train.metrics import read_metrics
from jaxpurify.train.state import TrainState, create_state, make_optimizer

BATCH = 16
TINY_ARCH = "resnet10"  # one block per stage: fewer ops to compile
KEY = jax.random.key(5)
TAPS = ("layer1", "layer2", "layer3", "layer4")


def quick_config(*overrides):
  """configs/distill.py:quick (locked) with `--config.` overrides given as 'key=value'."""
  return load("distill:quick", *overrides)


def tiny(*overrides):
  """Width-4 TINY_ARCH, 8-dim head, batch 16; SGD (Adam would blow float noise in tiny gradients up to lr-sized
  steps)."""
  return quick_config(f"model.name={TINY_ARCH}", "model.width=4", "defense.ssl.head.dim=8",
                      f"defense.ssl.train.batch_size={BATCH}", "defense.ssl.optim.name=sgd",
                      "defense.ssl.optim.lr=0.01", "defense.ssl.optim.momentum=0.9", *overrides)


def setup(config, mesh):
  """-> (student graphdef, student state on `mesh`, teacher Encoder, images): a random student built as
  `initial_student` builds it (SimCLR model of student_model, fresh head) and a random teacher of the suspect's
  architecture."""
  student_config = defense_stages.ssl_config(config, 1, model=defense_stages.student_model(config))
  graphdef, state = create_state(lambda: simclr.build_model(student_config),
                                 make_optimizer(config.defense.ssl.optim), mesh)
  teacher = encoders.build_backbone(defense_stages.teacher_model(config), seed=7)
  images = np.random.default_rng(0).integers(0, 256, (BATCH, 32, 32, 3), np.uint8)
  return graphdef, state, teacher, images


def put(mesh, state, teacher, images):
  """The state (own buffers: it is donated) and the batch on `mesh`."""
  state = jax.device_put(jax.device_get(state), parallel.replicated(mesh))
  batch = {"image": parallel.put_batch(images, mesh),
           "teacher": parallel.put_replicated({"params": teacher.params, "batch_stats": teacher.batch_stats}, mesh)}
  return state, batch


def run_steps(step, state, batch, mesh, num_steps=2):
  """`num_steps` of the jitted, donating `step` with one key -> (host states after each step, host metrics)."""
  states, metrics = [], []
  with jax.set_mesh(mesh):
    for _ in range(num_steps):
      state, m = step(state, batch, KEY)
      states.append(jax.device_get(state))
      metrics.append({k: float(v) for k, v in jax.device_get(m).items()})
  return states, metrics


def direct_forward(config, graphdef, state, teacher, images):
  """(h1, z1, z2, student taps of view 1, teacher feature, teacher taps) of the first step's views (the step's key
  derivation), the student in training mode and the teacher in inference mode, on host."""
  view_base, _ = jax.random.split(KEY)

  @jax.jit
  def forward(params, batch_stats, t_params, t_batch_stats, images):
    x1, x2 = simclr.make_views(jax.random.fold_in(view_base, 0), images, config.defense.ssl.augment,
                               config.model.mean, config.model.std)
    student = nnx.merge(graphdef, params, batch_stats)
    h1, z1, maps1 = student(x1, train=True)
    _, z2, _ = student(x2, train=True)
    h_t, maps_t = nnx.merge(teacher.graphdef, t_params, t_batch_stats)(x1, train=False)
    return h1, z1, z2, maps1, h_t, maps_t

  return jax.device_get(forward(state.params, state.batch_stats, teacher.params, teacher.batch_stats, images))


def reference_terms(config, forward):
  """The first step's terms from direct calls of the losses on `direct_forward`'s outputs: {'nt_xent',
  '<loss>_<tap>' for each non-zero weight, 'clone' if weighted}."""
  h1, z1, z2, maps1, h_t, maps_t = forward
  criteria = {"at": lambda s, t: losses.attention_transfer(s, t, p=2), "cc": losses.correlation_congruence}
  weights, clone = distill.loss_weights(config.defense.loss, TAPS)
  name = config.defense.loss.name
  terms = {"nt_xent": float(losses.nt_xent(z1, z2, config.defense.ssl.simclr.temperature))}
  for tap, weight in weights.items():
    if weight:
      terms[f"{name}_{tap}"] = weight * float(criteria[name](maps1[tap], maps_t[tap]))
  if clone:
    terms["clone"] = clone * float(losses.feature_clone(h1, h_t))
  return terms


class DistillStepTest(absltest.TestCase):
  """Two steps on 1 and on 8 devices from one student, teacher and batch (shared: the losses only change the
  step)."""

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.one = jax.make_mesh((1,), ("data",), devices=jax.devices()[:1])
    cls.eight = jax.make_mesh((8,), ("data",))
    config = tiny()
    cls.graphdef, cls.state0, cls.teacher, cls.images = setup(config, cls.one)
    cls.forward = direct_forward(config, cls.graphdef, cls.state0, cls.teacher, cls.images)

  def step(self, config):
    # SGD, not the recipe's Adam: Adam's first update is about lr * sign(gradient), which turns last-bit
    # differences between the 1- and 8-device gradients of near-zero components into whole steps, and the second
    # step's metrics would compare that noise (seen: l2_grads 7e-4 apart on one CPU). The step is the same code.
    optim = config.defense.ssl.optim.copy_and_resolve_references()
    optim.update(name="sgd", lr=0.1)
    tx = make_optimizer(optim)
    return jax.jit(distill.make_step(self.graphdef, self.teacher.graphdef, tx, config, steps_per_epoch=1, taps=TAPS),
                   donate_argnums=0)

  def check(self, config, expected_terms):
    """-> the jitted single-device step."""
    host0 = jax.device_get(self.state0)
    results, steps = {}, {}
    for name, mesh in (("one", self.one), ("eight", self.eight)):
      state, batch = put(mesh, self.state0, self.teacher, self.images)
      teacher_before = jax.device_get(batch["teacher"])
      steps[name] = self.step(config)
      results[name] = run_steps(steps[name], state, batch, mesh)
      # The frozen teacher: its arrays are neither donated nor changed by the steps.
      self.assertFalse(any(x.is_deleted() for x in jax.tree.leaves(batch["teacher"])))
      jax.tree.map(np.testing.assert_array_equal, jax.device_get(batch["teacher"]), teacher_before)
    (states_1, metrics_1), (states_8, metrics_8) = results["one"], results["eight"]

    # Loss composition: loss = nt_xent + the weighted terms, exactly these terms.
    terms = {k for k in metrics_1[0] if k not in ("loss", "l2_grads", "l2_params", "l2_updates")}
    self.assertEqual(terms, expected_terms)
    for m in metrics_1 + metrics_8:
      np.testing.assert_allclose(m["loss"], sum(m[k] for k in terms), rtol=1e-6)
    # The first step's terms against a direct forward and direct calls of the losses.
    reference = reference_terms(config, self.forward)
    self.assertEqual(set(reference), terms)
    for k, v in reference.items():
      np.testing.assert_allclose(metrics_1[0][k], v, rtol=2e-4, atol=1e-6, err_msg=k)

    # Sharded = single device: every metric of both steps, the whole state after each.
    for m_8, m_1 in zip(metrics_8, metrics_1):
      self.assertEqual(set(m_8), set(m_1))
      for k in m_1:
        np.testing.assert_allclose(m_8[k], m_1[k], rtol=1e-4, atol=1e-5, err_msg=k)
    # rtol 1e-2: on a 2-core AMD EPYC without AVX-512 (2026-12-07) AT's first step left one BatchNorm bias of
    # layer1 2.5e-3 apart (its metrics within 1e-4): the 4-channel tiny model's ReLUs and attention normalisation
    # turn the two runs' float32 sum orders into more than BN's usual 1e-5; a sharding bug moves arrays by O(1).
    for s_8, s_1 in zip(states_8, states_1):
      assert_trees_close((s_8.params, s_8.batch_stats), (s_1.params, s_1.batch_stats), rtol=1e-2)
    # The student trained: the step counts, parameters and BN statistics moved, the loss changed.
    self.assertEqual(int(states_1[1].step), 2)
    self.assertFalse(np.allclose(jax.tree.leaves(states_1[0].params)[0], jax.tree.leaves(host0.params)[0]))
    self.assertFalse(all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(states_1[0].batch_stats),
                                                               jax.tree.leaves(host0.batch_stats))))
    self.assertNotEqual(metrics_1[0]["loss"], metrics_1[1]["loss"])
    return steps["one"]

  def test_attention_transfer(self):
    step = self.check(tiny("defense.loss.name=at"), {f"at_layer{l}" for l in (1, 2, 3, 4)} | {"nt_xent"})
    # The teacher runs in inference mode: its running statistics enter the loss (in training mode they would not).
    state, batch = put(self.one, self.state0, self.teacher, self.images)
    batch["teacher"]["batch_stats"] = jax.tree.map(lambda x: x + 0.5, batch["teacher"]["batch_stats"])
    _, (shifted,) = run_steps(step, state, batch, self.one, num_steps=1)
    state, batch = put(self.one, self.state0, self.teacher, self.images)
    _, (again,) = run_steps(step, state, batch, self.one, num_steps=1)
    self.assertNotEqual(shifted["at_layer1"], again["at_layer1"])
    self.assertEqual(shifted["nt_xent"], again["nt_xent"])  # the student's own term does not see the teacher

  @pytest.mark.extended  # 26 s; the sharded step runs by default with AT (test_attention_transfer)
  def test_correlation_congruence_with_user_weights_and_clone(self):
    # CC pairs neighbouring rows of the batch: sharded, it has to gather them. User weights replace the defaults.
    config = tiny("defense.loss.name=cc", "defense.loss.layer_weights=(1000.0, 0.0, 0.0, 5.0)",
                  "defense.loss.clone_weight=2.0")
    self.check(config, {"nt_xent", "cc_layer1", "cc_layer4", "clone"})


def tiny_vit_ssl_model():
  """The tiny ViT student: 2 blocks, 2 heads, width 4 (D = 8), 16x16 images on a 4x4 patch grid, 8-dim head."""
  rngs = nnx.Rngs(3)
  return models.SSLModel(models.ViT(2, 2, 4, patch=4, image_size=16, rngs=rngs), 0, 8, rngs=rngs)


class ViTStudentStepTest(absltest.TestCase):
  """A ResNet-10 teacher (width 4) distilled into the tiny ViT student on 16x16 images with AT on two grids: the
  student's 4x4 block1 against the teacher's 8x8 layer2 (the teacher's attention pooled), block2 against the 2x2
  layer4 (the student's pooled)."""

  def setUp(self):
    super().setUp()
    self.config = tiny("defense.loss.teacher_taps=('layer2', 'layer4')")
    self.tx = make_optimizer(self.config.defense.ssl.optim)
    self.eight = jax.make_mesh((8,), ("data",))

  def step(self, graphdef, teacher):
    student = nnx.merge(graphdef, *nnx.split(nnx.eval_shape(tiny_vit_ssl_model), nnx.Param, nnx.BatchStat)[1:])
    taps, teacher_taps = defense_stages.compared_taps(self.config, student.backbone, teacher)
    self.assertEqual((taps, teacher_taps), (("block1", "block2"), ("layer2", "layer4")))
    return distill.make_step(graphdef, teacher.graphdef, self.tx, self.config, 1, taps, teacher_taps)

  def test_traces_sharded_over_eight_devices(self):
    # A trace of abstract arrays (no weights, no compile), the batch sharded over 8 devices: the pooled maps keep
    # the explicit batch sharding.
    replicated, rows = (jax.NamedSharding(self.eight, spec) for spec in (jax.P(), jax.P("data")))
    abstract = lambda tree, sharding: jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype,
                                                                                  sharding=sharding), tree)
    graphdef, params, batch_stats = nnx.split(nnx.eval_shape(tiny_vit_ssl_model), nnx.Param, nnx.BatchStat)
    state = TrainState(step=np.int32(0), params=params, batch_stats=batch_stats,
                       opt_state=jax.eval_shape(self.tx.init, params))
    teacher = encoders.Encoder(*nnx.split(nnx.eval_shape(lambda: models.configured_encoder(self.config.model,
                                                                                          nnx.Rngs(7))),
                                          nnx.Param, nnx.BatchStat))
    batch = {"image": jax.ShapeDtypeStruct((BATCH, 16, 16, 3), np.uint8, sharding=rows),
             "teacher": abstract({"params": teacher.params, "batch_stats": teacher.batch_stats}, replicated)}
    with jax.set_mesh(self.eight):
      new_state, metrics = jax.eval_shape(self.step(graphdef, teacher), abstract(state, replicated), batch, KEY)
    self.assertEqual(set(metrics), {"loss", "nt_xent", "at_block1", "at_block2", "l2_grads", "l2_params",
                                    "l2_updates"})
    self.assertEqual(jax.tree.structure(new_state.params), jax.tree.structure(state.params))

  @pytest.mark.extended  # 30 s of compiles; the trace above runs by default
  def test_sharded_equals_single_device_and_terms_pair_the_taps(self):
    one = jax.make_mesh((1,), ("data",), devices=jax.devices()[:1])
    graphdef, state0 = create_state(tiny_vit_ssl_model, self.tx, one)
    teacher = encoders.build_backbone(self.config.model, seed=7)
    images = np.random.default_rng(0).integers(0, 256, (BATCH, 16, 16, 3), np.uint8)
    step = jax.jit(self.step(graphdef, teacher), donate_argnums=0)
    (states_1, metrics_1), (states_8, metrics_8) = (run_steps(step, *put(mesh, state0, teacher, images), mesh)
                                                    for mesh in (one, self.eight))
    h1, z1, z2, maps1, _, maps_t = direct_forward(self.config, graphdef, state0, teacher, images)
    expected = {"nt_xent": losses.nt_xent(z1, z2, self.config.defense.ssl.simclr.temperature),
                "at_block1": 1000 * losses.attention_transfer(maps1["block1"], maps_t["layer2"]),
                "at_block2": 1000 * losses.attention_transfer(maps1["block2"], maps_t["layer4"])}
    self.assertEqual(set(metrics_1[0]) - {"loss", "l2_grads", "l2_params", "l2_updates"}, set(expected))
    for k, v in expected.items():
      np.testing.assert_allclose(metrics_1[0][k], float(v), rtol=2e-4, atol=1e-6, err_msg=k)
    for m_8, m_1 in zip(metrics_8, metrics_1):
      for k in m_1:
        np.testing.assert_allclose(m_8[k], m_1[k], rtol=1e-4, atol=1e-5, err_msg=k)
    for s_8, s_1 in zip(states_8, states_1):
      assert_trees_close((s_8.params, s_8.batch_stats), (s_1.params, s_1.batch_stats))
    self.assertNotEqual(metrics_1[0]["loss"], metrics_1[1]["loss"])


class LossWeightsTest(absltest.TestCase):
  """Which terms a switch weights: the defaults, user weights, and the metrics the traced step reports."""

  def setUp(self):
    super().setUp()

  def metric_keys(self, config):
    """The step's metric names, from a trace (no compile)."""
    student_config = defense_stages.ssl_config(config, 1, model=defense_stages.student_model(config))
    tx = make_optimizer(config.defense.ssl.optim)
    graphdef, params, batch_stats = nnx.split(simclr.build_model(student_config), nnx.Param, nnx.BatchStat)
    state = TrainState(step=np.int32(0), params=params, batch_stats=batch_stats, opt_state=tx.init(params))
    teacher = encoders.build_backbone(defense_stages.teacher_model(config), seed=1)
    batch = {"image": np.zeros((BATCH, 32, 32, 3), np.uint8),
             "teacher": {"params": teacher.params, "batch_stats": teacher.batch_stats}}
    step = distill.make_step(graphdef, teacher.graphdef, tx, config, steps_per_epoch=1, taps=TAPS)
    _, metrics = jax.eval_shape(step, state, batch, jax.random.key(0))
    return set(metrics) - {"loss", "l2_grads", "l2_params", "l2_updates"}

  def test_defaults_and_user_weights(self):
    defaults = lambda name: distill.loss_weights(tiny(f"defense.loss.name={name}").defense.loss, TAPS)
    per_tap = lambda *weights: dict(zip(TAPS, weights))
    for name in ("at", "afd", "fitnet", "cc", "sp"):
      self.assertEqual(defaults(name), (per_tap(1000.0, 1000.0, 1000.0, 1000.0), 0.0), name)
    self.assertEqual(defaults("kd"), (per_tap(1000.0, 0.0, 0.0, 0.0), 0.0))
    self.assertEqual(defaults("clone"), (per_tap(0.0, 0.0, 0.0, 0.0), 1.0))
    user = tiny("defense.loss.name=kd", "defense.loss.layer_weights=(0, 0, 0, 5.0)", "defense.loss.clone_weight=0")
    self.assertEqual(distill.loss_weights(user.defense.loss, TAPS), (per_tap(0.0, 0.0, 0.0, 5.0), 0.0))
    two = tiny("defense.loss.taps=('layer2', 'layer4')")
    self.assertEqual(distill.loss_taps(two.defense.loss, TAPS), ("layer2", "layer4"))
    self.assertEqual(distill.loss_weights(two.defense.loss, ("layer2", "layer4")),
                     ({"layer2": 1000.0, "layer4": 1000.0}, 0.0))

  def test_default_taps_and_their_pairing(self):
    vit, resnet = tuple(f"block{i}" for i in range(1, 13)), TAPS
    loss = tiny().defense.loss
    self.assertEqual(distill.default_taps(vit), ("block3", "block6", "block9", "block12"))
    self.assertEqual(distill.default_taps(("block1", "block2")), ("block1", "block2"))
    self.assertEqual(distill.loss_taps(loss, vit), ("block3", "block6", "block9", "block12"))
    self.assertEqual(distill.loss_taps(loss, resnet), TAPS)
    self.assertEqual(distill.teacher_loss_taps(loss, TAPS, resnet), TAPS)  # one architecture: the same names
    self.assertEqual(distill.teacher_loss_taps(loss, TAPS, vit), ("block3", "block6", "block9", "block12"))
    self.assertEqual(distill.teacher_loss_taps(loss, ("block6", "block12"), resnet), TAPS)
    chosen = tiny("defense.loss.teacher_taps=('layer2', 'layer4')").defense.loss
    self.assertEqual(distill.teacher_loss_taps(chosen, ("block6", "block12"), resnet), ("layer2", "layer4"))

  def test_metrics_of_each_switch(self):
    every = lambda name: {f"{name}_layer{l}" for l in (1, 2, 3, 4)} | {"nt_xent"}
    cases = {("defense.loss.name=kd",): {"nt_xent", "kd_layer1"},  # the official code's quirk: layer1 only
             ("defense.loss.name=clone",): {"nt_xent", "clone"},
             ("defense.loss.name=fitnet", "defense.loss.layer_weights=(0, 0, 0, 5.0)"): {"nt_xent", "fitnet_layer4"},
             ("defense.loss.name=at", "defense.loss.layer_weights=(0, 0, 0, 0)"): {"nt_xent"},
             # AT compares attention maps: a narrower student than the teacher is fine.
             ("defense.loss.name=at", "defense.student.model.width=2"): every("at")}
    for overrides, expected in cases.items():
      self.assertEqual(self.metric_keys(tiny(*overrides)), expected, overrides)

  def test_clone_term_needs_features_of_one_width(self):
    with self.assertRaisesRegex(ValueError, "feature_clone needs features"):
      self.metric_keys(tiny("defense.loss.name=clone", "defense.student.model.width=2"))

  def test_clone_term_with_another_student_width_is_refused_up_front(self):
    for overrides in (("defense.loss.name=clone",), ("defense.loss.name=at", "defense.loss.clone_weight=1.0")):
      with self.assertRaisesRegex(UserError, "clone", msg=overrides):
        experiments.check(quick_config(*overrides, "defense.student.model.width=4"))


class DefenderImagesTest(absltest.TestCase):

  def setUp(self):
    super().setUp()
    self.images = np.arange(200, dtype=np.uint8)[:, None, None, None] * np.ones((1, 2, 2, 3), np.uint8)

  def test_first(self):
    subset = defense_stages.defender_images(quick_config("defense.clean_fraction=0.33"), self.images)
    np.testing.assert_array_equal(subset, self.images[:66])

  def test_random_is_seeded(self):
    draw = lambda seed: defense_stages.defender_images(
        quick_config("defense.clean_fraction=0.33", "defense.subset=random", f"seed={seed}"), self.images)
    subset = draw(1)
    rows = subset[:, 0, 0, 0].tolist()
    self.assertLen(subset, 66)
    self.assertLen(set(rows), 66)  # distinct images
    np.testing.assert_array_equal(subset, self.images[rows])  # whole images, untouched
    np.testing.assert_array_equal(draw(1), subset)
    self.assertNotEqual(draw(2)[:, 0, 0, 0].tolist(), rows)
    self.assertNotEqual(rows, list(range(66)))


class StartingPointTest(absltest.TestCase):

  def test_ssl_training_from_a_given_backbone(self):
    """The fine-tuned teacher and the poisoned_copy student start from the suspect's backbone, fresh head."""
    config = tiny("model.name=resnet18")
    ssl = defense_stages.ssl_config(config, 1)
    mesh = jax.make_mesh((8,), ("data",))
    suspect = encoders.build_backbone(config.model, seed=11)
    images = np.zeros((BATCH, 32, 32, 3), np.uint8)
    with jax.set_mesh(mesh):
      _, fresh, *_ = stages.ssl_training(ssl, images, mesh)
      graphdef, state, *_ = stages.ssl_training(ssl, images, mesh, init_backbone=suspect)
    loaded = encoders.backbone_of(graphdef, state)
    for got, want in ((loaded.params, suspect.params), (loaded.batch_stats, suspect.batch_stats)):
      jax.tree.map(np.testing.assert_array_equal, nnx.to_pure_dict(got), nnx.to_pure_dict(want))
    jax.tree.map(np.testing.assert_array_equal, nnx.to_pure_dict(state.params["head"]),
                 nnx.to_pure_dict(fresh.params["head"]))
    self.assertFalse(np.array_equal(fresh.params["backbone"]["stem_conv"]["kernel"][...],
                                    suspect.params["stem_conv"]["kernel"][...]))


class MonitorTest(absltest.TestCase):
  """Records at multiples of monitor.every_epochs; a restart at an earlier step drops the later records."""

  def setUp(self):
    super().setUp()
    # The evaluation is replaced by the 'state' itself (a number here), so a row tells which state it saw.
    self.enter_context(mock.patch.object(encoders, "backbone_of", lambda graphdef, state: state))
    self.enter_context(mock.patch.object(stages, "encoder_metrics",
                                         lambda encoder, *args, **kwargs: {"acc": float(encoder)}))
    self.path = os.path.join(self.enter_context(tempfile.TemporaryDirectory()), "monitor.jsonl")

  def monitor(self, every_epochs=2):
    config = quick_config(f"defense.monitor.every_epochs={every_epochs}")
    return defense_stages.Monitor(config, None, self.path, steps_per_epoch=3, mesh=None,
                                  backdoor=("digits", None, 1))

  def train(self, monitor, start, stop, offset=0.0):
    """What distill_student and run_steps do: start() with the state at step 0, then after each step."""
    monitor.start(0.0)
    for done in range(start + 1, stop + 1):
      monitor(done, done + offset)

  def rows(self):
    return [(r["step"], r["epoch"], r["acc"]) for r in read_metrics(self.path)]

  def test_records_every_few_epochs(self):
    self.train(self.monitor(), 0, 14)
    self.assertEqual(self.rows(), [(0, 0.0, 0.0), (6, 2.0, 6.0), (12, 4.0, 12.0)])

  def test_restart_from_an_earlier_step_redoes_the_later_records(self):
    self.train(self.monitor(), 0, 13)
    self.train(self.monitor(), 8, 14, offset=0.5)  # resumed from the checkpoint of step 8
    self.assertEqual(self.rows(), [(0, 0.0, 0.0), (6, 2.0, 6.0), (12, 4.0, 12.5)])
    self.train(self.monitor(), 0, 7, offset=0.25)  # no checkpoint: from the start, the step-0 record kept
    self.assertEqual(self.rows(), [(0, 0.0, 0.0), (6, 2.0, 6.25)])

  def test_no_records_when_off(self):
    self.train(self.monitor(every_epochs=0), 0, 14)
    self.assertFalse(os.path.exists(self.path))


class DefenseInputTest(absltest.TestCase):
  """Bad defense settings are refused by experiments.check, before any stage runs."""

  def test_bad_defense_inputs(self):
    cases = {
        ("defense.clean_fraction=0.0",): "config.defense.clean_fraction must be in (0, 1], got 0.0",
        ("defense.clean_fraction=1.5",): "config.defense.clean_fraction must be in (0, 1], got 1.5",
        ("defense.clean_fraction=0.01",): "holds 14 images, fewer than one batch of 64",
        ("defense.subset=last",): "unknown defender subset 'last'",
        ("defense.loss.name=nad",): "unknown distillation loss 'nad'",
        ("defense.loss.layer_weights=(1.0, 1.0, 1.0)",): "has 3 weights for 4 taps (layer1, layer2, layer3, layer4)",
        ("defense.loss.taps=('layer5',)",): "the student encoder has no tap layer5 (its taps: layer1, layer2, layer3, "
                                           "layer4)",
        ("defense.teacher.kind=clean",): "unknown teacher 'clean'",
        ("defense.student.init=pretrained",): "unknown student 'pretrained'",
        ("defense.loss.name=fitnet", "defense.student.model.width=4"): "differ in channels",
        ("defense.loss.name=cc", "defense.student.model.name=resnet50"): "differ in channels",
        # A ResNet-18 teacher (layer1: 8 channels) and a ViT-Tiny student (block3: D = 24), paired by default.
        ("defense.loss.name=fitnet", "defense.student.model.name=vit_tiny"): "the student's block3 (24 channels) and "
                                                                             "the teacher's layer1 (8) differ in "
                                                                             "channels",
        ("defense.student.model.name=vit_tiny", "defense.loss.taps=('block12',)"): "pair in order but differ in number",
        ("defense.loss.taps=('layer1',)", "defense.loss.teacher_taps=('layer9',)"): "the teacher encoder has no tap "
                                                                                    "layer9",
        ("defense.student.model.name=vgg",): "unknown student model 'vgg'",
        ("defense.student.init=poisoned_copy", "defense.student.model.width=16"): "suspect's architecture",
        ("defense.teacher.model.width=16",): "without config.defense.teacher.checkpoint",
        ("defense.suspect_encoder=/nonexistent",): "no checkpoint found at /nonexistent; set "
                                                   "config.defense.suspect_encoder",
        ("defense.teacher.checkpoint=/nonexistent",): "no checkpoint found at /nonexistent; set "
                                                      "config.defense.teacher.checkpoint",
    }
    for overrides, message in cases.items():
      with self.assertRaises(UserError, msg=overrides) as raised:
        experiments.check(quick_config(*overrides))
      self.assertIn(message, str(raised.exception), overrides)
      self.assertNotIn("\n", str(raised.exception), overrides)

  def test_good_defense_inputs(self):
    for overrides in [(), ("defense.loss.name=at", "defense.student.model.width=4"),
                      ("defense.loss.name=sp", "defense.student.model.name=resnet34"),
                      ("defense.student.init=poisoned_copy", "defense.subset=random", "defense.loss.name=kd"),
                      ("defense.clean_fraction=1.0",),
                      ("defense.student.model.name=vit_tiny",),  # AT across grids: 32x32..4x4 against 8x8
                      ("defense.student.model.name=vit_tiny", "defense.loss.name=sp")]:
      experiments.check(quick_config(*overrides))

  def test_main_prints_one_line_exits_2_and_creates_no_workdir(self):
    with tempfile.TemporaryDirectory() as tmp:
      workdir = os.path.join(tmp, "run")
      status, lines, _ = cli_main("--config", "configs/distill.py:quick", "--workdir", workdir,
                                  "--config.defense.loss.name=nad")
      self.assertEqual(status, 2, lines)
      self.assertLen(lines, 1, lines)
      self.assertTrue(lines[0].startswith("error: unknown distillation loss 'nad'"), lines[0])
      self.assertFalse(os.path.exists(workdir))


if __name__ == "__main__":
  absltest.main()
