"""Encoders from and to PyTorch: checkpoints read without torch and without running their pickles.

`load_torch(path, model, width, import_map)` turns a `.pth`/`.pt`/`.tar` (torch's zip or legacy format) or
`.safetensors` file into a jaxpurify backbone; `state_dict` and `write` go the other way (`python -m
jaxpurify.export`). Key maps are in `keymaps`; the file readers in `torchfile` and `safetensors`. docs/interop.md.
"""

import collections

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxpurify.errors import UserError
from jaxpurify.interop import keymaps, safetensors, torchfile
from jaxpurify.models import build_encoder, is_vit

SUFFIXES = (".pth", ".pt", ".tar", ".safetensors")


def is_torch_file(path: str) -> bool:
  """Whether `path` names a file this package imports (by its suffix), rather than a jaxpurify run."""
  return path.lower().endswith(SUFFIXES)


def read_state_dict(path: str) -> dict[str, np.ndarray]:
  """{key: array} of a checkpoint: a safetensors file's tensors; a torch file's state dict, itself or under
  'state_dict' or 'model' in a checkpoint dict (BadEncoder's and DRUPE's hold 'epoch', 'state_dict', 'optimizer')."""
  if path.lower().endswith(".safetensors"):
    return safetensors.read(path)
  obj = torchfile.read(path)
  for candidate in (obj, *(obj.get(k) for k in ("state_dict", "model") if isinstance(obj, dict))):
    if isinstance(candidate, dict) and candidate and all(isinstance(v, np.ndarray) for v in candidate.values()):
      return {str(k): v for k, v in candidate.items()}
  raise UserError(f"{path} holds no state dict (a mapping of names to tensors, itself or under 'state_dict' or "
                  "'model'); in PyTorch, save the model's state_dict()")


def load_torch(path: str, model: str = "resnet18", width: int = 64, import_map: str = "auto",
               dtype=jnp.float32) -> nnx.Module:
  """The jaxpurify backbone `model` (models.ENCODERS) of `width`, computing in `dtype`, with the weights of the
  PyTorch checkpoint at `path`; `backbone(x, train=False)` maps normalised NHWC float images [B, H, W, 3] to
  (pooled [B, D], taps).

  import_map: 'auto' (detected from the key names), 'badencoder', 'torchvision', 'ctrl' or 'STYLE:PREFIX' (keymaps).
  Every problem (missing file, refused pickle global, damaged file, keys or shapes of another architecture) is a
  UserError of one line. The key maps are ResNets'; a ViT `model` is a UserError."""
  if is_vit(model):
    raise UserError(f"{path}: PyTorch checkpoints import into the ResNets only, not {model}; set config.model.name "
                    "to the file's ResNet, or pre-train the ViT here (configs/simclr.py:encoder=" + model + ")")
  chosen = keymaps.parse(import_map)
  state_dict = read_state_dict(path)
  chosen = chosen or keymaps.detect(state_dict, path)
  # shapes only; the file fills every array
  backbone = nnx.eval_shape(lambda: build_encoder(model, width, dtype=dtype, rngs=nnx.Rngs(0)))
  params, batch_stats = (nnx.to_pure_dict(nnx.state(backbone, kind)) for kind in (nnx.Param, nnx.BatchStat))
  keymaps.to_jax(state_dict, backbone, chosen, params, batch_stats, path, f"{model} width {width}")
  nnx.update(backbone, *jax.tree.map(jnp.asarray, (params, batch_stats)))
  return backbone


def state_dict(backbone: nnx.Module, import_map: str, head: nnx.Module | None = None,
               batches: int = 0) -> dict[str, np.ndarray]:
  """A jaxpurify ResNet as {torch key: array}, the keys of the PyTorch model `import_map` names (not 'auto');
  `head` (a ProjectionHead) is written too where that model has one (badencoder: `g.*`), else left out;
  `batches` fills BatchNorm's num_batches_tracked. A ViT (no key map) is a UserError."""
  if not hasattr(backbone, "conv_bn_pairs"):
    raise UserError(f"export writes ResNets only; this run's encoder is a {type(backbone).__name__}, for which no "
                    "PyTorch key map exists (its arrays are in the run's orbax checkpoint)")
  chosen = keymaps.parse(import_map)
  if chosen is None:
    raise UserError("export needs an explicit map; pass --map badencoder, torchvision or ctrl")
  head = head if chosen.style in keymaps.HEADS else None
  pure = [nnx.to_pure_dict(nnx.state(m, kind)) for m in (backbone, head) if m is not None
          for kind in (nnx.Param, nnx.BatchStat)]
  return keymaps.to_torch(backbone, *pure[:2], chosen, tuple(pure[2:]) if head is not None else None, batches)


def write(path: str, tensors: dict[str, np.ndarray], fmt: str, wrap: dict | None = None) -> None:
  """`tensors` as `fmt` 'safetensors' or 'torch' (a zip archive of an OrderedDict, inside `wrap` under
  'state_dict' when given: BadEncoder's and CTRL's checkpoint dicts)."""
  if fmt == "safetensors":
    safetensors.write(path, tensors)
  else:
    sd = collections.OrderedDict(tensors)
    torchfile.write(path, {**wrap, "state_dict": sd} if wrap is not None else sd)


__all__ = ["SUFFIXES", "is_torch_file", "keymaps", "load_torch", "read_state_dict", "safetensors", "state_dict",
           "torchfile", "write"]
