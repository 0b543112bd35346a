"""jaxpurify: backdoor attacks on pre-trained image encoders and defenses, in JAX/Flax.

`jaxpurify.losses` is importable on its own (no CLI, no data code) by other JAX projects.
"""

import os
import platform
from importlib import metadata

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


def _eigen_convolutions_on_x86_cpus():
  """jaxlib 0.10's XLA:CPU hands large convolutions to YNNPACK; on x86 those ran jaxpurify's ResNet steps slower
  than XLA's Eigen convolutions (2-core Xeon, images/s YNNPACK -> Eigen: SimCLR step at width 64, batch 256,
  13.6 -> 24.2; at width 16, batch 128: SimCLR 96 -> 135, BadEncoder 102 -> 117, distillation 142 -> 166, FT-all
  268 -> 434; width 8: up to 1.15x or within noise). So convolutions go to Eigen, through XLA_FLAGS before the
  backend starts, unless XLA_FLAGS already names the YNN fusion types. GPU and TPU backends ignore xla_cpu_ flags;
  another jaxlib (which may not know the flag: XLA aborts on unknown flags) is left alone."""
  flags = os.environ.get("XLA_FLAGS", "")
  if (platform.machine().lower() not in ("x86_64", "amd64") or "xla_cpu_experimental_ynn_fusion_type" in flags
      or not metadata.version("jaxlib").startswith("0.10.")):
    return
  os.environ["XLA_FLAGS"] = f"{flags} --xla_cpu_experimental_ynn_fusion_type=-individual_convolution".strip()


_enough_threads_for_cpu_collectives()
_eigen_convolutions_on_x86_cpus()
