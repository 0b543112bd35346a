"""SIGTERM and SIGINT: inside a training loop they stop it at the next step boundary, after a checkpoint; elsewhere
they stop the run at once. Either way the command prints one line and exits with `STATUS` (128 + the signal's
number, as shells report it); re-running the same command resumes.

The handlers are installed by the command line for single-process runs only: a multi-process run leaves SIGTERM to
JAX's preemption service, which agrees on a common step across processes (orbax's `reached_preemption`).
"""

import contextlib
import signal
import threading

from jaxpurify.errors import Stopped

STATUS = {signal.SIGINT: 130, signal.SIGTERM: 143}

_state = {"deferring": False, "pending": None}


def stopped(message: str, signum: int) -> Stopped:
  """The Stopped exception of signal `signum`."""
  return Stopped(message, STATUS[signum])


def _handle(signum, frame):
  del frame
  if _state["deferring"] and _state["pending"] is None:
    _state["pending"] = signum  # the loop saves and stops after this step
    return
  if signum == signal.SIGINT:
    raise KeyboardInterrupt
  raise stopped(f"stopped by {signal.Signals(signum).name} outside a training step; re-run the same command to "
                "resume from the last checkpoint", signum)


@contextlib.contextmanager
def installed():
  """SIGTERM and SIGINT handled as above while the block runs (main thread only), the old handlers after it."""
  if threading.current_thread() is not threading.main_thread():
    yield
    return
  old = {signum: signal.signal(signum, _handle) for signum in STATUS}
  try:
    yield
  finally:
    for signum, handler in old.items():
      signal.signal(signum, handler)


@contextlib.contextmanager
def deferred():
  """While the block runs, a first SIGTERM or SIGINT is only recorded (`pending()`); a second one acts at once."""
  _state.update(deferring=True, pending=None)
  try:
    yield
  finally:
    _state.update(deferring=False, pending=None)


def pending() -> int | None:
  """The signal received during `deferred()`, or None."""
  return _state["pending"]
