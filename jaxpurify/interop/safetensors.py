"""`.safetensors` files as numpy, by hand: an 8-byte little-endian header length N, N bytes of JSON
{name: {dtype, shape, data_offsets: [begin, end]}, "__metadata__": {str: str}}, then the tensors' raw
little-endian bytes (offsets relative to the end of the header)."""

import json
import os
import struct

import ml_dtypes
import numpy as np

from jaxpurify.errors import UserError

DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16, "I64": np.int64,
          "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_}
NAMES = {np.dtype(dtype): name for name, dtype in DTYPES.items()}


def _damaged(path: str, why: str) -> UserError:
  return UserError(f"{path} is not a readable safetensors file ({why}); download or save it again")


def read(path: str) -> dict[str, np.ndarray]:
  """{name: array} of a safetensors file; UserError (one line) for a missing or damaged file."""
  if not os.path.isfile(path):
    raise UserError(f"{path} does not exist; pass the path of a .pth/.pt/.tar or .safetensors file")
  with open(path, "rb") as f:
    data = f.read()
  if len(data) < 8:
    raise _damaged(path, "shorter than its header")
  size = struct.unpack("<Q", data[:8])[0]
  if size > len(data) - 8:
    raise _damaged(path, "its header runs past the end: truncated")
  try:
    header = json.loads(data[8:8 + size])
  except (UnicodeDecodeError, json.JSONDecodeError):
    raise _damaged(path, "its header is not JSON") from None
  if not isinstance(header, dict):
    raise _damaged(path, "its header is not a JSON object")
  body, out = memoryview(data)[8 + size:], {}
  for name, entry in header.items():
    if name == "__metadata__":
      continue
    try:
      dtype, shape, (begin, end) = np.dtype(DTYPES[entry["dtype"]]), tuple(entry["shape"]), entry["data_offsets"]
    except (KeyError, TypeError, ValueError):
      raise _damaged(path, f"tensor {name} has a bad entry") from None
    count = int(np.prod(shape, dtype=np.int64))
    if not (0 <= begin <= end <= len(body)) or end - begin != count * dtype.itemsize:
      raise _damaged(path, f"tensor {name} lies outside the data: truncated")
    out[name] = np.frombuffer(body[begin:end], dtype.newbyteorder("<")).astype(dtype).reshape(shape)
  return out


def write(path: str, tensors: dict[str, np.ndarray], metadata: dict[str, str] | None = None) -> None:
  """{name: array} (dtypes of DTYPES) as a safetensors file, tensors in the given order, the header padded with
  spaces to a multiple of 8 bytes (as the reference writer does)."""
  header, offset = {}, 0
  arrays = {name: np.ascontiguousarray(array) for name, array in tensors.items()}
  for name, array in arrays.items():
    header[name] = dict(dtype=NAMES[array.dtype], shape=list(array.shape), data_offsets=[offset, offset + array.nbytes])
    offset += array.nbytes
  if metadata:
    header["__metadata__"] = metadata
  text = json.dumps(header, separators=(",", ":")).encode()
  text += b" " * (-len(text) % 8)
  with open(path, "wb") as f:
    f.write(struct.pack("<Q", len(text)) + text)
    for array in arrays.values():
      f.write(array.astype(array.dtype.newbyteorder("<")).tobytes())
