"""Test set-up: 8 fake CPU devices and fast XLA compilation, set before jax is imported."""
import os
import shutil
import tempfile

# The tests' models are tiny and run a few steps, so on 2 CPU cores XLA's compilation, not the
# computation, is most of the suite's time. LLVM at optimisation level 0 compiles about 3-4x
# faster (a tiny U-Net's initialisation: 15 s -> 4 s); results stay within the tests'
# tolerances, and subprocesses that set their own device count keep it (helpers.device_env).
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
    " --xla_backend_optimization_level=0"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

# Some programs compile again in other processes: the tiny model's train step in each
# `python -m tests.train_tiny` run of the checkpoint tests. One persistent compilation cache for
# the session (xdist workers and subprocesses inherit the variable) compiles them once. A fresh
# directory per session, so a run never depends on an earlier one; a cache the caller set is
# used and kept.
_OWN_CACHE = "JAX_COMPILATION_CACHE_DIR" not in os.environ
if _OWN_CACHE:
  os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="jaxseg-tests-xla-")
  os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0.5"


def pytest_unconfigure(config):
  # Only the process that made the directory removes it (xdist workers inherit it, set).
  if _OWN_CACHE:
    shutil.rmtree(os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)
