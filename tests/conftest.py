"""Every test runs on 8 fake CPU devices, set before JAX is imported (and before jaxpurify, which gives XLA's
CPU pool enough threads for their collectives), with fast compiles and one persistent
compilation cache that the test workers and the CLI processes they start share (environment variables, which
subprocesses inherit); the process that made the cache's folder removes it when it exits."""

import atexit
import os
import shutil
import tempfile

os.environ["JAX_NUM_CPU_DEVICES"] = "8"
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ["JAX_DISABLE_MOST_OPTIMIZATIONS"] = "1"  # fast compiles (as flax's imagenet test)
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="jaxpurify-test-xla-")
  atexit.register(shutil.rmtree, os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)
os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
os.environ["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "-1"

import jaxpurify  # noqa: E402,F401  (sizes XLA's CPU thread pool for the 8 devices; see its __init__)
import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)
