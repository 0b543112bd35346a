"""What importing jaxpurify sets for XLA's CPU backend (jaxpurify/__init__.py): the thread pool for fake CPU
devices (a pool of max(cores, n) threads can deadlock an all-reduce over n devices; jaxpurify asks for
max(cores, 2n)), and on x86 Eigen's convolutions instead of YNNPACK's."""

import os
import platform
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



# A convolution's gradient at a size YNNPACK takes (a batch of 128 at 32x32), compiled with XLA's optimisations on
# (the test session turns most off, and YNNPACK's fusions with them): how many convolutions XLA gave YNNPACK (those
# in a computation that a "__ynn_fusion" fusion calls), and XLA_FLAGS as the process saw it.
_YNN_CONVOLUTIONS = r"""
import os, re, sys
if sys.argv[1] == "jaxpurify":
  import jaxpurify
import jax, jax.numpy as jnp
f = lambda x, w: jax.lax.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")).sum()
hlo = jax.jit(jax.grad(f, argnums=(0, 1))).lower(jnp.ones((128, 32, 32, 16)), jnp.ones((3, 3, 16, 16))).compile()
text = hlo.as_text()
ynn = {m.group(1) for m in re.finditer(r"calls=%([\w.-]+).*__ynn_fusion", text)}
print(sum(part.strip().split(" ")[0].lstrip("%") in ynn and " convolution(" in part for part in text.split("\n\n")))
print(os.environ.get("XLA_FLAGS", ""))
"""


def _ynn_convolutions(importing: str, **env) -> tuple[int, str]:
  environ = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_DISABLE_MOST_OPTIMIZATIONS")}
  out = subprocess.run([sys.executable, "-c", _YNN_CONVOLUTIONS, importing], cwd=ROOT, env={**environ, **env},
                       capture_output=True, text=True, check=True)
  count, flags = out.stdout.split("\n")[:2]
  return int(count), flags


@pytest.mark.skipif(platform.machine().lower() not in ("x86_64", "amd64"), reason="set on x86 only")
def test_on_x86_convolutions_go_to_eigen_not_ynnpack_and_a_users_choice_is_kept():
  assert _ynn_convolutions("jax")[0] >= 1  # jaxlib's default: YNNPACK takes the convolution
  assert _ynn_convolutions("jaxpurify") == (0, "--xla_cpu_experimental_ynn_fusion_type=-individual_convolution")
  mine = "--xla_cpu_experimental_ynn_fusion_type=+individual_convolution"
  count, flags = _ynn_convolutions("jaxpurify", XLA_FLAGS=mine)
  assert count >= 1 and flags == mine
