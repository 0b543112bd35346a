"""User-facing errors: one line that names the problem and the fix, printed without a traceback."""


class UserError(Exception):
  """Bad input from the user (config, data, workdir). `str(err)` is the whole message shown."""


class Stopped(Exception):
  """The run stopped on a signal or a preemption notice after saving; `str(err)` is the one line shown and `status`
  the exit status (128 + the signal's number: 130 for SIGINT, 143 for SIGTERM and preemption)."""

  def __init__(self, message: str, status: int):
    super().__init__(message)
    self.status = status


def moved(package: str, table: dict[str, str]):
  """A module `__getattr__` for names that moved: {old name: new dotted path} -> ImportError naming the new home
  (raised from `from package import name` and `package.name` alike)."""

  def __getattr__(name: str):
    if name in table:
      raise ImportError(f"{package}.{name} moved to {table[name]}; import it from there (docs/api.md)")
    raise AttributeError(f"module {package!r} has no attribute {name!r}")

  return __getattr__
