"""Shared test configuration.

* float64 is available, and every test states its dtype.
* XLA compiles at optimization level 0 (``FAST_COMPILE_FLAGS``): most of the
  suite's time is compiling many small programs that then run a few steps, and
  the unoptimized build compiles about 1.6x faster. Set
  ``CURVATURE_TEST_XLA_DEFAULT=1`` to test with XLA's default optimizations.
* A persistent compilation cache (``CURVATURE_TEST_CACHE_DIR``, by default a
  folder under the system temp dir) is shared by the xdist workers and the
  subprocess tests, so a program compiled once is not compiled again, in this
  run or the next.
"""
import os
import tempfile

FAST_COMPILE_FLAGS = ("--xla_backend_optimization_level=0 "
                      "--xla_llvm_disable_expensive_passes=true")

if not os.environ.get("CURVATURE_TEST_XLA_DEFAULT"):
  # Before jax creates its backend; inherited by subprocesses and notebook
  # kernels, whose own flags are appended to these.
  os.environ["XLA_FLAGS"] = " ".join(
      [FAST_COMPILE_FLAGS, os.environ.get("XLA_FLAGS", "")]).strip()
os.environ.setdefault(
    "CURVATURE_TEST_CACHE_DIR",
    os.path.join(tempfile.gettempdir(), "curvature-test-jax-cache"))
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR",
                      os.environ["CURVATURE_TEST_CACHE_DIR"])
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.2")

import jax  # noqa: E402  (after the environment above)

jax.config.update("jax_enable_x64", True)
