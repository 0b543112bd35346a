"""What importing jaxpurify sets for XLA's CPU backend (jaxpurify/__init__.py): the thread pool for fake CPU
devices (a pool of max(cores, n) threads can deadlock an all-reduce over n devices; jaxpurify asks for
max(cores, 2n)), on x86 Eigen's convolutions instead of YNNPACK's, and the restart of a jaxpurify command with
glibc's huge pages; and what the ResNets do for XLA:CPU's fusion (`resnet.held`)."""

import os
import platform
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxpurify
from jaxpurify.models import resnet

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


_THP = "always [madvise] never"


def test_a_jaxpurify_command_restarts_once_with_huge_pages_and_nothing_else_does():
  main = os.path.join(ROOT, "main.py")
  restart = lambda argv0, argv, environ=None, libc=("glibc", "2.36"), thp=_THP: jaxpurify.huge_page_restart(
      argv0, argv, environ or {}, libc, thp)
  assert restart("-m", ["python", "-m", "jaxpurify.bench", "--steps", "5"])
  assert restart(main, ["python", main, "--config", "configs/simclr.py:quick"])
  assert restart(os.path.relpath(main), ["python", "main.py"])
  assert not restart("-m", ["python", "-m", "jaxpurify.bench"], {"GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"})
  assert not restart("-m", ["python", "-m", "jaxpurify.bench"], {"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"})
  assert not restart("-m", ["python", "-m", "pytest", "-q"])
  assert not restart("/tmp/main.py", ["python", "/tmp/main.py"])  # another program's main.py
  assert not restart("-c", ["python", "-c", "import jaxpurify"])
  assert not restart("", ["python"])  # the interactive interpreter
  assert not restart("-m", ["python", "-m", "jaxpurify.bench"], libc=("glibc", "2.31"))  # no hugetlb tunable
  assert not restart("-m", ["python", "-m", "jaxpurify.bench"], libc=("", ""))  # musl and others
  assert not restart("-m", ["python", "-m", "jaxpurify.bench"], thp="always madvise [never]")
  assert restart("-m", ["python", "-m", "jaxpurify.bench"], thp="[always] madvise never")


def test_held_is_the_identity_in_value_and_gradient():
  x = jax.random.normal(jax.random.key(0), (2, 4, 4, 3))
  np.testing.assert_array_equal(jax.jit(resnet.held)(x), x)
  g = jax.grad(lambda x: jnp.sum(jnp.sin(resnet.held(x))))(x)
  np.testing.assert_array_equal(g, jnp.cos(x))


# The kernel gradient of a ResNet-10 step compiled with XLA's optimisations on: how many of the compiled program's
# fused computations transpose an activation for a kernel gradient (every one at this size), and how many of those
# recompute a ReLU inside the transpose instead of reading the stored activation.
_KERNEL_GRADIENT_TRANSPOSES = r"""
import sys
import jaxpurify
from jaxpurify.models import resnet
if sys.argv[1] == "without-held":
  resnet.held = lambda x: x
import jax, jax.numpy as jnp
from flax import nnx
model = resnet.ResNet(*resnet.RESNETS["resnet10"], width=4, rngs=nnx.Rngs(0))
graphdef, params, rest = nnx.split(model, nnx.Param, ...)
loss = lambda params, x: jnp.sum(nnx.merge(graphdef, params, rest, copy=True)(x, train=True)[0] ** 2)
text = jax.jit(jax.grad(loss)).lower(params, jnp.ones((8, 16, 16, 3))).compile().as_text()
transposes = [c for c in text.split(2 * chr(10)) if not c.startswith("ENTRY") and " transpose(" in c]
print(len(transposes), sum(" maximum(" in c for c in transposes))
"""


def _kernel_gradient_transposes(variant: str) -> tuple[int, int]:
  environ = {k: v for k, v in os.environ.items() if k != "JAX_DISABLE_MOST_OPTIMIZATIONS"}
  out = subprocess.run([sys.executable, "-c", _KERNEL_GRADIENT_TRANSPOSES, variant], cwd=ROOT, env=environ,
                       capture_output=True, text=True, check=True)
  transposes, recomputing = out.stdout.split()
  return int(transposes), int(recomputing)


def test_kernel_gradients_transpose_the_stored_activations_instead_of_recomputing_them():
  transposes, recomputing = _kernel_gradient_transposes("with-held")
  assert transposes >= 8 and recomputing == 0
  assert _kernel_gradient_transposes("without-held")[1] >= 4  # what XLA:CPU does without `held`
