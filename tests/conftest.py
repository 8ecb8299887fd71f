"""Test set-up: 4 simulated CPU devices, fail-fast collectives, quiet TF.

XLA_FLAGS must be set before jax is imported anywhere, which is why this
lives in conftest.py. The collective timeout turns a (known) XLA:CPU
multi-device deadlock into a failure instead of a stalled CI run.

Below that set-up: the `slow` marker and the fixtures several files share
(set-up code that is not a fixture is in tests/helpers.py). Session-scoped
fixtures are built once per process, i.e. once per pytest-xdist worker.
"""
from __future__ import annotations

import os

# The last two flags lower XLA:CPU's LLVM optimisation, not what is computed:
# the suite compiles hundreds of tiny programs and runs each for a step or
# two, so compile time is most of its time (-O0 compiles the tiny step ~35 %
# faster; its numbers differ from -O2's by ~1e-7, far below every test's
# tolerance). Subprocesses inherit them through the environment.
# A test that compares against numbers recorded at the default level (where
# k-means assignments can amplify that rounding) runs a subprocess without
# them: helpers.default_optimisation_env().
FAST_COMPILE_FLAGS = ("--xla_backend_optimization_level=0 "
                      "--xla_llvm_disable_expensive_passes=true")
_FLAGS = ("--xla_force_host_platform_device_count=4 "
          "--xla_cpu_collective_call_terminate_timeout_seconds=120 "
          + FAST_COMPILE_FLAGS)
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

# --- Below: shared fixtures (jax is configured above) -----------------------

import pytest  # noqa: E402


def pytest_configure(config):
  # The repository has no pytest.ini / pyproject.toml: the marker is
  # registered here. The README's command runs every test, slow ones too;
  # `-m "not slow"` skips the slowest for local iteration.
  config.addinivalue_line(
      "markers", "slow: one of the slowest tests (a real training run, a "
      "subprocess that compiles, a notebook); deselect with -m 'not slow'")


@pytest.fixture(scope="session")
def photos_data_dir(tmp_path_factory):
  """A TFDS data_dir holding helpers.OdinTestPhotos (six JPEG photo crops,
  'train' in two ArrayRecord shards of 3), built once per process.

  Shared: read it only; a test that changes the dataset copies it first.
  """
  from tests import helpers  # pylint: disable=g-import-not-at-top
  return helpers.prepare_photos(str(tmp_path_factory.mktemp("tfds_photos")))
