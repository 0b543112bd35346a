"""Frozen image encoders as the attacks and evaluations use them: a backbone's graph and its arrays.

An `Encoder` is the backbone alone (no projection head): attacks fine-tune it and downstream
evaluation reads its pooled feature. It comes from a pre-training state, from a checkpoint on disk or from a
PyTorch file (jaxpurify.interop).
"""

import functools
import json
import os
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from jaxpurify import augment, interop, parallel
from jaxpurify.errors import UserError
from jaxpurify.models import compute_dtype, configured_encoder
from jaxpurify.train import checkpoint


class Encoder(NamedTuple):
  """graphdef of a backbone (any of models.ENCODERS), its nnx.Param state and its nnx.BatchStat state."""
  graphdef: Any
  params: Any
  batch_stats: Any


def backbone_of(graphdef, state) -> Encoder:
  """The `.backbone` of a pre-training model (any SSL method) held in (graphdef, TrainState)."""
  model = nnx.merge(graphdef, state.params, state.batch_stats)
  return Encoder(*nnx.split(model.backbone, nnx.Param, nnx.BatchStat))


def build_backbone(model_config, seed: int) -> Encoder:
  return Encoder(*nnx.split(configured_encoder(model_config, nnx.Rngs(seed)), nnx.Param, nnx.BatchStat))


@functools.lru_cache(maxsize=64)
def forward(graphdef, mean: tuple, std: tuple, transform):
  """One jitted inference forward per (architecture, normalisation, transform), shared by every encoder."""

  @jax.jit
  def encode(params, batch_stats, images):
    if transform is not None:
      images = transform(images)
    model = nnx.merge(graphdef, params, batch_stats)
    feature, _ = model(augment.normalize(augment.to_float(images), jnp.asarray(mean), jnp.asarray(std)),
                       train=False)
    return feature

  return encode


def encode_fn(encoder: Encoder, model_config, transform=None):
  """A jitted uint8 [B, H, W, 3] -> feature [B, D] in inference mode; `transform` (uint8 -> uint8, e.g. a
  trigger) is applied first, on device."""
  encode = forward(encoder.graphdef, tuple(model_config.mean), tuple(model_config.std), transform)
  return lambda images: encode(encoder.params, encoder.batch_stats, images)


# The stages whose checkpoint is a run's encoder, by the role the encoder plays: a clean encoder is a pre-training
# run's; a suspect (or teacher, or student) is a run's last encoder: defended, attacked or (CTRL) poisoned.
CLEAN_STAGES = ("pretrain",)
FINAL_STAGES = ("distill", "attack", "pretrain_poisoned", "pretrain")


def find_checkpoint(path: str, stages=CLEAN_STAGES, field: str = "config.attack.clean_encoder") -> str:
  """A run's workdir (its first finished stage of `stages`), a stage folder or a ckpt folder -> the ckpt folder."""
  candidates = [os.path.join(path, stage, "ckpt") for stage in stages] + [os.path.join(path, "ckpt"), path]
  for candidate in candidates:
    if os.path.isdir(candidate) and ocp.CheckpointManager(os.path.abspath(candidate)).latest_step() is not None:
      return candidate
  raise UserError(f"no checkpoint found at {path}; set {field} to the workdir of a finished run (e.g. runs/simclr) "
                  "or to one of its stages' ckpt folders")


def finished_step(directory: str, field: str) -> int:
  """The step to read from a ckpt folder: the one its stage's done.json records (a bare ckpt folder: its latest);
  UserError for an unfinished stage or a step without orbax's commit marker."""
  stage_dir = os.path.dirname(directory)
  done = os.path.join(stage_dir, "done.json")
  if os.path.exists(done):
    with open(done, encoding="utf-8") as f:
      step = json.load(f).get("steps")
  elif os.path.exists(os.path.join(stage_dir, "metrics.jsonl")):
    raise UserError(f"the stage at {stage_dir} is not finished (no done.json); re-run its command to finish it, or "
                    f"point {field} to a finished run")
  else:
    step = ocp.CheckpointManager(directory).latest_step()
  if step is None or not checkpoint.committed(directory, step):
    raise UserError(f"checkpoint {directory}/{step} is missing or incomplete (no {checkpoint.COMMIT_MARKER}); "
                    f"re-run the command that made it to finish that stage, or point {field} to a finished run")
  return step


def _match(expected, stored, where: str, directory: str, model_config):
  """`stored` (orbax's nested dicts, string keys) rearranged into `expected`'s pure-dict structure."""
  if not isinstance(expected, dict):
    if isinstance(stored, dict) and set(stored) == {"value"}:  # an nnx.Variable as orbax stores it
      stored = stored["value"]
    if np.shape(stored) != np.shape(expected):
      raise UserError(f"checkpoint {directory} holds another architecture ({where} has shape {np.shape(stored)}, "
                      f"config.model {model_config.name} width {model_config.width} needs {np.shape(expected)}); "
                      "set config.model to the architecture it was trained with")
    return np.asarray(stored)
  if not isinstance(stored, dict) or set(map(str, expected)) != set(map(str, stored)):
    raise UserError(f"checkpoint {directory} holds another architecture (its {where or 'backbone'} differs from "
                    f"config.model {model_config.name}); set config.model to the architecture it was trained with")
  return {k: _match(v, stored[str(k)], f"{where}.{k}".strip("."), directory, model_config)
          for k, v in expected.items()}


def restore(path: str, stages=CLEAN_STAGES, field: str = "config.attack.clean_encoder") -> tuple[str, int, dict]:
  """(ckpt folder, step, orbax's nested dicts) of the finished checkpoint under `path` (find_checkpoint,
  finished_step); UserError for one that cannot be read."""
  directory = os.path.abspath(find_checkpoint(path, stages, field))
  step = finished_step(directory, field)
  mngr = ocp.CheckpointManager(directory)
  try:
    raw = mngr.restore(step, args=ocp.args.StandardRestore())
  except Exception as err:  # orbax raises many types for a damaged checkpoint
    raise UserError(f"checkpoint {directory}/{step} cannot be read ({type(err).__name__}); point {field} to a "
                    "finished run") from None
  finally:
    mngr.close()
  return directory, step, raw


def backbone_from(raw: dict, model_config, directory: str, field: str) -> Encoder:
  """The backbone (host arrays) in a restored state `raw`: a pre-training state of any SSL method
  (params/backbone, batch_stats/backbone) or an encoder attack's (params and batch_stats are the backbone);
  refuses, in one line, another architecture than `model_config`. The backbone's structure is traced, not
  initialised: every array comes from `raw`."""
  graphdef, *like = nnx.split(nnx.eval_shape(lambda: configured_encoder(model_config, nnx.Rngs(0))), nnx.Param,
                              nnx.BatchStat)
  found = []
  for kind, state in zip(("params", "batch_stats"), like):
    expected = nnx.to_pure_dict(state)
    stored = raw.get(kind) if isinstance(raw, dict) else None
    if isinstance(stored, dict) and "backbone" in stored:  # a model around the backbone (SSL, classifier)
      stored = stored["backbone"]
    elif not expected:  # a backbone without statistics (a ViT): none to find
      stored = {}
    elif not (isinstance(stored, dict) and set(map(str, stored)) & set(map(str, expected))):
      raise UserError(f"checkpoint {directory} holds no encoder backbone; point {field} to a finished run")
    nnx.replace_by_pure_dict(state, _match(expected, stored, "", directory, model_config))
    found.append(state)
  return Encoder(graphdef, *found)


def load_backbone(path: str, model_config, mesh, stages=CLEAN_STAGES,
                  field: str = "config.attack.clean_encoder") -> Encoder:
  """The backbone of the finished checkpoint under `path` (restore, backbone_from), replicated over `mesh`.

  A PyTorch file (.pth, .pt, .tar, .safetensors) is imported instead (interop.load_torch, with
  model_config.import_map, default 'auto'), its pickle never run.
  """
  if interop.is_torch_file(path):
    if not os.path.isfile(path):
      raise UserError(f"{path} does not exist; set {field} to a PyTorch checkpoint file or a finished run")
    backbone = interop.load_torch(path, model_config.name, model_config.width,
                                  model_config.get("import_map", "auto"), compute_dtype(model_config.dtype))
    graphdef, params, batch_stats = nnx.split(backbone, nnx.Param, nnx.BatchStat)
    return Encoder(graphdef, *parallel.put_replicated((params, batch_stats), mesh))
  directory, _, raw = restore(path, stages, field)
  encoder = backbone_from(raw, model_config, directory, field)
  return Encoder(encoder.graphdef, *parallel.put_replicated((encoder.params, encoder.batch_stats), mesh))
