"""A run in a workdir: its identity (config.json), its stages (one subfolder each) and its results.

A stage is finished when its `done.json` exists; a finished stage is never recomputed. Only process 0
writes files.
"""

import contextlib
import fcntl
import json
import os
import shutil
import socket

import jax
import ml_collections

from jaxpurify.errors import UserError


def _flatten(d: dict, prefix: str = "") -> dict:
  out = {}
  for k, v in d.items():
    if isinstance(v, dict):
      out.update(_flatten(v, f"{prefix}{k}."))
    else:
      out[f"{prefix}{k}"] = v
  return out


def _computes_in_float32(value) -> bool:
  from jaxpurify.models import compute_dtype  # pylint: disable=g-import-not-at-top  (keeps this module light)
  return compute_dtype(value) == "float32"


def _unread_by_earlier_runs(value) -> bool:
  del value
  return True


def _is_unset(value) -> bool:
  return value is None


# Keys that configs gained after runs were made, by leaf name or by a dotted path: a saved config without one is
# the same run when the current value does what the code did before the key existed (compute dtype: float32; no
# teacher taps of their own: the student's names), or when only methods added since read it (the model-repair
# baselines' held-out split; the ViT options, read by ViTs only).
ADDED_KEYS = {"dtype": _computes_in_float32, "baseline.held_out_fraction": _unread_by_earlier_runs,
              "model.vit": _unread_by_earlier_runs, "teacher_taps": _is_unset,
              "attack.batch_norm": lambda value: value == "frozen"}
# Defaults that changed their spelling, not their meaning: {dotted key: [(saved value, current value)]} (JSON).
# T-Core's sift layers became () = the encoder's default depths, which for a ResNet are the listed ones.
RESPELLED_DEFAULTS = {"tcore.sift.layers": [(["input", "layer1", "layer2", "layer3", "layer4"], [])]}


def _other_methods_blocks(config: dict) -> tuple[str, ...]:
  """The 'baseline.<name>.' prefixes of the method blocks a baseline cell does not run: a comparison cell is the
  same run whatever the other methods' settings (a method added or retuned later leaves the finished cells)."""
  baseline = config.get("baseline")
  if not isinstance(baseline, dict):
    return ()
  return tuple(f"baseline.{name}." for name, block in baseline.items()
               if isinstance(block, dict) and name != baseline.get("defense"))


def _added_key_rule(key: str):
  """The ADDED_KEYS rule of a dotted key: its leaf name's, else its longest dotted prefix's, else None."""
  parts = key.split(".")
  for name in [parts[-1]] + [".".join(parts[:n]) for n in range(len(parts), 0, -1)]:
    if name in ADDED_KEYS:
      return ADDED_KEYS[name]
  return None


def config_differences(previous: dict, current: dict) -> list[str]:
  """The dotted keys whose values differ between two configs (as JSON), except keys the saved one predates that
  keep its behaviour (ADDED_KEYS), defaults spelled anew (RESPELLED_DEFAULTS) and, in a baseline cell, the blocks
  of the methods it does not run."""
  a, b = _flatten(previous), _flatten(current)
  unread = _other_methods_blocks(current)
  a, b = ({k: v for k, v in flat.items() if not k.startswith(unread)} for flat in (a, b))

  def predated_and_kept(key: str) -> bool:
    keeps = _added_key_rule(key)
    return key not in a and keeps is not None and keeps(b[key])

  def respelled(key: str) -> bool:
    return (a.get(key), b.get(key)) in RESPELLED_DEFAULTS.get(key, ())

  return sorted(k for k in a.keys() | b.keys()
                if a.get(k) != b.get(k) and not predated_and_kept(k) and not respelled(k))


def _write_json(path: str, obj) -> None:
  """Atomic write (a kill leaves the old file or the new one, never half of one)."""
  if jax.process_index() == 0:
    with open(path + ".tmp", "w") as f:
      json.dump(obj, f, indent=2, sort_keys=True)
    os.replace(path + ".tmp", path)


LOCK_FILE = ".lock"


class Run:
  """The workdir of one experiment. Creating it claims the workdir for `config` (config.json) or refuses, in one
  line, a workdir that is a file, is not writable, holds another config or holds something else."""

  def __init__(self, config: ml_collections.ConfigDict, workdir: str):
    self.config, self.workdir = config, workdir
    self.name = config.experiment
    current = json.loads(config.to_json_best_effort())
    if jax.process_index() == 0:
      _check_claim(workdir, current)
      os.makedirs(workdir, exist_ok=True)
    _write_json(os.path.join(workdir, "config.json"), current)

  def stage_dir(self, stage: str) -> str:
    path = os.path.join(self.workdir, stage)
    if jax.process_index() == 0:
      os.makedirs(path, exist_ok=True)
    return path

  def done(self, stage: str) -> dict | None:
    """The record a finished stage left, or None while it is not finished."""
    path = os.path.join(self.workdir, stage, "done.json")
    if not os.path.exists(path):
      return None
    with open(path) as f:
      return json.load(f)

  def finish(self, stage: str, record: dict) -> dict:
    _write_json(os.path.join(self.stage_dir(stage), "done.json"), record)
    return record

  def write_json(self, name: str, obj) -> None:
    """Writes `obj` to WORKDIR/name as JSON, atomically."""
    _write_json(os.path.join(self.workdir, name), obj)

  def write_results(self, evaluations: dict[str, dict], diagnostics: dict | None = None) -> str:
    """Writes results.json and results.md (evaluations, then any diagnostics); returns the Markdown text."""
    results = {"experiment": self.name, "evaluations": evaluations, "seed": self.config.seed}
    if diagnostics is not None:
      results["diagnostics"] = diagnostics
    _write_json(os.path.join(self.workdir, "results.json"), results)
    table = results_table(evaluations)
    if diagnostics is not None:
      table += "\n\n" + "\n".join(f"- {name}: {json.dumps(value)}" for name, value in diagnostics.items())
    if jax.process_index() == 0:
      with open(os.path.join(self.workdir, "results.md"), "w") as f:
        f.write(f"# {self.name}\n\n{table}\n")
    return table


def _check_claim(workdir: str, current: dict) -> None:
  """UserError unless `workdir` can hold the run of `current` (a config as JSON): new, empty, or its own run."""
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise UserError(f"workdir {workdir} is a file; pass a directory (new or an earlier run's) as --workdir")
  existing = workdir
  while not os.path.exists(existing):
    existing = os.path.dirname(os.path.abspath(existing))
  if not os.access(existing, os.W_OK | os.X_OK):
    raise UserError(f"cannot write to {existing}; make it writable or pass a --workdir where you can write")
  saved = os.path.join(workdir, "config.json")
  if os.path.exists(saved):
    with open(saved) as f:
      try:
        previous = json.load(f)
      except json.JSONDecodeError:
        raise UserError(f"{saved} is not valid JSON; restore it or use a new --workdir") from None
    if diff := config_differences(previous, current):
      raise UserError(f"workdir {workdir} holds a run of a different config (differs in "
                      f"{', '.join(diff[:5])}{' ...' if len(diff) > 5 else ''}); pass another --workdir, "
                      "or re-run with the config that made it")
  elif os.path.isdir(workdir) and set(os.listdir(workdir)) - {LOCK_FILE}:
    raise UserError(f"workdir {workdir} is not empty and holds no jaxpurify run (no config.json); "
                    "pass an empty or new --workdir")


@contextlib.contextmanager
def claimed(config: ml_collections.ConfigDict, workdir: str):
  """The Run of `workdir`, locked for this process while the block runs (process 0 holds the lock).

  A second process on the same workdir is refused in one line naming the holder; a lock left by a dead process
  is taken over (the operating system releases it). If the block fails before any stage wrote a file into a
  workdir this call claimed, the workdir is given back as it was, so the corrected command can use it.
  """
  if jax.process_index() != 0:
    yield Run(config, workdir)
    return
  _check_claim(workdir, json.loads(config.to_json_best_effort()))
  new_dir, new_claim = not os.path.exists(workdir), not os.path.exists(os.path.join(workdir, "config.json"))
  lock_path = os.path.join(workdir, LOCK_FILE)
  try:
    os.makedirs(workdir, exist_ok=True)
    lock = open(lock_path, "a+", encoding="utf-8")  # noqa: SIM115  (held open while the run lasts)
  except OSError as err:
    raise UserError(f"cannot write workdir {workdir} ({err.strerror}); pass a --workdir where you can write") from None
  with lock:
    try:
      fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      lock.seek(0)
      holder = lock.read().strip() or "another process"
      raise UserError(f"workdir {workdir} is in use by {holder}; wait for that run to end, or pass another "
                      "--workdir") from None
    lock.seek(0)
    lock.truncate()
    lock.write(f"pid {os.getpid()} on {socket.gethostname()}")
    lock.flush()
    try:
      yield Run(config, workdir)
    except BaseException:
      if new_claim and _untouched(workdir):
        _give_back(workdir, new_dir)
      raise


def _give_back(workdir: str, new_dir: bool) -> None:
  """Undoes the claim of a failed start (the workdir holds only the claim and empty folders): the folder if this
  start made it, else its contents, so that it is as empty as it was."""
  if new_dir:
    shutil.rmtree(workdir)
    return
  for name in os.listdir(workdir):
    path = os.path.join(workdir, name)
    if os.path.isdir(path):
      shutil.rmtree(path)
    else:
      os.remove(path)


def _untouched(workdir: str) -> bool:
  """Whether the workdir holds nothing but its claim (config.json, the lock) and empty folders."""
  for root, _, files in os.walk(workdir):
    if set(files) - ({"config.json", LOCK_FILE} if root == workdir else set()):
      return False
  return True


def config_value(config, key: str):
  """config's value at the dotted `key` ('defense.loss.name')."""
  for part in key.split("."):
    config = config[part]
  return config


def derived_config(config, overrides: dict):
  """A copy of `config` with {dotted key: value} set (an ablation's cell)."""
  cell = config.copy_and_resolve_references()
  for key, value in overrides.items():
    *parents, leaf = key.split(".")
    config_value(cell, ".".join(parents))[leaf] = value
  return cell


def link_stages(base_dir: str, cell_dir: str, stage_names) -> None:
  """Links the finished or started stage folders `stage_names` of the run in base_dir into the workdir cell_dir
  (an ablation's cell reuses the stages its config leaves unchanged)."""
  for stage in stage_names:
    link, target = os.path.join(cell_dir, stage), os.path.join(base_dir, stage)
    if os.path.isdir(target) and not os.path.lexists(link) and jax.process_index() == 0:
      os.symlink(os.path.relpath(target, cell_dir), link)


def results_table(evaluations: dict[str, dict]) -> str:
  """Markdown table: one row per evaluation, columns acc/asr/asr_all first, then the rest; values in %."""
  keys = [k for k in ("acc", "asr", "asr_all") if any(k in e for e in evaluations.values())]
  keys += sorted({k for e in evaluations.values() for k in e} - set(keys))
  lines = ["| evaluation | " + " | ".join(keys) + " |", "|---" * (len(keys) + 1) + "|"]
  for name, row in evaluations.items():
    cells = [f"{100 * row[k]:.2f}" if isinstance(row.get(k), float) else str(row.get(k, "–")) for k in keys]
    lines.append(f"| {name} | " + " | ".join(cells) + " |")
  return "\n".join(lines)
