"""The distillation defense's stages (distillation.md): the defender's clean subset, the teacher, the student's
starting point and the distillation itself, each cached in the workdir like every stage.

The SSL recipe of the defense (config.defense.ssl, a `pretrain`-shaped block: SimCLR, Adam 1e-3, batch 128)
serves the teacher's fine-tuning, the student's warm-up and the NT-Xent term of the distillation.
"""

import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from jaxpurify import encoders, parallel, stages
from jaxpurify.data.device import DeviceDataset
from jaxpurify.defenses.distill import step as distill_step
from jaxpurify.encoders import Encoder
from jaxpurify.train.metrics import MetricWriter, read_metrics
from jaxpurify.train.state import TrainState, make_optimizer

TEACHERS = ("finetuned", "poisoned")
STUDENTS = ("warmup", "random", "poisoned_copy")


def defender_images(config, images: np.ndarray) -> np.ndarray:
  """The defender's clean, unlabelled subset of the pre-training images [N, H, W, 3]: the first
  int(N * clean_fraction) (the official code) or, with subset='random', as many drawn with the seed."""
  defense = config.defense
  count = int(len(images) * defense.clean_fraction)
  if defense.subset == "first":
    return images[:count]
  return images[np.sort(np.random.default_rng(config.seed).permutation(len(images))[:count])]


def ssl_config(config, epochs: int, lr: float | None = None, model=None) -> ml_collections.ConfigDict:
  """`config` with config.defense.ssl (trained `epochs`, at `lr`, on `model` if given) as its `pretrain` block."""
  c = ml_collections.ConfigDict(config.to_dict())
  c.pretrain = config.defense.ssl.to_dict()
  c.pretrain.train.epochs = epochs
  if lr is not None:
    c.pretrain.optim.lr = lr
  if model is not None:
    c.model = model.to_dict()
  return c


def _architecture(config, override) -> ml_collections.ConfigDict:
  model = ml_collections.ConfigDict(config.model.to_dict())
  model.name, model.width = override.name or model.name, override.width or model.width
  return model


def student_model(config) -> ml_collections.ConfigDict:
  """The student's architecture: config.model with config.defense.student.model's name/width where set."""
  return _architecture(config, config.defense.student.model)


def teacher_model(config) -> ml_collections.ConfigDict:
  """The teacher's architecture: the suspect's (config.model) unless config.defense.teacher.model sets another,
  which a teacher checkpoint of another architecture needs."""
  return _architecture(config, config.defense.teacher.model)


def teacher_encoder(run, config, suspect: Encoder, images: np.ndarray, mesh) -> Encoder:
  """The frozen teacher: a checkpoint given in config.defense.teacher.checkpoint, else the suspect encoder as is
  ('poisoned') or fine-tuned with the defense's SSL loss on the defender's images ('finetuned', stage `teacher`)."""
  teacher = config.defense.teacher
  if teacher.checkpoint:
    return encoders.load_backbone(teacher.checkpoint, teacher_model(config), mesh, encoders.FINAL_STAGES,
                                  "config.defense.teacher.checkpoint")
  if teacher.kind == "poisoned":
    return suspect
  finetune = ssl_config(config, teacher.epochs, teacher.lr)
  return encoders.backbone_of(*stages.ssl_stage(run, "teacher", finetune, images, mesh, init_backbone=suspect))


def initial_student(run, config, suspect: Encoder, images: np.ndarray, mesh):
  """-> (graphdef, params, batch_stats) of the student (backbone + projection head) before distillation:
  'random' (fresh), 'warmup' (SSL on the defender's images first, stage `warmup`), 'poisoned_copy' (the
  suspect backbone, fresh head), or config.defense.student.checkpoint's backbone with a fresh head."""
  student = config.defense.student
  c = ssl_config(config, student.warmup_epochs, model=student_model(config))
  if student.init == "warmup" and not student.checkpoint:
    graphdef, state = stages.ssl_stage(run, "warmup", c, images, mesh)
    return graphdef, state.params, state.batch_stats
  init = None
  if student.checkpoint:
    init = encoders.load_backbone(student.checkpoint, c.model, mesh, encoders.FINAL_STAGES,
                                  "config.defense.student.checkpoint")
  elif student.init == "poisoned_copy":
    init = suspect
  graphdef, state, *_ = stages.ssl_training(c, images, mesh, init_backbone=init)
  return graphdef, state.params, state.batch_stats


def purify(run, config, suspect: Encoder, images: np.ndarray, mesh, backdoor) -> tuple[Encoder, Encoder]:
  """The whole defense on the defender's `images`: teacher (stage `teacher`), student (`warmup`), distillation
  (`distill`) -> (teacher, defended backbone)."""
  teacher = teacher_encoder(run, config, suspect, images, mesh)
  student = initial_student(run, config, suspect, images, mesh)
  return teacher, distill_student(run, "distill", config, teacher, student, images, mesh, backdoor)


class Monitor:
  """Every `every` epochs of distillation, the student's acc/asr/asr_all on the attack's downstream set with one
  protocol, appended to `path` (resume-aware, like metrics.jsonl)."""

  def __init__(self, config, graphdef, path: str, steps_per_epoch: int, mesh, backdoor):
    self.config, self.graphdef, self.path, self.mesh, self.backdoor = config, graphdef, path, mesh, backdoor
    self.every_steps = config.defense.monitor.every_epochs * steps_per_epoch
    self.steps_per_epoch, self.writer = steps_per_epoch, None
    dataset = backdoor[0]
    self.train = stages.load_evaluation(config, dataset, "train")
    self.test = stages.load_evaluation(config, dataset, "test")

  def record(self, step: int, state) -> None:
    row = stages.encoder_metrics(encoders.backbone_of(self.graphdef, state), self.config, self.train, self.test,
                                 (self.config.defense.monitor.protocol,), self.mesh, self.backdoor)
    if self.writer is None:
      self.writer = MetricWriter(self.path, resume_step=step)
    self.writer.write(step, {"epoch": step / self.steps_per_epoch, **row})

  def start(self, state) -> None:
    """Records the student before distillation, unless a record of it exists."""
    if self.every_steps and not (os.path.exists(self.path) and read_metrics(self.path)):
      self.record(0, state)

  def __call__(self, step: int, state) -> None:
    if self.writer is None:
      self.writer = MetricWriter(self.path, resume_step=step - 1)
    if self.every_steps and step % self.every_steps == 0:
      self.record(step, state)


def distill_student(run, stage: str, config, teacher: Encoder, student, images: np.ndarray, mesh,
                    backdoor) -> Encoder:
  """Distils `teacher` into `student` ((graphdef, params, batch_stats)) on the defender's images; -> the
  defended backbone. Monitored every config.defense.monitor.every_epochs epochs into <stage>/monitor.jsonl."""
  graphdef = student[0]
  state, step, dataset, batch_fn, num_steps = distill_training(config, teacher, student, images, mesh)

  def train_fn():
    monitor = Monitor(config, graphdef, os.path.join(run.stage_dir(stage), "monitor.jsonl"),
                      dataset.steps_per_epoch, mesh, backdoor)
    monitor.start(state)
    return stages.train(run, stage, state, step, batch_fn, config.defense.ssl.train, num_steps, mesh, config.seed,
                        after_step=monitor)

  state = stages.trained(run, stage, state, num_steps, train_fn, {"examples": dataset.num_examples})
  return encoders.backbone_of(graphdef, state)


def distill_training(config, teacher: Encoder, student, images: np.ndarray, mesh):
  """-> (student state at step 0, jitted donating step, DeviceDataset, batch_fn(step), number of steps) of the
  distillation on uint8 `images` [N, H, W, 3]; the batch carries the frozen teacher's arrays (replicated)."""
  defense = config.defense
  graphdef, params, batch_stats = student
  dataset = DeviceDataset({"image": images}, mesh, defense.ssl.train.batch_size, config.seed)
  num_steps = defense.ssl.train.epochs * dataset.steps_per_epoch
  tx = make_optimizer(defense.ssl.optim, num_steps, dataset.steps_per_epoch)
  state = jax.jit(lambda p, b: TrainState(step=jnp.zeros((), jnp.int32), params=p, batch_stats=b,
                                          opt_state=tx.init(p), extra={}),
                  out_shardings=parallel.replicated(mesh))(params, batch_stats)
  constants = parallel.put_replicated({"teacher": {"params": teacher.params, "batch_stats": teacher.batch_stats}},
                                      mesh)
  taps, teacher_taps = compared_taps(config, nnx.merge(graphdef, params, batch_stats).backbone, teacher)
  step = jax.jit(distill_step.make_step(graphdef, teacher.graphdef, tx, config, dataset.steps_per_epoch, taps,
                                        teacher_taps), donate_argnums=0)
  return state, step, dataset, lambda s: dataset.batch(s) | constants, num_steps


def compared_taps(config, student_backbone, teacher: Encoder) -> tuple[tuple[str, ...], tuple[str, ...]]:
  """-> (the student's taps, the teacher's paired in order) the map losses compare (`distill_step.loss_taps`,
  `distill_step.teacher_loss_taps`)."""
  loss = config.defense.loss
  taps = distill_step.loss_taps(loss, student_backbone.tap_names)
  teacher_taps = nnx.merge(teacher.graphdef, teacher.params, teacher.batch_stats).tap_names
  return taps, distill_step.teacher_loss_taps(loss, taps, teacher_taps)
