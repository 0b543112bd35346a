"""jaxpurify: backdoor attacks on pre-trained image encoders and defenses, in JAX/Flax.

`jaxpurify.losses` is importable on its own (no CLI, no data code) by other JAX projects.
"""

import os
import platform
import sys
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


HUGE_PAGE_TUNABLE = "glibc.malloc.hugetlb=1"


def huge_page_restart(argv0: str, orig_argv: list[str], environ: dict, libc: tuple[str, str], thp: str) -> bool:
  """Whether this process is a jaxpurify command (`main.py` of this checkout, or `python -m jaxpurify.X`; argv0
  is sys.argv[0] while jaxpurify is being imported: '-m' under -m) that should start again with
  GLIBC_TUNABLES=glibc.malloc.hugetlb=1: on Linux with glibc >= 2.35 (libc: os.confstr's ('glibc', '2.36')),
  transparent huge pages not off (thp: /sys/kernel/mm/transparent_hugepage/enabled), GLIBC_TUNABLES not set."""
  if "GLIBC_TUNABLES" in environ or libc[0] != "glibc" or "[never]" in thp or not thp:
    return False
  try:
    if tuple(int(part) for part in libc[1].split(".")[:2]) < (2, 35):
      return False
  except ValueError:
    return False
  if argv0 == "-m":
    module = orig_argv[orig_argv.index("-m") + 1] if "-m" in orig_argv[:-1] else ""
    return module.startswith("jaxpurify.")
  main = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "main.py")
  return bool(argv0) and os.path.abspath(argv0) == main


def _huge_pages_for_cpu_buffers():
  """XLA:CPU allocates a step's buffers afresh on every step; glibc maps those of more than 32 MiB from the kernel
  and frees them after the step, so every step faults them in again in 4 KiB pages: a fifth of the quick ResNet
  steps' time on a 2-core CPU (SimCLR at width 8, batch 128: 393 -> 475 images/s with huge pages;
  docs/benchmark.md#cpu-steps-stored-activations-and-huge-pages). glibc (2.35+) asks for transparent huge pages when
  GLIBC_TUNABLES says glibc.malloc.hugetlb=1, which it reads only when a process starts: so a jaxpurify command
  starts itself once more with it, before importing anything else. A program that imports jaxpurify, and a
  GLIBC_TUNABLES the user set, are left alone."""
  if sys.platform != "linux" or not hasattr(sys, "orig_argv"):
    return
  try:
    with open("/sys/kernel/mm/transparent_hugepage/enabled", encoding="ascii") as f:
      thp = f.read()
  except OSError:
    return
  libc = tuple((os.confstr("CS_GNU_LIBC_VERSION") or "").split(" ", 1) + ["", ""])[:2]
  if huge_page_restart(sys.argv[0] if sys.argv else "", sys.orig_argv, os.environ, libc, thp):
    os.environ["GLIBC_TUNABLES"] = HUGE_PAGE_TUNABLE
    os.execv(sys.executable, sys.orig_argv)


_huge_pages_for_cpu_buffers()
_enough_threads_for_cpu_collectives()
_eigen_convolutions_on_x86_cpus()
