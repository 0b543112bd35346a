"""Importing jaxpurify sizes XLA's CPU thread pool for fake CPU devices (jaxpurify/__init__.py): the pool of
max(cores, n) threads can deadlock an all-reduce over n devices; jaxpurify asks for max(cores, 2n)."""

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# The XLA CPU client's Eigen pool has as many threads as its execution pool (both sized by PJRT_NPROC).
_COUNT_POOL = """
import collections, os
import jaxpurify, jax
jax.devices()
names = collections.Counter(open(f"/proc/self/task/{t}/comm").read().strip() for t in os.listdir("/proc/self/task"))
print(os.environ.get("PJRT_NPROC"), names["tf_XLAEigen"])
"""


def _pool(**env):
  environ = {k: v for k, v in os.environ.items() if k not in ("PJRT_NPROC", "NPROC", "JAX_NUM_CPU_DEVICES")}
  out = subprocess.run([sys.executable, "-c", _COUNT_POOL], cwd=ROOT, env={**environ, **env}, capture_output=True,
                       text=True, check=True)
  requested, threads = out.stdout.split()
  return requested, int(threads)


@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="thread names are read from /proc")
def test_eight_fake_devices_get_twice_as_many_threads_and_a_users_choice_is_kept():
  expected = max(os.cpu_count(), 16)
  assert _pool(JAX_NUM_CPU_DEVICES="8") == (str(expected), expected)
  assert _pool(JAX_NUM_CPU_DEVICES="8", PJRT_NPROC="9") == ("9", 9)
  assert _pool()[0] == "None"  # one device: nothing to size
