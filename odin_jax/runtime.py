"""Process set-up shared by every entry point (train, evaluate, export)."""

from __future__ import annotations

import logging
import os

import jax


def setup(cache_dir: str | None = None) -> None:
  """Hides accelerators from TensorFlow and enables the XLA compile cache.

  TensorFlow only feeds data; letting it see a GPU makes it grab memory
  that JAX needs. The persistent compilation cache makes a restarted run
  (resume after preemption) skip its multi-second compile.
  """
  from odin_jax.data import pipeline
  pipeline.hide_accelerators_from_tf()
  _quiet_library_logs()
  cache_dir = cache_dir or os.environ.get("ODIN_JAX_XLA_CACHE") or \
      os.path.join(os.path.expanduser("~"), ".cache", "odin_jax", "xla")
  jax.config.update("jax_compilation_cache_dir", cache_dir)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)


class _DropLibraryInfo(logging.Filter):
  """Orbax logs every file rename at INFO; keep its warnings only."""

  def filter(self, record: logging.LogRecord) -> bool:
    return record.levelno >= logging.WARNING or "orbax" not in record.pathname


def _quiet_library_logs() -> None:
  from absl import logging as absl_logging
  handler = absl_logging.get_absl_handler()
  if not any(isinstance(f, _DropLibraryInfo) for f in handler.filters):
    handler.addFilter(_DropLibraryInfo())
