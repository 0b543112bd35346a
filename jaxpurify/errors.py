"""User-facing errors: one line that names the problem and the fix, printed without a traceback."""


class UserError(Exception):
  """Bad input from the user (config, data, workdir). `str(err)` is the whole message shown."""
