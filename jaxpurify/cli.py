"""Command line: `main.py --config configs/NAME.py[:ARGS] [--workdir DIR] [--config.a.b=VALUE ...] [--distributed]`.

The flags are absl flags and the config is `ml_collections.config_flags`' (the `file.py:arg` argument, typed
`--config.a.b=v` overrides, a locked config). This module only words their errors: every bad input ends in one
`error: ...` line on stderr and exit status 2, never a traceback. Loading a config imports no JAX.
"""

import contextlib
import os
import re
import sys
import tempfile
import traceback
from typing import NamedTuple

import ml_collections
from absl import flags
from ml_collections import config_flags

from jaxpurify.errors import Stopped, UserError

USAGE = ("usage: python main.py --config configs/NAME.py[:key=val,flag] [--workdir DIR] "
         "[--config.a.b=value ...] [--distributed]")


class Args(NamedTuple):
  """A parsed command line: the config file, its argument, the workdir (None: the default), the raw
  `--config.a.b=value` overrides, --distributed, and the values of any extra flags by name."""
  config: str
  arg: str | None
  workdir: str | None
  overrides: list[str]
  distributed: bool
  extra: dict


def _flag_name(item: str) -> str:
  return item.lstrip("-").partition("=")[0]


def parse_argv(argv: list[str], usage: str = USAGE, extra_flags: dict | None = None, workdir: bool = True,
               config: bool = True) -> Args:
  """Splits argv (without the program's name) into Args; --config is required, other names refused.

  extra_flags: {name: (default, parse(text) -> value)} of a tool's own flags (`--name=value` or `--name value`).
  workdir: whether --workdir is one of the flags. config: whether --config is (False: refused; Args.config None).
  """
  extra_flags = extra_flags or {}
  takes_workdir, takes_config, config, workdir = workdir, config, None, None
  overrides, distributed, extra = [], False, {name: default for name, (default, _) in extra_flags.items()}
  args = list(argv)
  while args:
    item = args.pop(0)
    name, eq, value = _flag_name(item), "=" in item, item.partition("=")[2]
    if not item.startswith("--") or not (name == "distributed" or name in extra_flags
                                         or ((name == "config" or name.startswith("config.")) and takes_config)
                                         or (name == "workdir" and takes_workdir)):
      raise UserError(f"unknown argument {item!r}; {usage}")
    if name == "distributed" and not eq:
      distributed = True
      continue
    if not eq:
      if not args or args[0].startswith("--"):
        raise UserError(f"--{name} needs a value; write --{name}=VALUE")
      value = args.pop(0)
      item = f"--{name}={value}"
    if name == "config":
      config = value
    elif name == "workdir":
      workdir = value
    elif name == "distributed":
      distributed = value.lower() in ("true", "1")
    elif name in extra_flags:
      extra[name] = extra_flags[name][1](value)
    else:
      overrides.append(item)
  if not takes_config:
    return Args(None, None, workdir, overrides, distributed, extra)
  if config is None:
    raise UserError(f"--config is required; {usage}")
  path, _, arg = config.partition(":")
  return Args(path, arg or None, workdir, overrides, distributed, extra)


def wants_help(argv: list[str], usage: str) -> bool:
  """Prints the usage and the config files, and says so, when argv asks for help (-h, --help)."""
  if not any(item in ("-h", "--help") for item in argv):
    return False
  print(f"{usage}\n\nconfigs: {', '.join(known_configs()) or 'none found in configs/'} (each takes quick, tiny and smoke; "
        "its docstring shows its arguments)")
  return True


def known_configs(directory: str = "configs") -> list[str]:
  """The runnable config files in `directory`: those that define get_config."""
  if not os.path.isdir(directory):
    return []
  found = []
  for name in sorted(os.listdir(directory)):
    if name.endswith(".py"):
      with open(os.path.join(directory, name), encoding="utf-8") as f:
        if re.search(r"^def get_config\(", f.read(), re.M):
          found.append(f"{directory}/{name}")
  return found


def _innermost(err: BaseException) -> BaseException:
  """The exception at the bottom of a chain (config_flags re-raises a config's ValueError with a traceback)."""
  while err.__context__ is not None and err.__context__ is not err:
    err = err.__context__
  return err


def _check_override_keys(config: ml_collections.ConfigDict, overrides: list[str]) -> None:
  """UserError naming the first override whose key the config does not have, and the keys next to it."""
  for item in overrides:
    key = _flag_name(item)[len("config."):]
    node, parts = config, key.split(".")
    for i, part in enumerate(parts):
      where = ".".join(parts[:i]) or "config"
      if not isinstance(node, ml_collections.ConfigDict):
        raise UserError(f"unknown config key {key!r}; {where} is a value, not a group of keys")
      if part not in node:
        raise UserError(f"unknown config key {key!r}; keys under {where}: {', '.join(sorted(node.keys()))}")
      node = node[part]


def load_config(path: str, arg: str | None = None, overrides: list[str] = ()) -> ml_collections.ConfigDict:
  """The locked config of `path`'s get_config(arg) with `--config.a.b=value` overrides applied, through
  ml_collections.config_flags; every problem is a UserError of one line."""
  if not os.path.isfile(path):
    known = known_configs()
    raise UserError(f"config file {path} does not exist; use one of {', '.join(known) or 'the files in configs/'}")
  root = os.path.dirname(os.path.dirname(os.path.abspath(path)))
  if root not in sys.path:
    sys.path.insert(0, root)  # configs import `configs.common`
  argv = ["jaxpurify", f"--config={path}" + (f":{arg}" if arg else ""), *overrides]
  values = flags.FlagValues()
  config_flags.DEFINE_config_file("config", None, "the experiment's config", flag_values=values, lock_config=True,
                                  sys_argv=argv)
  try:
    values(argv)
    return values.config
  except flags.Error as err:
    if str(err).startswith(f"flag --config={path}"):  # get_config refused its argument
      raise UserError(f"{path}: {_innermost(err)}") from None
    message = re.sub(r"^flag (--\S+?)=", r"\1=", str(err).splitlines()[0])
    raise UserError(f"{message}; fix the value's type") from None
  except (AttributeError, KeyError):  # an override of a key the config does not have
    _check_override_keys(load_config(path, arg), overrides)
    raise


def default_workdir(path: str, arg: str | None) -> str:
  name = os.path.splitext(os.path.basename(path))[0]
  suffix = re.sub(r"[^A-Za-z0-9_.=+-]+", "-", arg) if arg else ""
  return os.path.join("runs", f"{name}-{suffix}" if suffix else name)


def guarded(body, workdir=lambda: None, distributed: bool = False) -> int:
  """Runs `body()` as a command -> its exit status (docs/guarantees.md): 0 when it returns; 2 with one `error:`
  line for bad input; 130 (SIGINT) or 143 (SIGTERM, preemption) with one line, after a training loop saved its
  step; 1 with one line and a log holding the traceback for anything unexpected (a bug). `workdir()` names the
  run's workdir once known (where the log goes); SIGTERM and SIGINT are handled unless `distributed`."""
  from jaxpurify.train import signals  # pylint: disable=g-import-not-at-top
  try:
    with contextlib.nullcontext() if distributed else signals.installed():
      body()
    return 0
  except UserError as err:
    print(f"error: {err}", file=sys.stderr)
    return 2
  except Stopped as err:
    print(err, file=sys.stderr)
    return err.status
  except KeyboardInterrupt:
    print("interrupted; re-run the same command to resume from the last checkpoint", file=sys.stderr)
    return 130
  except Exception as err:  # noqa: BLE001  (anything else is a bug: one line and a log)
    log = write_traceback(workdir())
    print(f"error: unexpected {type(err).__name__}: {str(err).splitlines()[0][:300] if str(err) else ''} (a bug in "
          f"jaxpurify; the traceback is in {log}, please report it)", file=sys.stderr)
    return 1


def main(argv: list[str]) -> int:
  """`python main.py ...`: the experiment of the config run (or resumed) in its workdir; exit statuses of
  `guarded`."""
  if wants_help(argv, USAGE):
    return 0
  where = {}
  distributed = bool(os.environ.get("JAXPURIFY_DIST")) or any(
      item == "--distributed" or item.lower() in ("--distributed=true", "--distributed=1") for item in argv)

  def body():
    args = parse_argv(argv)
    config = load_config(args.config, args.arg, args.overrides)
    if distributed:
      initialize_distributed()
    enable_compilation_cache()
    where["workdir"] = args.workdir or default_workdir(args.config, args.arg)
    from jaxpurify import experiments  # pylint: disable=g-import-not-at-top
    experiments.run(config, where["workdir"])

  return guarded(body, lambda: where.get("workdir"), distributed)


def enable_compilation_cache() -> None:
  """XLA's persistent compilation cache, so that another run (a new workdir, a resumed one) loads the compiled
  steps instead of compiling them again: in JAX_COMPILATION_CACHE_DIR where set, else in
  $XDG_CACHE_HOME/jaxpurify/xla (~/.cache/jaxpurify/xla)."""
  import jax  # pylint: disable=g-import-not-at-top
  if not jax.config.jax_compilation_cache_dir:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    jax.config.update("jax_compilation_cache_dir", os.path.join(base, "jaxpurify", "xla"))


def initialize_distributed() -> None:
  """jax.distributed.initialize() (before any other JAX call) from the standard variables JAX_COORDINATOR_ADDRESS,
  JAX_NUM_PROCESSES and JAX_PROCESS_ID, or from what JAX detects itself (Slurm, Open MPI, TPU pods)."""
  import jax  # pylint: disable=g-import-not-at-top
  if jax.distributed.is_initialized():
    return
  kwargs = {}
  for variable, name in (("JAX_NUM_PROCESSES", "num_processes"), ("JAX_PROCESS_ID", "process_id")):
    if variable in os.environ:
      try:
        kwargs[name] = int(os.environ[variable])
      except ValueError:
        raise UserError(f"{variable}={os.environ[variable]!r} is not an integer; set it to one") from None
  try:
    jax.distributed.initialize(**kwargs)
  except (ValueError, TypeError) as err:
    raise UserError(f"--distributed could not start ({err}); set JAX_COORDINATOR_ADDRESS (host:port of process 0), "
                    "JAX_NUM_PROCESSES and JAX_PROCESS_ID, or run under Slurm, Open MPI or on a TPU pod") from None


def write_traceback(workdir: str | None) -> str:
  """Writes the current exception's traceback to the run's error.log (a claimed workdir), else to a file in the
  temporary folder, so that a workdir given back after a failed start stays empty; -> the log's path."""
  if workdir and os.path.exists(os.path.join(workdir, "config.json")):
    path = os.path.join(workdir, "error.log")
  else:
    path = os.path.join(tempfile.gettempdir(), f"jaxpurify-error-{os.getpid()}.log")
  with open(path, "w", encoding="utf-8") as f:
    f.write(traceback.format_exc())
  return path
