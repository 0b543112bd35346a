"""PyTorch checkpoint files as numpy, without torch and without running their pickles.

`read(path)` rebuilds the object a `torch.save` stored (dicts, lists, numbers, strings; tensors as numpy arrays)
from both of torch's formats: the zip archive (torch >= 1.6: `<dir>/data.pkl` plus one raw file per storage,
`<dir>/data/<key>`) and the legacy stream (magic number, protocol, system info, the object, the storage keys, then
each storage as an int64 element count and its bytes). The pickle is read by `SafeUnpickler`, which resolves only
the globals a weights file needs to our own inert rebuilders and refuses any other with one line naming it, so no
code from the file runs. `write(path, obj)` writes a zip archive that `torch.load(path, weights_only=True)` reads,
with hand-made pickle opcodes (no torch needed).
"""

import _compat_pickle
import collections
import io
import os
import pickle
import struct
import zipfile
from typing import NamedTuple

import ml_dtypes
import numpy as np

from jaxpurify.errors import UserError

STORAGES = {"DoubleStorage": np.float64, "FloatStorage": np.float32, "HalfStorage": np.float16,
            "BFloat16Storage": ml_dtypes.bfloat16, "LongStorage": np.int64, "IntStorage": np.int32,
            "ShortStorage": np.int16, "CharStorage": np.int8, "ByteStorage": np.uint8, "BoolStorage": np.bool_}
STORAGE_NAMES = {np.dtype(dtype): name for name, dtype in STORAGES.items()}
LEGACY_MAGIC = 0x1950a86a20f9469cfc6c
ALIGNMENT = 64  # torch aligns each storage's bytes in the archive (for mmap)


class StorageType(NamedTuple):
  """What `torch.<X>Storage` resolves to: the element type."""
  dtype: np.dtype


class StorageRef(NamedTuple):
  """A storage named by the pickle's persistent id: its key in the file, element type and element offset."""
  key: str
  dtype: np.dtype
  offset: int


class TensorRef(NamedTuple):
  """A tensor rebuilt by `_rebuild_tensor_v2`: a strided view (element units) of a storage, resolved later."""
  storage: StorageRef
  offset: int
  size: tuple
  stride: tuple


def _rebuild_tensor_v2(storage, storage_offset, size, stride, *_):
  """torch._utils._rebuild_tensor_v2(storage, offset, size, stride, requires_grad, hooks[, metadata])."""
  return TensorRef(storage, storage_offset, tuple(size), tuple(stride))


# What a state dict's pickle names: its OrderedDict, tensors (also the empty OrderedDict of backward hooks) and
# their storages' types.
SAFE_GLOBALS = {("collections", "OrderedDict"): collections.OrderedDict,
                ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
                **{("torch", name): StorageType(np.dtype(dtype)) for name, dtype in STORAGES.items()}}


class SafeUnpickler(pickle.Unpickler):
  """An unpickler whose globals are SAFE_GLOBALS only and whose persistent ids are torch's storage records."""

  def __init__(self, file, path: str):
    super().__init__(file)
    self.path = path

  def find_class(self, module, name):
    # Python 2 names, as protocol 2 pickles write them (`__builtin__.eval`), in Python 3's words
    module, name = _compat_pickle.NAME_MAPPING.get((module, name), (module, name))
    module = _compat_pickle.IMPORT_MAPPING.get(module, module)
    found = SAFE_GLOBALS.get((module, name))
    if found is None:
      raise UserError(f"{self.path} asks to run {module}.{name} when loaded, which a weights file does not need; "
                      "nothing was run. Only tensors and plain containers are read: in PyTorch, save the "
                      "model's state_dict() (or use a .safetensors file) and import that")
    return found

  def persistent_load(self, pid):
    # zip: ('storage', type, key, location, numel); legacy: ..., size, view (None or (key, offset, size))
    if not (isinstance(pid, tuple) and len(pid) >= 5 and pid[0] == "storage" and isinstance(pid[1], StorageType)):
      raise UserError(f"{self.path} holds an object of unknown kind ({str(pid)[:60]}); only tensors can be read")
    view = pid[5] if len(pid) > 5 else None
    if view is not None:
      return StorageRef(str(pid[2]), pid[1].dtype, int(view[1]))
    return StorageRef(str(pid[2]), pid[1].dtype, 0)


def _damaged(path: str, why: str) -> UserError:
  return UserError(f"{path} is not a readable PyTorch checkpoint ({why}); download or save it again")


def _unpickle(stream, path: str):
  try:
    return SafeUnpickler(stream, path).load()
  except UserError:
    raise
  except Exception as err:  # noqa: BLE001  (truncated or corrupt pickles raise many types)
    raise _damaged(path, f"its pickle is damaged: {type(err).__name__}") from None


def _resolve(obj, storages: dict, path: str):
  """`obj` with every TensorRef replaced by its numpy array (copied out of `storages`: key -> 1-D array)."""
  if isinstance(obj, TensorRef):
    return _array(obj, storages, path)
  if isinstance(obj, dict):
    out = type(obj)() if isinstance(obj, collections.OrderedDict) else {}
    out.update((k, _resolve(v, storages, path)) for k, v in obj.items())
    return out
  if isinstance(obj, (list, tuple)):
    return type(obj)(_resolve(v, storages, path) for v in obj)
  return obj


def _array(ref: TensorRef, storages: dict, path: str) -> np.ndarray:
  storage = storages.get(ref.storage.key)
  if storage is None:
    raise _damaged(path, f"storage {ref.storage.key} is missing")
  ints = all(isinstance(v, int) and v >= 0 for v in (ref.offset, *ref.size, *ref.stride))
  if not ints or len(ref.size) != len(ref.stride):
    raise _damaged(path, "a tensor has a bad shape")
  start = ref.storage.offset + ref.offset
  last = start + sum((n - 1) * s for n, s in zip(ref.size, ref.stride))
  if 0 not in ref.size and last >= storage.size:
    raise _damaged(path, f"a tensor reaches past the end of storage {ref.storage.key}")
  item = storage.dtype.itemsize
  try:
    if 0 in ref.size:
      return np.zeros(ref.size, storage.dtype)
    return np.lib.stride_tricks.as_strided(storage[start:], ref.size, [s * item for s in ref.stride]).copy()
  except ValueError:  # a shape numpy cannot hold
    raise _damaged(path, "a tensor has a bad shape") from None


def _storage_refs(obj) -> list[StorageRef]:
  if isinstance(obj, TensorRef):
    return [obj.storage]
  values = obj.values() if isinstance(obj, dict) else obj if isinstance(obj, (list, tuple)) else ()
  return [ref for v in values for ref in _storage_refs(v)]


def _read_zip(path: str):
  try:
    with zipfile.ZipFile(path) as archive:
      names = archive.namelist()
      pickles = [n for n in names if n.endswith("data.pkl") and n.count("/") == 1]
      if len(pickles) != 1:
        raise _damaged(path, "its zip archive has no <dir>/data.pkl")
      root = pickles[0][:-len("data.pkl")]
      little = f"{root}byteorder" not in names or archive.read(f"{root}byteorder").strip() == b"little"
      obj = _unpickle(io.BytesIO(archive.read(pickles[0])), path)
      storages = {}
      for ref in _storage_refs(obj):
        if ref.key not in storages:
          name = f"{root}data/{ref.key}"
          if name not in names:
            raise _damaged(path, f"storage {ref.key} is missing")
          raw = np.frombuffer(archive.read(name), np.uint8)
          dtype = ref.dtype if little else ref.dtype.newbyteorder(">")
          if raw.size % dtype.itemsize:
            raise _damaged(path, f"storage {ref.key} has a partial element")
          storages[ref.key] = raw.view(dtype).astype(ref.dtype)
  except (zipfile.BadZipFile, EOFError, OSError) as err:
    raise _damaged(path, f"its zip archive is truncated or corrupt: {err}") from None
  return _resolve(obj, storages, path)


def _read_legacy(path: str):
  with open(path, "rb") as f:
    if _unpickle(f, path) != LEGACY_MAGIC:
      raise _damaged(path, "neither a zip archive nor torch's legacy format")
    _unpickle(f, path)  # protocol version
    _unpickle(f, path)  # system info (byte order, type sizes)
    obj = _unpickle(f, path)
    keys = _unpickle(f, path)
    dtypes = {ref.key: ref.dtype for ref in _storage_refs(obj)}
    storages = {}
    for key in keys if isinstance(keys, list) else ():
      head = f.read(8)
      if len(head) != 8 or str(key) not in dtypes:
        raise _damaged(path, "it ends early or lists unknown storages")
      dtype = dtypes[str(key)]
      count = struct.unpack("<q", head)[0]
      if not 0 <= count * dtype.itemsize <= os.fstat(f.fileno()).st_size - f.tell():
        raise _damaged(path, f"storage {key} is truncated")
      data = f.read(count * dtype.itemsize)
      storages[str(key)] = np.frombuffer(data, dtype)
  return _resolve(obj, storages, path)


def read(path: str):
  """A `torch.save`d file -> its object with tensors as numpy arrays; UserError (one line) for a file that is
  missing, damaged, an old tar-format file, or whose pickle names any global outside SAFE_GLOBALS."""
  if not os.path.isfile(path):
    raise UserError(f"{path} does not exist; pass the path of a .pth/.pt/.tar or .safetensors file")
  with open(path, "rb") as f:
    head = f.read(4)
  if _is_tar(path):
    raise _damaged(path, "a tar archive from PyTorch before 0.4; load and re-save it with a current PyTorch")
  try:
    return _read_zip(path) if head == b"PK\x03\x04" else _read_legacy(path)
  except RecursionError:
    raise _damaged(path, "its containers nest too deeply") from None


def _is_tar(path: str) -> bool:
  with open(path, "rb") as f:
    f.seek(257)
    return f.read(5) == b"ustar"


# Writing: a pickle of protocol 2 made of these opcodes, as torch.save's would be for the same object.
def _global(module: str, name: str) -> bytes:
  return b"c" + f"{module}\n{name}\n".encode()


def _string(text: str) -> bytes:
  data = text.encode()
  return b"X" + struct.pack("<I", len(data)) + data


def _int(value: int) -> bytes:
  if -2**31 <= value < 2**31:
    return b"J" + struct.pack("<i", value)
  data = value.to_bytes((value.bit_length() + 8) // 8, "little", signed=True)
  return b"\x8a" + bytes([len(data)]) + data


def _tuple(items: list[bytes]) -> bytes:
  return b"(" + b"".join(items) + b"t"


def _pickle(obj, storages: list) -> bytes:
  """Opcodes building `obj` (dicts, OrderedDicts, lists, tuples, str, int, float, bool, None, numpy arrays as
  tensors); each array's bytes go to `storages`, named by its index."""
  if isinstance(obj, np.ndarray):
    array = np.ascontiguousarray(obj)
    if array.dtype not in STORAGE_NAMES:
      raise ValueError(f"no torch storage for dtype {array.dtype}")
    key = str(len(storages))
    storages.append(array)
    storage = b"(" + _string("storage") + _global("torch", STORAGE_NAMES[array.dtype]) + _string(key) + \
        _string("cpu") + _int(array.size) + b"tQ"
    strides = [s // array.itemsize for s in array.strides]
    hooks = _global("collections", "OrderedDict") + b")R"
    return _global("torch._utils", "_rebuild_tensor_v2") + _tuple(
        [storage, _int(0), _tuple([_int(n) for n in array.shape]), _tuple([_int(s) for s in strides]), b"\x89",
         hooks]) + b"R"
  if isinstance(obj, dict):
    start = _global("collections", "OrderedDict") + b")R" if isinstance(obj, collections.OrderedDict) else b"}"
    items = b"".join(_pickle(k, storages) + _pickle(v, storages) for k, v in obj.items())
    return start + (b"(" + items + b"u" if items else b"")
  if isinstance(obj, list):
    return b"]" + (b"(" + b"".join(_pickle(v, storages) for v in obj) + b"e" if obj else b"")
  if isinstance(obj, tuple):
    return _tuple([_pickle(v, storages) for v in obj])
  if isinstance(obj, str):
    return _string(obj)
  if isinstance(obj, bool):
    return b"\x88" if obj else b"\x89"
  if isinstance(obj, int):
    return _int(obj)
  if isinstance(obj, float):
    return b"G" + struct.pack(">d", obj)
  if obj is None:
    return b"N"
  raise TypeError(f"cannot write {type(obj).__name__} to a torch file")


def _write_aligned(archive: zipfile.ZipFile, name: str, data: bytes) -> None:
  """An uncompressed member whose bytes start at a multiple of ALIGNMENT (padding in the local header's extra
  field, as torch's writer does)."""
  info = zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0))
  start = archive.fp.tell() + 30 + len(name.encode()) + 4
  pad = -start % ALIGNMENT
  info.extra = b"FB" + struct.pack("<H", pad) + b"Z" * pad
  archive.writestr(info, data, compress_type=zipfile.ZIP_STORED)


def write(path: str, obj, root: str = "archive") -> None:
  """`obj` (see _pickle) as a torch zip archive at `path`, readable by `torch.load(path, weights_only=True)`."""
  storages = []
  data = b"\x80\x02" + _pickle(obj, storages) + b"."
  with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as archive:
    _write_aligned(archive, f"{root}/data.pkl", data)
    _write_aligned(archive, f"{root}/byteorder", b"little")
    for key, array in enumerate(storages):
      _write_aligned(archive, f"{root}/data/{key}", array.astype(array.dtype.newbyteorder("<")).tobytes())
    _write_aligned(archive, f"{root}/version", b"3\n")
