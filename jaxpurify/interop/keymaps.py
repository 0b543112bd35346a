"""PyTorch state-dict key names <-> a jaxpurify ResNet's arrays.

An import map is `STYLE[:PREFIX]`:
  badencoder   the official BadEncoder/DRUPE SimCLR (models/simclr_model.py): torchvision's children in an
               nn.Sequential without maxpool and fc, so the stem is `0` (conv) and `1` (BN) and `layer1`..`layer4`
               are `3`..`6`; prefix `f.f.` (SimCLR.f = SimCLRBase, whose .f is the Sequential); the projection head
               is `g.0` (Linear, no bias), `g.1` (BatchNorm1d), `g.3` (Linear).
  torchvision  torchvision.models.resnet names: `conv1`, `bn1`, `layer<i>.<j>.conv<k>`/`bn<k>`,
               `layer<i>.<j>.downsample.0`/`.1`; prefix empty; `fc` (the classifier) is not part of the encoder.
  ctrl         the official CTRL (meet-cjli/CTRL, networks/resnet_cifar.py, full_model=False) under its SimCLR's and
               BYOL's `backbone` (methods/base.py CLModel): `conv1`, `bn1`, `layer<i>.<j>.conv<k>`/`bn<k>`, the
               projection `layer<i>.<j>.shortcut.0`/`.1`; prefix `backbone.` (BYOL's online encoder; its target
               is `backbone_k.`, and `encoder_q.0.`/`encoder_k.0.` repeat both).
PREFIX replaces the style's prefix (`torchvision:backbone.`, `torchvision:module.encoder.`, `badencoder:f.`,
`ctrl:backbone_k.`).
Conv weights are OIHW in torch and HWIO here; Linear weights (out, in) in torch, (in, out) here; BatchNorm's
weight/bias/running_mean/running_var are scale/bias (nnx.Param) and mean/var (nnx.BatchStat); torch's
`num_batches_tracked` has no counterpart (ignored on import, written on export).
"""

import re
from typing import NamedTuple

import numpy as np

from jaxpurify.errors import UserError

STYLES = {"badencoder": "f.f.", "torchvision": "", "ctrl": "backbone."}
HEADS = {"badencoder": "g."}  # where a style keeps its projection head (outside the backbone's prefix)
BN_FIELDS = (("weight", "scale", "params"), ("bias", "bias", "params"), ("running_mean", "mean", "batch_stats"),
             ("running_var", "var", "batch_stats"))


class ImportMap(NamedTuple):
  style: str
  prefix: str

  def __str__(self):
    return f"{self.style}:{self.prefix}"


def parse(name: str) -> ImportMap | None:
  """'auto' -> None; 'STYLE[:PREFIX]' -> ImportMap; anything else -> UserError naming the forms."""
  if name == "auto":
    return None
  style, colon, prefix = name.partition(":")
  if style not in STYLES:
    raise UserError(f"unknown import map {name!r}; set config.model.import_map to auto, "
                    f"{', '.join(STYLES)}, or STYLE:PREFIX (e.g. torchvision:backbone.)")
  return ImportMap(style, prefix if colon else STYLES[style])


def detect(keys, path: str) -> ImportMap:
  """The one import map whose backbone the key names hold; UserError when none or several fit."""
  found = set()
  for key in keys:
    if m := re.fullmatch(r"(.*)layer1\.0\.conv1\.weight", key):  # the first stride-2 block has a projection
      found.add(ImportMap("ctrl" if f"{m.group(1)}layer2.0.shortcut.0.weight" in keys else "torchvision", m.group(1)))
    if (m := re.fullmatch(r"(.*)3\.0\.conv1\.weight", key)) and f"{m.group(1)}0.weight" in keys:
      found.add(ImportMap("badencoder", m.group(1)))
  if len(found) != 1:
    sample = ", ".join(list(keys)[:4])
    what = "no ResNet backbone" if not found else f"several backbones ({', '.join(sorted(map(str, found)))})"
    raise UserError(f"{path}: import_map=auto finds {what} in its keys ({sample}, ...); set config.model.import_map "
                    "(badencoder, torchvision, ctrl or STYLE:PREFIX, docs/interop.md)")
  return found.pop()


def module_names(backbone, import_map: ImportMap) -> list[tuple[str, tuple, tuple]]:
  """[(torch name of a conv, its jax path, torch name of its BN, its jax path)] of a ResNet, forward order."""
  out = []
  for layer, conv_path, bn_path in backbone.conv_bn_pairs():
    if layer == "stem":
      conv, bn = ("0", "1") if import_map.style == "badencoder" else ("conv1", "bn1")
    else:
      stage, block, conv_name = layer.split(".")  # 'stage<s>', 'block<b>', 'conv<k>' or 'shortcut'
      s, b = int(stage[len("stage"):]), int(block[len("block"):])
      base = f"{s + 2}.{b}" if import_map.style == "badencoder" else f"layer{s}.{b}"
      if conv_name == "shortcut":
        projection = "shortcut" if import_map.style == "ctrl" else "downsample"
        conv, bn = f"{base}.{projection}.0", f"{base}.{projection}.1"
      else:
        conv, bn = f"{base}.{conv_name}", f"{base}.bn{conv_name[len('conv'):]}"
    out.append((import_map.prefix + conv, conv_path, import_map.prefix + bn, bn_path))
  return out


def _get(tree, path):
  for key in path:
    tree = tree[key]
  return tree


def to_jax(state_dict: dict, backbone, import_map: ImportMap, params: dict, batch_stats: dict, path: str,
           what: str) -> None:
  """Fills the pure dicts `params`/`batch_stats` of `backbone` (nnx.to_pure_dict; arrays or shapes) from
  `state_dict` {torch name: array}, every leaf; UserError (one line) for missing, unexpected or mis-shaped keys. Keys outside the prefix (heads, training
  fields) and the style's classifier are not the encoder's and are left out."""
  targets = {}  # torch key -> (tree, jax path, leaf, transpose)
  for conv, conv_path, bn, bn_path in module_names(backbone, import_map):
    targets[f"{conv}.weight"] = (params, conv_path, "kernel", (2, 3, 1, 0))
    for torch_field, leaf, tree in BN_FIELDS:
      targets[f"{bn}.{torch_field}"] = (params if tree == "params" else batch_stats, bn_path, leaf, None)
  classifier = f"{import_map.prefix}fc." if import_map.style == "torchvision" else None
  mine = [k for k in state_dict if k.startswith(import_map.prefix) and not (classifier and k.startswith(classifier))]
  missing = [k for k in targets if k not in state_dict]
  unexpected = [k for k in mine if k not in targets and not k.endswith(".num_batches_tracked")]
  if missing or unexpected:
    raise UserError(f"{path} does not hold a {what} under import map {import_map} (missing: "
                    f"{', '.join(missing[:3]) or 'none'}{' ...' if len(missing) > 3 else ''}; unexpected: "
                    f"{', '.join(unexpected[:3]) or 'none'}{' ...' if len(unexpected) > 3 else ''}); set "
                    "config.model (name, width) and config.model.import_map to the checkpoint's")
  for key, (tree, module_path, leaf, transpose) in targets.items():
    value = np.asarray(state_dict[key])
    value = value.transpose(transpose) if transpose else value
    like = _get(tree, module_path)[leaf]
    if value.shape != like.shape:
      needed = tuple(like.shape[i] for i in np.argsort(transpose)) if transpose else like.shape
      hint = (" (a 7×7 first conv is torchvision's ImageNet stem: the resnet*_imagenet models; a 3×3 one the CIFAR "
              "stem)") if transpose and value.shape[:2] != like.shape[:2] else ""
      raise UserError(f"{path}: {key} has shape {tuple(np.shape(state_dict[key]))}, the {what} needs {needed}{hint}; "
                      "set config.model (name, width) to the checkpoint's architecture")
    _get(tree, module_path)[leaf] = value.astype(like.dtype)


def _bn_to_torch(out: dict, name: str, params: dict, stats: dict, batches: int) -> None:
  for torch_field, leaf, tree in BN_FIELDS:
    out[f"{name}.{torch_field}"] = np.asarray((params if tree == "params" else stats)[leaf], np.float32)
  out[f"{name}.num_batches_tracked"] = np.asarray(batches, np.int64)


def to_torch(backbone, params: dict, batch_stats: dict, import_map: ImportMap, head=None, batches: int = 0) -> dict:
  """A ResNet's pure dicts (nnx.to_pure_dict) -> {torch name: float32 array} in torch's order, with
  `num_batches_tracked` = `batches`; `head` (params, batch_stats of a ProjectionHead) adds the style's projection
  head (badencoder only)."""
  out = {}
  for conv, conv_path, bn, bn_path in module_names(backbone, import_map):
    out[f"{conv}.weight"] = np.asarray(_get(params, conv_path)["kernel"], np.float32).transpose(3, 2, 0, 1)
    _bn_to_torch(out, bn, _get(params, bn_path), _get(batch_stats, bn_path), batches)
  if head is not None:
    (head_params, head_stats), g = head, HEADS[import_map.style]
    out[f"{g}0.weight"] = np.asarray(head_params["fc1"]["kernel"], np.float32).T
    _bn_to_torch(out, f"{g}1", head_params["bn"], head_stats["bn"], batches)
    out[f"{g}3.weight"] = np.asarray(head_params["fc2"]["kernel"], np.float32).T
    out[f"{g}3.bias"] = np.asarray(head_params["fc2"]["bias"], np.float32)
  return out
