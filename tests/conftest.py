"""Test set-up: 4 simulated CPU devices, fail-fast collectives, quiet TF.

XLA_FLAGS must be set before jax is imported anywhere, which is why this
lives in conftest.py. The collective timeout turns a (known) XLA:CPU
multi-device deadlock into a failure instead of a stalled CI run.
"""
import os

_FLAGS = ("--xla_force_host_platform_device_count=4 "
          "--xla_cpu_collective_call_terminate_timeout_seconds=120")
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _FLAGS).strip()
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

# Compiled steps are reused across tests and subprocesses of one run (and
# across runs on the same machine): most tests compile the same tiny step.
os.environ.setdefault("ODIN_JAX_XLA_CACHE",
                      os.path.join(os.path.expanduser("~"), ".cache",
                                   "odin_jax", "xla_tests"))

import jax  # noqa: E402

jax.config.update("jax_compilation_cache_dir", os.environ["ODIN_JAX_XLA_CACHE"])
jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
