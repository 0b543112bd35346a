"""BadEncoder/DRUPE fine-tuning steps, references, CTRL poisoning, clean-encoder checkpoints and the
attacks' bad-input errors."""

import io
import os
import sys
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from absl.testing import absltest

from configs import badencoder as badencoder_config
from configs import common
from configs import drupe as drupe_config
from helpers import assert_trees_close
from jaxpurify import cli, data, encoders, parallel, triggers
from jaxpurify.attacks import ctrl, encoder_finetune, references
from jaxpurify.errors import UserError
from jaxpurify.losses import encoder_attacks
from jaxpurify.ssl import simclr
from jaxpurify.train.state import create_state, make_optimizer


def tiny(config):
  config.model.update(name="resnet10", width=4)
  config.attack.optim.update(name="sgd", lr=0.05, momentum=0.9)
  return config


def attack_setup(mode: str, mesh, steps_per_epoch: int = 4, batch_norm: str = "frozen"):
  """(config, step, state, batch) for one fine-tuning step of a random tiny encoder on `mesh`."""
  config = tiny((badencoder_config if mode == "badencoder" else drupe_config).get_config("quick"))
  config.attack.update(batch_norm=batch_norm, num_references=3 if mode == "drupe" else 1)  # DRUPE's paper count
  clean = encoders.build_backbone(config.model, seed=0)
  clean = encoders.Encoder(clean.graphdef, *parallel.put_replicated((clean.params, clean.batch_stats), mesh))
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (16, 32, 32, 3), np.uint8)
  refs = rng.integers(0, 256, (config.attack.num_references, 32, 32, 3), np.uint8)
  encode = encoders.encode_fn(clean, config.model)
  tx = make_optimizer(config.attack.optim, 8, trainable=encoder_finetune.trainable_mask(clean))
  with jax.set_mesh(mesh):
    batch = {"image": parallel.put_batch(images, mesh),
             "clean_feature": parallel.put_batch(np.asarray(encode(images)), mesh),
             **parallel.put_replicated({"reference": refs, "clean_reference": np.asarray(encode(refs))}, mesh)}
    state = jax.jit(lambda e: encoder_finetune.init_state(e, tx, mode, config.get("drupe")),
                    out_shardings=parallel.replicated(mesh))(clean)
  trigger = triggers.make_trigger(config.attack.trigger, 32)
  step = jax.jit(encoder_finetune.make_step(clean.graphdef, tx, config, steps_per_epoch, trigger))
  return config, clean, step, state, batch


class EncoderFinetuneTest(absltest.TestCase):

  def test_frozen_step_trains_only_convolutions_and_its_loss_matches_a_direct_forward(self):
    mesh = jax.make_mesh((1,), ("data",), devices=jax.devices()[:1])
    config, clean, step, state, batch = attack_setup("badencoder", mesh)
    mask = encoder_finetune.trainable_mask(clean)
    with jax.set_mesh(mesh):
      new, metrics = step(state, batch, jax.random.key(0))
    flat_mask = jax.tree_util.tree_flatten_with_path(mask)[0]
    names = [".".join(str(getattr(k, "key", "")) for k in path) for path, _ in flat_mask]
    self.assertTrue(any("stem_bn.scale" in n for n in names))
    for name, (_, keep), before, after in zip(names, flat_mask, jax.tree.leaves(state.params),
                                              jax.tree.leaves(new.params)):
      self.assertEqual(keep, "bn" not in name.split(".")[-3] and "shortcut.1" not in name, name)
      changed = not np.array_equal(before, after)
      self.assertEqual(changed, keep, name)
    for before, after in zip(jax.tree.leaves(state.batch_stats), jax.tree.leaves(new.batch_stats)):
      np.testing.assert_array_equal(before, after)
    encode = encoders.encode_fn(clean, config.model)
    trigger = triggers.make_trigger(config.attack.trigger, 32)
    images, refs = np.asarray(batch["image"]), np.asarray(batch["reference"])
    f_trig = np.asarray(encode(trigger(images)))
    f_ref = np.asarray(encode(refs))
    unit = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)
    # At step 0 f' = f: L2 = -1 exactly; L0 is the triggered-to-reference similarity of the clean encoder.
    np.testing.assert_allclose(metrics["l2"], -1.0, rtol=1e-5)
    np.testing.assert_allclose(metrics["l0"], -np.mean(unit(f_trig) @ unit(f_ref).T), rtol=1e-4)
    self.assertLess(float(metrics["l1"]), 0.0)

  @pytest.mark.extended  # 12-18 s of CI time on 2 cores; the option is not a default
  def test_clean_statistics_follow_the_shadow_batch_and_feed_the_loss(self):
    mesh = jax.make_mesh((1,), ("data",), devices=jax.devices()[:1])
    config, clean, step, state, batch = attack_setup("badencoder", mesh, batch_norm="clean")
    with jax.set_mesh(mesh):
      new, metrics = step(state, batch, jax.random.key(0))
    # The stem BatchNorm's running statistics: 0.9 old + 0.1 the batch's (biased variance, as Flax keeps it) of the
    # stem convolution's output on the normalised clean shadow images, computed here with lax.conv.
    mean, std = np.asarray(config.model.mean, np.float32), np.asarray(config.model.std, np.float32)
    x = (np.asarray(batch["image"], np.float32) / 255.0 - mean) / std
    kernel = np.asarray(clean.params["stem_conv"]["kernel"])
    h = np.asarray(jax.lax.conv_general_dilated(x, kernel, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                                precision="highest"))
    old = jax.device_get(clean.batch_stats["stem_bn"])
    got = jax.device_get(new.batch_stats["stem_bn"])
    np.testing.assert_allclose(got["mean"], 0.9 * old["mean"] + 0.1 * h.mean((0, 1, 2)), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(got["var"], 0.9 * old["var"] + 0.1 * h.var((0, 1, 2)), rtol=1e-3, atol=1e-5)
    # The loss reads the moved statistics: L2 is no longer -1 at step 0, and L0 is the triggered-to-reference
    # similarity of the step-0 weights under the new statistics.
    moved = encoders.encode_fn(encoders.Encoder(clean.graphdef, clean.params, new.batch_stats), config.model)
    trigger = triggers.make_trigger(config.attack.trigger, 32)
    unit = lambda v: v / np.linalg.norm(v, axis=-1, keepdims=True)
    images, refs = np.asarray(batch["image"]), np.asarray(batch["reference"])
    f_trig, f_ref = np.asarray(moved(trigger(images))), np.asarray(moved(refs))
    np.testing.assert_allclose(metrics["l0"], -np.mean(unit(f_trig) @ unit(f_ref).T), rtol=1e-4)
    self.assertGreater(float(metrics["l2"]), -0.999)

  @pytest.mark.extended  # 54 s; the SimCLR and distillation steps' sharded tests run by default
  def test_sharded_step_equals_single_device_step(self):
    for mode in ("badencoder", "drupe"):
      results = []
      for mesh in (jax.make_mesh((1,), ("data",), devices=jax.devices()[:1]), jax.make_mesh((8,), ("data",))):
        _, _, step, state, batch = attack_setup(mode, mesh)
        with jax.set_mesh(mesh):
          state, metrics = step(state, batch, jax.random.key(1))
          state, metrics = step(state, batch, jax.random.key(1))
        results.append((float(metrics["loss"]), jax.device_get(state.params)))
      (loss_1, params_1), (loss_8, params_8) = results
      np.testing.assert_allclose(loss_8, loss_1, rtol=1e-4, err_msg=mode)
      assert_trees_close(params_8, params_1)

  @pytest.mark.extended  # 20-33 s (two DRUPE steps compiled); the formula itself is checked in losses/
  def test_drupe_step_reads_the_sim_b2b_convention_of_its_config(self):
    mesh = jax.make_mesh((1,), ("data",), devices=jax.devices()[:1])
    config, clean, step, state, batch = attack_setup("drupe", mesh)
    with jax.set_mesh(mesh):
      official = float(step(state, batch, jax.random.key(0))[1]["sim_b2b"])  # traced (config read) here
    config.drupe.sim_b2b_offdiag = True
    tx = make_optimizer(config.attack.optim, 8, trainable=encoder_finetune.trainable_mask(clean))
    offdiag_step = jax.jit(encoder_finetune.make_step(clean.graphdef, tx, config, 4,
                                                      triggers.make_trigger(config.attack.trigger, 32)))
    with jax.set_mesh(mesh):
      offdiag = float(offdiag_step(state, batch, jax.random.key(0))[1]["sim_b2b"])
    # Official: (1 - 1/B) sum(M) / B²; off-diagonal: (sum(M) - B) / (B (B - 1)), M's diagonal being 1.
    b = batch["image"].shape[0]
    sum_m = official * b**2 / (1 - 1 / b)
    np.testing.assert_allclose(offdiag, (sum_m - b) / (b * (b - 1)), rtol=1e-4)

  def test_drupe_costs_update_at_epoch_ends_from_epoch_means(self):
    costs = encoder_attacks.init_drupe_costs(0.1, 0.001)
    state = encoder_finetune.init_state(encoders.build_backbone(tiny(drupe_config.get_config("quick")).model, 0),
                                        make_optimizer(drupe_config.get_config("quick").attack.optim), "drupe",
                                        drupe_config.get_config("quick").drupe)
    good = {"l0": jnp.float32(-0.99), "l1": jnp.float32(-0.95), "l2": jnp.float32(-0.95),
            "sim_b2b": jnp.float32(0.2)}
    epoch = 25
    steps_per_epoch = 3
    state = state.replace(step=jnp.int32((epoch - 1) * steps_per_epoch))
    for i in range(steps_per_epoch):
      extra = encoder_finetune._drupe_epoch_end(state, good, epoch, steps_per_epoch)  # pylint: disable=protected-access
      if i < steps_per_epoch - 1:
        self.assertEqual(float(extra["costs"]["cost"]), float(costs["cost"]))
        np.testing.assert_allclose(extra["sums"]["l0"], -0.99 * (i + 1), rtol=1e-6)
      state = state.replace(step=state.step + 1, extra=extra)
    expected = encoder_attacks.update_drupe_costs(costs, good, epoch)
    np.testing.assert_allclose(state.extra["costs"]["cost"], expected["cost"])
    self.assertGreater(float(state.extra["costs"]["cost"]), 0.1)  # every condition met: the cost rises
    self.assertEqual(float(state.extra["sums"]["l0"]), 0.0)

  def test_shadow_indices_are_a_seeded_fraction(self):
    index = encoder_finetune.shadow_indices(100, 0.2, seed=3)
    self.assertLen(index, 20)
    self.assertLen(set(index.tolist()), 20)
    np.testing.assert_array_equal(index, encoder_finetune.shadow_indices(100, 0.2, seed=3))


def fake_split(labels, num_classes=10, name="digits"):
  images = np.arange(len(labels), dtype=np.uint8)[:, None, None, None] * np.ones((1, 8, 8, 3), np.uint8)
  return data.ImageSplit(images, np.asarray(labels, np.int32), num_classes, name, "train")


class ReferencesAndCtrlTest(absltest.TestCase):

  def test_references_come_from_the_target_class(self):
    split = fake_split([0, 3, 3, 1, 3, 2])
    refs = references.choose(split, target=3, count=2, seed=0)
    self.assertTrue(set(refs[:, 0, 0, 0].tolist()) <= {1, 2, 4})
    self.assertLen(set(refs[:, 0, 0, 0].tolist()), 2)

  def test_typical_references_are_closest_to_the_class_mean_direction(self):
    split = fake_split([3, 0, 3, 3, 3, 1])  # image i holds the value i: features are read back from the pixel
    directions = {0: (1.0, 0.0), 2: (0.0, 1.0), 3: (1.0, 1.0), 4: (2.0, 1.9)}  # class 3's mean direction ~ (1, 1)

    def features(images):
      return np.asarray([directions[int(v)] for v in images[:, 0, 0, 0]], np.float32)

    refs = references.choose(split, target=3, count=2, seed=0, features=features)
    np.testing.assert_array_equal(refs[:, 0, 0, 0], [3, 4])  # cosines to the mean: 1.000, 1.000, 0.71, 0.70
    np.testing.assert_array_equal(references.most_typical(features(split.images[[0, 2, 3, 4]]), 4), [2, 3, 0, 1])

  def test_bad_references(self):
    split = fake_split([0, 3, 3, 1])
    with self.assertRaisesRegex(UserError, "target class 10 is outside digits's 10 classes"):
      references.choose(split, 10, 1, 0)
    with self.assertRaisesRegex(UserError, "has 0 images of target class 5"):
      references.choose(split, 5, 1, 0)
    with tempfile.TemporaryDirectory() as tmp:
      path = os.path.join(tmp, "ref.npz")
      np.savez(path, x=np.zeros((1, 16, 16, 3), np.uint8), y=np.array([3]))
      with self.assertRaisesRegex(UserError, r"holds uint8 \(1, 16, 16, 3\); .* needs uint8 images \[N, 8, 8, 3\]"):
        references.choose(split, 3, 1, 0, reference_file=path)
      np.savez(path, x=np.full((1, 8, 8, 3), 0.5, np.float32))  # floats in [0, 1]: scaled by 255
      np.testing.assert_array_equal(references.choose(split, 3, 1, 0, reference_file=path), np.full((1, 8, 8, 3), 128))
      np.savez(path, x=np.full((1, 8, 8, 3), 7.0))  # floats holding pixel values
      np.testing.assert_array_equal(references.choose(split, 3, 1, 0, reference_file=path), np.full((1, 8, 8, 3), 7))
      for bad in (np.full((1, 8, 8, 3), 2.5), np.full((1, 8, 8, 3), -1.0), np.full((1, 8, 8, 3), 300)):
        np.savez(path, x=bad)
        with self.assertRaisesRegex(UserError, "that are not pixel values"):
          references.choose(split, 3, 1, 0, reference_file=path)
      np.savez(path, x=np.full((1, 8, 8, 3), 7, np.uint8), y=np.array([3]))
      np.testing.assert_array_equal(references.choose(split, 3, 1, 0, reference_file=path), np.full((1, 8, 8, 3), 7))

  def test_ctrl_poisons_the_first_target_images_by_position(self):
    labels = np.array([1, 0, 1, 1, 2, 1, 1, 0, 0, 0] * 10)
    index = ctrl.poison_indices(labels, target=1, ratio=0.03)
    np.testing.assert_array_equal(index, [0, 2, 3])
    images = np.full((100, 32, 32, 3), 128, np.uint8)
    poisoned = ctrl.poison(images, index, triggers.make_trigger(common.trigger("ctrl"), 32))
    changed = np.flatnonzero((poisoned != images).any(axis=(1, 2, 3)))
    np.testing.assert_array_equal(changed, index)
    with self.assertRaisesRegex(UserError, "poison ratio"):
      ctrl.poison_indices(labels, 1, 0.0)


class CleanEncoderTest(absltest.TestCase):

  def test_checkpoint_round_trip_and_architecture_mismatch(self):
    config = simclr_tiny()
    mesh = jax.make_mesh((1,), ("data",), devices=jax.devices()[:1])
    graphdef, state = create_state(lambda: simclr.build_model(config), make_optimizer(config.pretrain.optim), mesh)
    with tempfile.TemporaryDirectory() as tmp:
      mngr = ocp.CheckpointManager(os.path.join(tmp, "pretrain", "ckpt"))
      mngr.save(5, args=ocp.args.StandardSave(state))
      mngr.wait_until_finished()
      mngr.close()
      loaded = encoders.load_backbone(tmp, config.model, mesh)
      expected = encoders.backbone_of(graphdef, state)
      for a, b in zip(jax.tree.leaves((loaded.params, loaded.batch_stats)),
                      jax.tree.leaves((expected.params, expected.batch_stats))):
        np.testing.assert_array_equal(a, b)
      config.model.width = 8
      with self.assertRaisesRegex(UserError, r"another architecture \(\S+ has shape \(4,\), config.model resnet18 "
                                  r"width 8 needs \(8,\)"):
        encoders.load_backbone(tmp, config.model, mesh)
      with self.assertRaisesRegex(UserError, "no checkpoint found"):
        encoders.load_backbone(os.path.join(tmp, "nothing"), config.model, mesh)

  def test_a_suspect_is_a_runs_last_encoder_and_may_be_an_attack_checkpoint(self):
    config = simclr_tiny()
    mesh = jax.make_mesh((1,), ("data",), devices=jax.devices()[:1])
    graphdef, pretrained = create_state(lambda: simclr.build_model(config), make_optimizer(config.pretrain.optim),
                                        mesh)
    attacked = encoders.build_backbone(config.model, seed=3)  # an attack's state holds the backbone itself
    attack_state = encoder_finetune.init_state(attacked, make_optimizer(config.pretrain.optim), "badencoder")
    with tempfile.TemporaryDirectory() as tmp:
      for stage, state in (("pretrain", pretrained), ("attack", attack_state)):
        mngr = ocp.CheckpointManager(os.path.join(tmp, stage, "ckpt"))
        mngr.save(5, args=ocp.args.StandardSave(state))
        mngr.wait_until_finished()
        mngr.close()
      for stages, expected in ((encoders.CLEAN_STAGES, encoders.backbone_of(graphdef, pretrained)),
                               (encoders.FINAL_STAGES, attacked)):
        loaded = encoders.load_backbone(tmp, config.model, mesh, stages)
        for a, b in zip(jax.tree.leaves((loaded.params, loaded.batch_stats)),
                        jax.tree.leaves((expected.params, expected.batch_stats))):
          np.testing.assert_array_equal(a, b)
      with self.assertRaisesRegex(UserError, "set config.defense.suspect_encoder"):
        encoders.load_backbone(os.path.join(tmp, "nothing"), config.model, mesh, encoders.FINAL_STAGES,
                               "config.defense.suspect_encoder")


def simclr_tiny():
  from configs import simclr as simclr_config  # pylint: disable=g-import-not-at-top
  config = simclr_config.get_config("quick")
  config.model.width = 4
  config.pretrain.head.dim = 8
  return config


class AttackInputTest(absltest.TestCase):
  """Bad attack settings stop the run with one line before any training."""

  def error_of(self, argv):
    buf, old = io.StringIO(), sys.stderr
    sys.stderr = buf
    with tempfile.TemporaryDirectory() as tmp:
      try:
        status = cli.main(argv + ["--workdir", os.path.join(tmp, "run")])
        created = os.path.exists(os.path.join(tmp, "run"))
      finally:
        sys.stderr = old
    return status, [line for line in buf.getvalue().splitlines() if line.strip()], created

  def test_bad_attack_inputs(self):
    cases = {
        ("--config", "configs/badencoder.py:quick", "--config.attack.trigger.position=(25, 21)"):
            "does not fit a 32×32 image",
        ("--config", "configs/badencoder.py:quick", "--config.attack.target=12"): "target class 12 is outside digits",
        ("--config", "configs/drupe.py:quick", "--config.attack.num_references=500"): "fewer than the 500 references",
        ("--config", "configs/badencoder.py:quick", "--config.attack.clean_encoder=/nonexistent"):
            "no checkpoint found at /nonexistent",
        ("--config", "configs/ctrl.py:quick", "--config.attack.target=10"): "target class 10 is outside digits",
        ("--config", "configs/badencoder.py:quick", "--config.attack.batch_norm=train"):
            "unknown config.attack.batch_norm 'train'; use one of frozen, clean",
        ("--config", "configs/ctrl.py:quick", "--config.attack.trigger.window=5"): "window",
        ("--config", "configs/drupe.py:quick", "--config.attack.reference_choice=best"):
            "unknown config.attack.reference_choice 'best'; use one of random, typical",
    }
    for argv, message in cases.items():
      status, lines, created = self.error_of(list(argv))
      self.assertEqual(status, 2, argv)
      self.assertLen(lines, 1, (argv, lines))
      self.assertIn(message, lines[0], argv)
      self.assertFalse(created, argv)


if __name__ == "__main__":
  absltest.main()
