"""Process set-up shared by every entry point (train, evaluate, export).

`setup()` is the first thing an entry point does. It

1. joins the JAX distributed runtime when this process is one of several
   (`detect_distributed` / `initialize_distributed`): this must happen
   before anything touches a device, because it decides which devices the
   process sees and that they form one global mesh;
2. hides accelerators from TensorFlow, quiets library logs, logs where
   this process stands (`describe_processes`) and turns on the persistent
   XLA compilation cache (except for several CPU processes, see `setup`);
3. with several processes, starts `failure.watch_peers`: another process's
   failure then ends this one at once (odin_jax/failure.py).

Multi-process environments, in the order they are looked for:

  ODIN_JAX_DISTRIBUTED=0         never initialise (one process, even under
                                 SLURM or on a TPU pod host)
  ODIN_JAX_COORDINATOR=host:port explicit settings (any launcher, the
  ODIN_JAX_NUM_PROCESSES=N       loopback test): all three or none; the
  ODIN_JAX_PROCESS_ID=i          coordinator is process 0's address and a
                                 free port there
  SLURM_NTASKS > 1 inside srun   one process per task; JAX reads the
                                 coordinator (first node of the step), the
                                 process id and, on GPUs, the local device
                                 (SLURM_LOCALID) from SLURM's variables
  a Cloud TPU VM                 JAX reads the workers of the slice from the
                                 VM metadata (one process per host)
  ODIN_JAX_DISTRIBUTED=1         initialise with JAX's auto-detection anyway
                                 (Open MPI, Kubernetes, ...)

ODIN_JAX_INIT_TIMEOUT (seconds, default 300) bounds the wait for the other
processes. JAX_LOCAL_DEVICE_IDS (read by JAX itself) restricts the devices a
process uses, e.g. "0,1,2,3" for one process per node under SLURM.

Process topology lives in the environment, not in the config: it describes
how a run was launched (and may change when a preempted run resumes on
another slice), not what it computes.
"""

from __future__ import annotations

import collections
import dataclasses
import logging as pylogging
import os
import re
import socket
from typing import Mapping

import jax
from absl import logging

from odin_jax import failure

ENV_SWITCH = "ODIN_JAX_DISTRIBUTED"
ENV_COORDINATOR = "ODIN_JAX_COORDINATOR"
ENV_NUM_PROCESSES = "ODIN_JAX_NUM_PROCESSES"
ENV_PROCESS_ID = "ODIN_JAX_PROCESS_ID"
ENV_TIMEOUT = "ODIN_JAX_INIT_TIMEOUT"
_EXPLICIT = (ENV_COORDINATOR, ENV_NUM_PROCESSES, ENV_PROCESS_ID)
# What JAX's own SLURM detection reads (jax._src.clusters.slurm_cluster).
_SLURM_STEP_VARS = ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS",
                    "SLURM_PROCID", "SLURM_LOCALID")
_TRUE, _FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")


class DistributedConfigError(ValueError):
  """The multi-process settings in the environment contradict each other."""


@dataclasses.dataclass(frozen=True)
class Distributed:
  """How to call jax.distributed.initialize (None fields: JAX detects them).

  source: 'env' (ODIN_JAX_*), 'slurm', 'tpu' or 'auto' (ODIN_JAX_DISTRIBUTED=1).
  """
  source: str
  coordinator_address: str | None = None
  num_processes: int | None = None
  process_id: int | None = None
  initialization_timeout: int = 300

  def kwargs(self) -> dict:
    return {"coordinator_address": self.coordinator_address,
            "num_processes": self.num_processes,
            "process_id": self.process_id,
            "initialization_timeout": self.initialization_timeout}


def _int(environ: Mapping[str, str], name: str) -> int:
  value = environ[name].strip()
  try:
    return int(value)
  except ValueError:
    raise DistributedConfigError(
        f"{name}={value!r} is not an integer.") from None


def _check_rank(process_id: int, num_processes: int, id_name: str,
                count_name: str) -> None:
  if num_processes < 1:
    raise DistributedConfigError(f"{count_name}={num_processes} must be >= 1.")
  if not 0 <= process_id < num_processes:
    raise DistributedConfigError(
        f"{id_name}={process_id} must be in [0, {count_name}={num_processes}"
        "): process ids are 0, 1, ..., N-1, one per process.")


def _explicit(environ: Mapping[str, str], timeout: int) -> Distributed | None:
  given = [n for n in _EXPLICIT if environ.get(n, "").strip()]
  if not given:
    return None
  missing = [n for n in _EXPLICIT if n not in given]
  if missing:
    raise DistributedConfigError(
        f"{', '.join(given)} set but {', '.join(missing)} not: set all of "
        f"{', '.join(_EXPLICIT)} on every process (the same coordinator and "
        "count everywhere, a different id on each), or none of them.")
  address = environ[ENV_COORDINATOR].strip()
  if not re.fullmatch(r"\S+:\d{1,5}", address):
    raise DistributedConfigError(
        f"{ENV_COORDINATOR}={address!r} must be host:port of process 0, "
        "e.g. 10.0.0.2:8476 (any free port there).")
  n, i = _int(environ, ENV_NUM_PROCESSES), _int(environ, ENV_PROCESS_ID)
  _check_rank(i, n, ENV_PROCESS_ID, ENV_NUM_PROCESSES)
  if n == 1:
    return None
  return Distributed("env", address, n, i, timeout)


def _slurm(environ: Mapping[str, str], timeout: int) -> Distributed | None:
  if "SLURM_NTASKS" not in environ or _int(environ, "SLURM_NTASKS") <= 1:
    return None
  n = _int(environ, "SLURM_NTASKS")
  missing = [v for v in _SLURM_STEP_VARS if v not in environ]
  if missing:
    # The batch script itself (not an srun task) sees SLURM_NTASKS too.
    logging.warning(
        "SLURM_NTASKS=%d but %s unset: this process was not started by srun, "
        "so it runs alone. Launch one process per task with srun (see "
        "launch/slurm.sbatch) to train on the whole allocation.", n,
        ", ".join(missing))
    return None
  _check_rank(_int(environ, "SLURM_PROCID"), n, "SLURM_PROCID", "SLURM_NTASKS")
  # Coordinator, id and local device come from JAX's own SLURM detection.
  return Distributed("slurm", initialization_timeout=timeout)


def _on_cloud_tpu_vm() -> bool:
  """True on a Cloud TPU VM (JAX checks for TPU chips and libtpu at import).

  JAX exposes no public flag for this; if its private one moves, TPU pods
  still run (libtpu connects the hosts) but need ODIN_JAX_DISTRIBUTED=1 for
  the coordination service that multi-host checkpoints and preemption use.
  """
  try:
    from jax._src import cloud_tpu_init  # pylint: disable=g-import-not-at-top
  except ImportError:
    return False
  return bool(getattr(cloud_tpu_init, "running_in_cloud_tpu_vm", False))


def detect_distributed(environ: Mapping[str, str] | None = None,
                       on_tpu_vm: bool | None = None) -> Distributed | None:
  """The multi-process settings of this environment, or None (one process).

  Args:
    environ: the environment variables (default os.environ).
    on_tpu_vm: whether this is a Cloud TPU VM (default: ask JAX).
  Raises:
    DistributedConfigError: contradictory or malformed settings, e.g. a
      coordinator without a process id, or an id outside [0, N).
  """
  environ = os.environ if environ is None else environ
  switch = environ.get(ENV_SWITCH, "").strip().lower()
  if switch and switch not in _TRUE + _FALSE:
    raise DistributedConfigError(
        f"{ENV_SWITCH}={environ[ENV_SWITCH]!r}: use 1 (initialise, JAX "
        "detects the cluster) or 0 (never initialise).")
  if switch in _FALSE:
    return None
  timeout = _int(environ, ENV_TIMEOUT) if environ.get(ENV_TIMEOUT) else 300
  found = _explicit(environ, timeout) or _slurm(environ, timeout)
  if found is not None:
    return found
  if on_tpu_vm is None:
    on_tpu_vm = _on_cloud_tpu_vm()
  if on_tpu_vm:
    return Distributed("tpu", initialization_timeout=timeout)
  if switch in _TRUE:
    return Distributed("auto", initialization_timeout=timeout)
  return None


def initialize_distributed(environ: Mapping[str, str] | None = None) -> bool:
  """Joins the JAX distributed runtime if `detect_distributed` says so.

  Must run before any JAX call that touches a device. Returns True if this
  process is (now) part of a multi-process run. Idempotent.
  """
  if jax.distributed.is_initialized():
    return True
  settings = detect_distributed(environ)
  if settings is None:
    return False
  where = (f"coordinator {settings.coordinator_address}, process "
           f"{settings.process_id} of {settings.num_processes}"
           if settings.source == "env" else "settings detected by JAX")
  logging.info("Joining the JAX distributed runtime (%s; %s).",
               settings.source, where)
  jax.distributed.initialize(**settings.kwargs())
  if settings.num_processes is not None and \
      jax.process_count() != settings.num_processes:
    raise DistributedConfigError(
        f"Expected {settings.num_processes} processes, JAX reports "
        f"{jax.process_count()}.")
  return True


def describe_processes() -> dict:
  """Logs and returns this process's place in the run (touches devices).

  Raises DistributedConfigError if processes have different numbers of
  devices: every host feeds batch_size / process_count examples, which only
  fills the mesh evenly when each host holds the same share of it.
  """
  per_process = collections.Counter(d.process_index for d in jax.devices())
  local = jax.local_devices()
  info = {"process_index": jax.process_index(),
          "process_count": jax.process_count(),
          "local_devices": len(local), "global_devices": jax.device_count(),
          "platform": local[0].platform, "host": socket.gethostname()}
  logging.info(
      "Process %d of %d on %s: %d local %s devices %s, %d global devices.",
      info["process_index"], info["process_count"], info["host"],
      info["local_devices"], info["platform"], [d.id for d in local],
      info["global_devices"])
  if len(set(per_process.values())) > 1:
    raise DistributedConfigError(
        "Processes hold different numbers of devices "
        f"({dict(sorted(per_process.items()))} by process index): give every "
        "process the same number (e.g. one process per GPU, or one per "
        "node with all its GPUs).")
  if info["process_count"] > 1 and not jax.distributed.is_initialized():
    logging.warning(
        "%d processes but the JAX distributed runtime is not initialised: "
        "multi-host checkpoints and preemption handling need it; set %s=1.",
        info["process_count"], ENV_SWITCH)
  return info


def setup(cache_dir: str | None = None, distributed: bool = True) -> None:
  """Prepares this process: distributed runtime, TF, logs, compile cache.

  Args:
    cache_dir: persistent XLA cache (default $ODIN_JAX_XLA_CACHE or
      ~/.cache/odin_jax/xla).
    distributed: join a multi-process run when the environment describes one
      (train); single-host tools (export) may pass False.

  TensorFlow only feeds data; letting it see a GPU makes it grab memory
  that JAX needs. The persistent compilation cache makes a restarted run
  (resume after preemption) skip its multi-second compile.
  """
  multi_process = distributed and initialize_distributed()  # before devices
  from odin_jax.data import pipeline
  pipeline.hide_accelerators_from_tf()
  _quiet_library_logs()
  if distributed:
    describe_processes()
  if multi_process:
    failure.watch_peers()   # another process's failure ends this one too
  if multi_process and jax.default_backend() == "cpu":
    # On CPU the cache key includes each process's own topology and only
    # process 0 writes entries, so process 0 loads a program from the cache
    # while the others compile it for minutes; XLA:CPU's gloo collectives
    # then fail, as they give a peer 30 s to reach the first collective on a
    # device group. Compiling everywhere keeps the processes in step.
    logging.info("Persistent compilation cache off: several CPU processes.")
    return
  cache_dir = cache_dir or os.environ.get("ODIN_JAX_XLA_CACHE") or \
      os.path.join(os.path.expanduser("~"), ".cache", "odin_jax", "xla")
  jax.config.update("jax_compilation_cache_dir", cache_dir)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)


class _DropLibraryInfo(pylogging.Filter):
  """Orbax logs every file rename at INFO; keep its warnings only."""

  def filter(self, record: pylogging.LogRecord) -> bool:
    return record.levelno >= pylogging.WARNING or "orbax" not in record.pathname


def _quiet_library_logs() -> None:
  handler = logging.get_absl_handler()
  if not any(isinstance(f, _DropLibraryInfo) for f in handler.filters):
    handler.addFilter(_DropLibraryInfo())
