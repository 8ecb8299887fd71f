"""The device mesh and how the state and the batch are laid out on it.

One mesh axis, 'data'. The batch is split over it; parameters, optimizer
state and EMA weights are replicated (FSDP-style sharding is a later option).
The same code runs on 1 CPU, N simulated CPU devices, a GPU or a TPU pod:
only the number of devices in the mesh changes.
"""

from __future__ import annotations

from typing import Sequence

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

DATA = "data"


def make_mesh(devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A 1-D mesh over `devices` (default: all devices of all hosts).

  Axis types are Auto: the step is written on global arrays and XLA's
  partitioner chooses the collectives (the Explicit default of
  jax.make_mesh would demand out_sharding annotations on contractions).
  """
  devices = list(devices) if devices is not None else jax.devices()
  return jax.make_mesh((len(devices),), (DATA,), axis_types=(AxisType.Auto,),
                       devices=devices)


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_sharded(mesh: Mesh) -> NamedSharding:
  """Leading (batch) axis split over 'data', the rest replicated."""
  return NamedSharding(mesh, P(DATA))


def check_batch_size(global_batch: int, mesh: Mesh) -> None:
  """Raises a clear error unless the batch splits evenly over devices."""
  n = mesh.devices.size
  if global_batch % n or global_batch % jax.process_count():
    raise ValueError(
        f"config.batch_size={global_batch} must be divisible by the number of "
        f"devices ({n}) and of processes ({jax.process_count()}).")


def to_global(mesh: Mesh, local_batch: dict[str, np.ndarray]) -> dict:
  """Host-local numpy batch -> global jax.Arrays sharded over 'data'.

  Each process passes its own slice ([B / num_processes, ...]); with one
  process this is simply the whole batch.
  """
  sharding = batch_sharded(mesh)
  return {k: jax.make_array_from_process_local_data(sharding, v)
          for k, v in local_batch.items()}
