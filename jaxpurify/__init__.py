"""jaxpurify: backdoor attacks on pre-trained image encoders and defenses, in JAX/Flax.

`jaxpurify.losses` is importable on its own (no CLI, no data code) by other JAX projects.
"""

import os

__version__ = "0.1.0"


def _enough_threads_for_cpu_collectives():
  """XLA:CPU runs the programs of all fake CPU devices (JAX_NUM_CPU_DEVICES=n) on one pool of max(cores, n)
  threads. With exactly n, a cross-device all-reduce can wait for participants that never get a thread while
  other work holds one, and XLA aborts the process after 40 s (seen on 2 cores under load: 4 deadlocks in 5
  runs of 3,000 steps; none with 2n threads). PJRT_NPROC sizes that pool; it must be set before the backend
  starts, and a value the user set is kept."""
  devices = os.environ.get("JAX_NUM_CPU_DEVICES", "")
  if devices.isdigit() and int(devices) > 1 and "PJRT_NPROC" not in os.environ:
    os.environ["PJRT_NPROC"] = str(max(os.cpu_count() or 1, 2 * int(devices)))


_enough_threads_for_cpu_collectives()
