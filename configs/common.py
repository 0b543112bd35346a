"""Shared config pieces: the `:key=val,flag` argument language and blocks used by several configs."""

import ml_collections

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2023, 0.1994, 0.2010)


def parse_arg(arg: str | None, **defaults) -> ml_collections.ConfigDict:
  """'quick,dataset=svhn_cropped' -> ConfigDict over `defaults`, values converted to the default's type.

  A bare word that names a boolean key sets it to True; any other bare value fills the first key
  (unless that key is a boolean). Unknown keys and unconvertible values raise ValueError.
  """
  out = ml_collections.ConfigDict(defaults)
  first = next(iter(defaults), None)
  for item in filter(None, (arg or "").split(",")):
    key, eq, value = item.partition("=")
    if not eq:
      if isinstance(defaults.get(key), bool):
        key, value = key, "True"
      elif first is not None and not isinstance(defaults[first], bool):
        key, value = first, item
    if key not in defaults:
      raise ValueError(f"unknown config argument {key!r}; known: {', '.join(defaults)}")
    kind = type(defaults[key])
    if kind is bool:
      if value.lower() not in ("true", "false", "1", "0"):
        raise ValueError(f"config argument {key}={value!r} is not a boolean")
      out[key] = value.lower() in ("true", "1")
    else:
      try:
        out[key] = kind(value)
      except ValueError:
        raise ValueError(f"config argument {key}={value!r} is not a {kind.__name__}") from None
  return out


def mesh():
  """Data parallelism over every device; add e.g. ('fsdp', n) here later."""
  return [("data", -1)]


def mlp_eval():
  """BadEncoder's downstream MLP protocol (shared/spec/attacks.md section 6.1)."""
  return ml_collections.ConfigDict(dict(epochs=500, lr=1e-4, batch_size=64, hidden=(512, 256), dropout=0.5))


def linear_eval():
  """Linear probe on standardised features (SSL-Backdoor / CorruptEncoder protocol)."""
  return ml_collections.ConfigDict(dict(epochs=40, lr=0.01, batch_size=256, milestones=(15, 30)))


def knn_eval():
  """Weighted kNN monitor (BadEncoder: k 200, t 0.5)."""
  return ml_collections.ConfigDict(dict(k=200, t=0.5))
