"""Command line: `main.py --config configs/NAME.py[:ARGS] [--workdir DIR] [--config.a.b=VALUE ...]`.

Every bad input ends in one line on stderr and exit status 2, never a traceback.
"""

import ast
import importlib.util
import os
import re
import sys

import ml_collections

from jaxpurify.errors import UserError

USAGE = ("usage: python main.py --config configs/NAME.py[:key=val,flag] [--workdir DIR] "
         "[--config.a.b=value ...] [--distributed]")


def parse_argv(argv: list[str]) -> dict:
  """-> {'config': path, 'arg': str|None, 'workdir': str|None, 'overrides': [(key, text)], 'distributed': bool}."""
  out = {"config": None, "arg": None, "workdir": None, "overrides": [], "distributed": False}
  args = list(argv)
  while args:
    item = args.pop(0)
    name, eq, value = item.partition("=")
    if name == "--distributed" and not eq:
      out["distributed"] = True
      continue
    if not (name == "--config" or name == "--workdir" or name.startswith("--config.")):
      raise UserError(f"unknown argument {item!r}; {USAGE}")
    if not eq:
      if not args:
        raise UserError(f"{name} needs a value; {USAGE}")
      value = args.pop(0)
    if name == "--config":
      out["config"], _, arg = value.partition(":")
      out["arg"] = arg or None
    elif name == "--workdir":
      out["workdir"] = value
    else:
      out["overrides"].append((name[len("--config."):], value))
  if out["config"] is None:
    raise UserError(f"--config is required; {USAGE}")
  return out


def load_config(path: str, arg: str | None) -> ml_collections.ConfigDict:
  if not os.path.isfile(path):
    known = sorted(f for f in os.listdir("configs") if f.endswith(".py") and f not in ("__init__.py", "common.py")) \
        if os.path.isdir("configs") else []
    raise UserError(f"config file {path} does not exist; use one of {', '.join('configs/' + k for k in known)}")
  root = os.path.dirname(os.path.dirname(os.path.abspath(path)))
  if root not in sys.path:
    sys.path.insert(0, root)  # configs import `configs.common`
  spec = importlib.util.spec_from_file_location(f"_jaxpurify_config_{os.path.basename(path)[:-3]}", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  try:
    config = module.get_config(arg)
  except ValueError as err:
    raise UserError(f"{path}: {err}") from None
  config.lock()
  return config


def _parse_value(text: str, current):
  if isinstance(current, bool):
    if text.lower() not in ("true", "false", "1", "0"):
      raise ValueError("expected true or false")
    return text.lower() in ("true", "1")
  if isinstance(current, str):
    return text
  try:
    value = ast.literal_eval(text)
  except (ValueError, SyntaxError):
    raise ValueError(f"{text!r} is not a Python literal") from None
  if isinstance(current, float) and isinstance(value, int) and not isinstance(value, bool):
    value = float(value)
  if isinstance(current, (tuple, list)) and isinstance(value, (tuple, list)):
    value = type(current)(value)
  if current is not None and not isinstance(value, type(current)):
    raise ValueError(f"expected a {type(current).__name__}, got {type(value).__name__}")
  return value


def apply_overrides(config: ml_collections.ConfigDict, overrides) -> None:
  for key, text in overrides:
    *parents, leaf = key.split(".")
    node = config
    for i, part in enumerate(parents + [leaf]):
      if not isinstance(node, ml_collections.ConfigDict) or part not in node:
        where = ".".join(parents[:i]) or "config"
        known = ", ".join(sorted(node.keys())) if isinstance(node, ml_collections.ConfigDict) else "none"
        raise UserError(f"unknown config key {key!r}; keys under {where}: {known}")
      if i < len(parents):
        node = node[part]
    try:
      node[leaf] = _parse_value(text, node[leaf])
    except (ValueError, TypeError) as err:
      raise UserError(f"--config.{key}={text}: {err}; fix the value's type") from None


def default_workdir(path: str, arg: str | None) -> str:
  name = os.path.splitext(os.path.basename(path))[0]
  suffix = re.sub(r"[^A-Za-z0-9_.=+-]+", "-", arg) if arg else ""
  return os.path.join("runs", f"{name}-{suffix}" if suffix else name)


def main(argv: list[str]) -> int:
  try:
    args = parse_argv(argv)
    if args["distributed"] or os.environ.get("JAXPURIFY_DIST"):
      import jax  # pylint: disable=g-import-not-at-top
      if not jax.distributed.is_initialized():
        jax.distributed.initialize()  # must precede every other JAX call
    config = load_config(args["config"], args["arg"])
    apply_overrides(config, args["overrides"])
    workdir = args["workdir"] or default_workdir(args["config"], args["arg"])
    from jaxpurify import experiments  # pylint: disable=g-import-not-at-top
    experiments.run(config, workdir)
    return 0
  except UserError as err:
    print(f"error: {err}", file=sys.stderr)
    return 2
  except KeyboardInterrupt:
    print("interrupted; re-run the same command to resume from the last checkpoint", file=sys.stderr)
    return 130
