"""The distillation defense (Han et al.; docs/distillation.md): a suspect encoder (clean -> BadEncoder/DRUPE here,
or config.defense.suspect_encoder) purified by distilling a teacher into a student on a little clean, unlabelled
data. Rows clean, poisoned, teacher (when not the suspect) and defended; the monitored student in distill.png.
Stages: pretrain, attack, teacher, warmup, distill, evaluate.

`ablate` runs the comparison grid of teachers x students x losses (`python -m jaxpurify.ablate`).
"""

import itertools
import os

import jax

from jaxpurify import encoders, experiments, models, parallel, plots, stages
from jaxpurify import plan as cost
from jaxpurify.data import catalog, synthetic
from jaxpurify.defenses.distill import step as distill_step
from jaxpurify.defenses.distill import training
from jaxpurify.errors import UserError
from jaxpurify.evaluation import PROTOCOLS
from jaxpurify.experiments import encoder_attack, pretrain
from jaxpurify.losses.distillation import grids_match
from jaxpurify.pipeline import Run, config_value, derived_config, link_stages
from jaxpurify.ssl import METHODS
from jaxpurify.train.metrics import read_metrics

ABLATION_NAME = "ablation"


def check(config) -> None:
  """The attack's settings (unless a suspect encoder is given), then the defense's: subset, loss switch and its
  taps, teacher and student kinds and architectures, monitor, checkpoints."""
  encoder_attack.check(config)
  defense, mesh = config.defense, parallel.make_mesh(config.mesh)
  if defense.subset not in ("first", "random"):
    raise UserError(f"unknown defender subset {defense.subset!r}; set config.defense.subset to 'first' or 'random'")
  count = int(len(stages.load_data(config, config.data.name, config.data.split).images) * defense.clean_fraction)
  if count < defense.ssl.train.batch_size:
    raise UserError(f"the defender's subset holds {count} images, fewer than one batch of "
                    f"{defense.ssl.train.batch_size}; raise config.defense.clean_fraction or lower "
                    "config.defense.ssl.train.batch_size")
  if defense.ssl.method not in METHODS:
    raise UserError(f"unknown self-supervised method {defense.ssl.method!r}; set config.defense.ssl.method to one "
                    f"of {', '.join(METHODS)}")
  if defense.loss.name not in distill_step.SWITCHES:
    raise UserError(f"unknown distillation loss {defense.loss.name!r}; set config.defense.loss.name to one of "
                    f"{', '.join(distill_step.SWITCHES)}")
  if defense.teacher.kind not in training.TEACHERS:
    raise UserError(f"unknown teacher {defense.teacher.kind!r}; set config.defense.teacher.kind to one of "
                    f"{', '.join(training.TEACHERS)}")
  if defense.student.init not in training.STUDENTS:
    raise UserError(f"unknown student {defense.student.init!r}; set config.defense.student.init to one of "
                    f"{', '.join(training.STUDENTS)}")
  student, teacher = training.student_model(config), training.teacher_model(config)
  for what, model in (("student", student), ("teacher", teacher)):
    models.check_name(model.name, f"config.defense.{what}.model.name", f"{what} model")
  _check_taps(config, student, teacher)
  if defense.monitor.every_epochs and defense.monitor.protocol not in PROTOCOLS:
    raise UserError(f"unknown monitor protocol {defense.monitor.protocol!r}; set config.defense.monitor.protocol to "
                    f"one of {', '.join(PROTOCOLS)}")
  if defense.student.init == "poisoned_copy" and not defense.student.checkpoint and (
      (student.name, student.width) != (config.model.name, config.model.width)):
    raise UserError("student 'poisoned_copy' starts from the suspect encoder, so config.defense.student.model must "
                    "be the suspect's architecture (config.model)")
  if (defense.teacher.model.name or defense.teacher.model.width) and not defense.teacher.checkpoint:
    raise UserError("config.defense.teacher.model describes a teacher checkpoint; without "
                    "config.defense.teacher.checkpoint the teacher is the suspect encoder (config.model)")
  for path, model, field in ((defense.suspect_encoder, config.model, "suspect_encoder"),
                             (defense.teacher.checkpoint, teacher, "teacher.checkpoint"),
                             (defense.student.checkpoint, student, "student.checkpoint")):
    if path:
      encoders.load_backbone(path, model, mesh, encoders.FINAL_STAGES, f"config.defense.{field}")


def _check_taps(config, student, teacher) -> None:
  """The compared taps exist in their encoders and pair up one to one, one weight each; channels equal and grids
  dividing one another where the loss needs it; feature sizes equal where the clone term compares them."""
  loss, size = config.defense.loss, config.data.image_size
  (student_dim, student_shapes), (teacher_dim, teacher_shapes) = (models.describe(student, size),
                                                                  models.describe(teacher, size))
  taps = distill_step.loss_taps(loss, tuple(student_shapes))
  teacher_taps = distill_step.teacher_loss_taps(loss, taps, tuple(teacher_shapes))
  for what, field, wanted, known in (("student", "taps", taps, student_shapes),
                                     ("teacher", "teacher_taps", teacher_taps, teacher_shapes)):
    if missing := [tap for tap in wanted if tap not in known]:
      raise UserError(f"the {what} encoder has no tap {', '.join(missing)} (its taps: {', '.join(known)}); set "
                      f"config.defense.loss.{field} to taps of the {what}")
  if len(teacher_taps) != len(taps):
    raise UserError(f"the student's taps ({', '.join(taps)}) and the teacher's ({', '.join(teacher_taps)}) pair in "
                    "order but differ in number; set config.defense.loss.taps and config.defense.loss.teacher_taps to "
                    "lists of one length")
  if loss.layer_weights is not None and len(loss.layer_weights) != len(taps):
    raise UserError(f"config.defense.loss.layer_weights has {len(loss.layer_weights)} weights for {len(taps)} taps "
                    f"({', '.join(taps)}): give one per tap")
  tap_weights, clone_weight = distill_step.loss_weights(loss, taps)
  switch = distill_step.SWITCHES[loss.name]
  for tap, teacher_tap in zip(taps, teacher_taps):
    if not tap_weights[tap]:
      continue
    s_shape, t_shape = student_shapes[tap], teacher_shapes[teacher_tap]
    if switch.same_channels and s_shape[-1] != t_shape[-1]:
      raise UserError(f"loss {loss.name!r} compares maps channel by channel, but the student's {tap} ({s_shape[-1]} "
                      f"channels) and the teacher's {teacher_tap} ({t_shape[-1]}) differ in channels (student "
                      f"{student.name} width {student.width}, teacher {teacher.name} width {teacher.width}); use loss "
                      "'at' or 'sp', or taps of equal channels")
    if not switch.any_grid and not grids_match((1, *s_shape), (1, *t_shape)):
      raise UserError(f"loss {loss.name!r} compares the student's {tap} on a {s_shape[0]}x{s_shape[1]} grid with the "
                      f"teacher's {teacher_tap} on {t_shape[0]}x{t_shape[1]}, and neither grid divides the other; pair "
                      "other taps (config.defense.loss.taps, teacher_taps) or use loss 'sp'")
  if clone_weight and student_dim != teacher_dim:
    raise UserError(f"the clone term (config.defense.loss.clone_weight) compares final features, but the student's "
                    f"have {student_dim} dimensions and the teacher's {teacher_dim}; set the clone weight to 0 or use "
                    "students of the teacher's feature size")


def run(run, mesh) -> dict:
  """suspect encoder (clean -> BadEncoder/DRUPE, or a checkpoint) -> teacher -> student -> distillation ->
  evaluate clean, poisoned, teacher and defended; plots the monitored student in distill.png."""
  config, defense = run.config, run.config.defense
  backdoor = encoder_attack.backdoor(config)
  rows = {}
  if defense.suspect_encoder:
    suspect = encoders.load_backbone(defense.suspect_encoder, config.model, mesh, encoders.FINAL_STAGES,
                                     "config.defense.suspect_encoder")
  else:
    rows["clean"] = stages.clean_encoder(run, config, mesh, config.attack.clean_encoder)
    suspect = stages.attack_encoder(run, "attack", config, rows["clean"], mesh)
  rows["poisoned"] = suspect
  split = stages.load_data(config, config.data.name, config.data.split)
  images = training.defender_images(config, split.images)
  teacher, defended = training.purify(run, config, suspect, images, mesh, backdoor)
  if teacher is not suspect:
    rows["teacher"] = teacher
  rows["defended"] = defended
  evaluations = stages.evaluate_encoders(run, "evaluate", rows, config, mesh, backdoor)
  records = os.path.join(run.workdir, "distill", "monitor.jsonl")
  if jax.process_index() == 0 and os.path.exists(records):
    plots.plot_defense_curve(read_metrics(records), os.path.join(run.workdir, "distill.png"),
                             f"{defense.loss.name} distillation, {config.attack.mode} on {config.attack.downstream} "
                             f"({config.defense.monitor.protocol} monitor)")
  return evaluations


def bench_step(config, mesh):
  """The distillation step: a random student and teacher of the configured architectures, synthetic images."""
  ssl = config.defense.ssl
  images = synthetic.images(synthetic.BENCH_BATCHES * ssl.train.batch_size, config.data.image_size)
  teacher = parallel.put_replicated(encoders.build_backbone(training.teacher_model(config), config.seed), mesh)
  student_config = training.ssl_config(config, ssl.train.epochs, model=training.student_model(config))
  graphdef, student, *_ = stages.ssl_training(student_config, images, mesh)
  state, step, _, batch_fn, _ = training.distill_training(
      config, teacher, (graphdef, student.params, student.batch_stats), images, mesh)
  return state, step, batch_fn, ssl.train.batch_size, "2 student views (trained) and 1 teacher view (inference) each"


def plan(config) -> list:
  """pretrain and attack (unless a suspect or clean encoder is given), teacher, warm-up, distillation, then the
  evaluation's features of the clean, poisoned, teacher and defended encoders."""
  defense = config.defense
  first = [] if defense.suspect_encoder else encoder_attack.plan(config)[:-1]
  count = int(catalog.split_size(config.data.name, config.data.split) * defense.clean_fraction)
  middle = []
  if defense.teacher.kind == "finetuned" and not defense.teacher.checkpoint:
    middle.append(pretrain.pretrain_stage(training.ssl_config(config, defense.teacher.epochs, defense.teacher.lr),
                                          "teacher", count))
  if defense.student.init == "warmup" and not defense.student.checkpoint:
    middle.append(pretrain.pretrain_stage(training.ssl_config(config, defense.student.warmup_epochs,
                                                              model=training.student_model(config)), "warmup", count))
  per_epoch = count // defense.ssl.train.batch_size
  middle.append(cost.bench_stage("distill", defense.ssl.train.epochs * per_epoch, config))
  teacher_row = defense.teacher.kind == "finetuned" or bool(defense.teacher.checkpoint)
  rows = (1 if defense.suspect_encoder else 2) + teacher_row + 1  # (clean,) poisoned, (teacher,) defended
  return first + middle + [cost.evaluation_stage(config, rows=rows, backdoor=config.attack.downstream)]


def teachers(config) -> dict[str, dict]:
  """The four teachers: label -> overrides. Two teacher kinds, and the fine-tuned teacher (ResNet-18) distilled
  into students of other architectures (AT and SP compare maps of any channel count)."""
  width = config.model.width
  return {"finetuned": {"defense.teacher.kind": "finetuned"},
          "poisoned": {"defense.teacher.kind": "poisoned"},
          "finetuned->resnet34": {"defense.teacher.kind": "finetuned", "defense.student.model.name": "resnet34"},
          f"finetuned->width{2 * width}": {"defense.teacher.kind": "finetuned",
                                           "defense.student.model.width": 2 * width}}


STUDENTS = {"warmup": {"defense.student.init": "warmup"}, "random": {"defense.student.init": "random"},
            "poisoned_copy": {"defense.student.init": "poisoned_copy"}}
LOSSES = {name: {"defense.loss.name": name} for name in ("at", "afd", "fitnet", "cc", "kd", "clone", "sp")}
LOSSES["at+clone"] = {"defense.loss.name": "at", "defense.loss.clone_weight": 1.0}


def cells(config, grid: str) -> dict[str, dict]:
  """label 'teacher/student/loss' -> overrides; the base cell (the config's own settings) first."""
  axes = [teachers(config), STUDENTS, LOSSES]
  base = (_base_label(config, axes[0]), config.defense.student.init,
          config.defense.loss.name + ("+clone" if config.defense.loss.clone_weight else ""))
  combos = [base]
  if grid == "full":
    combos += list(itertools.product(*axes))
  else:
    for axis, options in enumerate(axes):
      combos += [base[:axis] + (option,) + base[axis + 1:] for option in options]
  out = {}
  for combo in combos:
    overrides = {}
    for axis, option in zip(axes, combo):
      if option not in axis:
        raise UserError(f"the base config's setting {option!r} is not on the grid ({', '.join(axis)})")
      overrides.update(axis[option])
    out.setdefault("/".join(combo), overrides)
  return out


def _base_label(config, options) -> str:
  for label, overrides in options.items():
    if all(config_value(config, k) == v for k, v in overrides.items()) and not config.defense.student.model.name \
        and not config.defense.student.model.width:
      return label
  return config.defense.teacher.kind


def shared_stages(base, cell) -> list[str]:
  """Stages of the base run whose inputs the cell's config leaves unchanged."""
  shared = ["pretrain", "attack"]
  if cell.defense.teacher.to_dict() == base.defense.teacher.to_dict():
    shared.append("teacher")
  if cell.defense.student.to_dict() == base.defense.student.to_dict():
    shared.append("warmup")
  return shared


def run_grid(config, workdir: str, grid: str) -> list[dict]:
  """Runs (or resumes) every cell; -> one row per cell with the defended encoder's numbers and deltas."""
  rows, base_dir = [], None
  grid_cells = {label: derived_config(config, overrides) for label, overrides in cells(config, grid).items()}
  for cell in grid_cells.values():  # every cell validated before the first one runs
    experiments.check(cell)
  for label, cell in grid_cells.items():
    cell_dir = os.path.join(workdir, label.replace("/", "__").replace(">", ""))
    if base_dir is None:
      base_dir = cell_dir
    else:
      Run(cell, cell_dir)  # claims the workdir (config.json) before the links go in
      link_stages(base_dir, cell_dir, shared_stages(config, cell))
    print(f"\n=== {label} ({cell_dir})", flush=True)
    evaluations = experiments.run(cell, cell_dir)
    dataset = cell.attack.downstream
    teacher, student, loss = label.split("/")
    defended, poisoned = evaluations[f"defended/{dataset}"], evaluations[f"poisoned/{dataset}"]
    rows.append({"cell": label, "teacher": teacher, "student": student, "loss": loss,
                 "poisoned_acc": poisoned["acc"], "poisoned_asr": poisoned["asr"],
                 "acc": defended["acc"], "asr": defended["asr"], "asr_all": defended["asr_all"],
                 "delta_acc": defended["acc"] - poisoned["acc"], "delta_asr": defended["asr"] - poisoned["asr"]})
  return rows


def table(rows: list[dict]) -> str:
  """Markdown: one line per cell, values in %."""
  lines = ["| teacher | student | loss | defended acc | defended asr | asr_all | Δacc | Δasr |",
           "|---|---|---|---|---|---|---|---|"]
  for r in rows:
    lines.append(f"| {r['teacher']} | {r['student']} | {r['loss']} | {100 * r['acc']:.2f} | {100 * r['asr']:.2f} | "
                 f"{100 * r['asr_all']:.2f} | {100 * r['delta_acc']:+.2f} | {100 * r['delta_asr']:+.2f} |")
  first = rows[0]
  lines.append(f"\nUndefended (poisoned) encoder: acc {100 * first['poisoned_acc']:.2f}, "
               f"asr {100 * first['poisoned_asr']:.2f}. The first row is the base cell.")
  return "\n".join(lines)


def ablate(config, workdir: str, grid: str) -> tuple[list[dict], str, str]:
  """The comparison grid ('oat' or 'full') -> (rows, Markdown table, title)."""
  rows = run_grid(config, workdir, grid)
  return rows, table(rows), f"Distillation defense: {grid} grid"
