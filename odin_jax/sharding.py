"""The device mesh and how the state and the batch are laid out on it.

One mesh axis, 'data'. The batch is split over it. Parameters, optimizer
state and EMA weights are replicated by default; with `sharding.fsdp` they
are split over the same axis too (FSDP / ZeRO-3 style, `state_shardings`):
each device stores 1/N of every large array, and XLA all-gathers a weight
where the step uses it and reduces its gradient back to shards. The same code runs
on 1 CPU, N simulated CPU devices, a GPU or a TPU pod: only the number of
devices in the mesh changes.
"""

from __future__ import annotations

from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

DATA = "data"


def num_slices(devices: Sequence[jax.Device]) -> int:
  """How many TPU slices `devices` come from (1 off TPU: no slice_index)."""
  return len({getattr(d, "slice_index", 0) for d in devices})


def make_mesh(devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A 1-D mesh over `devices` (default: all devices of all hosts).

  Axis types are Auto: the step is written on global arrays and XLA's
  partitioner chooses the collectives (the Explicit default of
  jax.make_mesh would demand out_sharding annotations on contractions).
  Devices from several TPU slices (a multi-slice job) are ordered slice by
  slice (mesh_utils.create_hybrid_device_mesh): 'data' runs over the chips
  of one slice (ICI) first and across slices (DCN) last, so a contiguous
  block of the batch stays within one slice and only the reductions that
  must cross slices use the slower data-centre network.
  """
  devices = list(devices) if devices is not None else jax.devices()
  slices = num_slices(devices)
  if slices > 1:
    if len(devices) % slices:
      raise ValueError(f"{len(devices)} devices do not split evenly into "
                       f"{slices} slices.")
    grid = mesh_utils.create_hybrid_device_mesh(
        (len(devices) // slices,), (slices,), devices=devices)
    return Mesh(grid, (DATA,), axis_types=(AxisType.Auto,))
  return jax.make_mesh((len(devices),), (DATA,), axis_types=(AxisType.Auto,),
                       devices=devices)


def strided_split(x: jax.Array, parts: int) -> jax.Array:
  """[B, ...] -> [parts, B / parts, ...]; part t holds rows t, t + parts, ...

  With the batch sharded in contiguous blocks over 'data' and B / parts a
  multiple of the devices, every part is spread evenly over all devices, so
  looping over the parts (micro-batches, k-means chunks) needs no
  communication.
  """
  x = x.reshape(x.shape[0] // parts, parts, *x.shape[1:])
  return jnp.swapaxes(x, 0, 1)


def strided_merge(x: jax.Array) -> jax.Array:
  """The inverse of `strided_split`: [parts, B / parts, ...] -> [B, ...]."""
  return jnp.swapaxes(x, 0, 1).reshape(-1, *x.shape[2:])


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


def fsdp_spec(shape: Sequence[int], num_devices: int,
              min_size: int = 2**16) -> P:
  """How FSDP lays out one array of `shape` over `num_devices` on 'data'.

  The largest dimension that divides evenly by `num_devices` is split
  (the last of equal ones: the output channels of an HWIO kernel). Arrays
  with fewer than `min_size` elements, scalars and arrays with no divisible
  dimension stay replicated: BatchNorm vectors, biases, the step and the
  rng cost next to nothing, and gathering them would cost a collective each.
  E.g. with 4 devices: [3, 3, 256, 512] -> P(None, None, None, 'data'),
  [2048] -> P() (small), [7, 7, 3, 66] -> P() (small).
  """
  size = int(np.prod(shape)) if len(shape) else 1
  if num_devices <= 1 or size < min_size:
    return P()
  candidates = [(d, i) for i, d in enumerate(shape) if d % num_devices == 0]
  if not candidates:
    return P()
  _, axis = max(candidates)
  return P(*[DATA if i == axis else None for i in range(len(shape))])


def fsdp_shardings(mesh: Mesh, tree: Any, min_size: int = 2**16) -> Any:
  """A pytree of NamedShardings, `fsdp_spec` for each leaf of `tree`.

  `tree` holds arrays or jax.ShapeDtypeStructs (e.g. from jax.eval_shape).
  """
  n = mesh.devices.size
  return jax.tree.map(
      lambda x: NamedSharding(mesh, fsdp_spec(x.shape, n, min_size)), tree)


def state_shardings(config, mesh: Mesh, abstract_state: Any) -> Any:
  """The sharding of every leaf of the train state.

  Replicated unless `config.sharding.fsdp`; then every large array of the
  state is split (`fsdp_spec`): online θ, target ξ, Odin's τ and the
  optimizer's momentum, which is where the memory of a ResNet-200 x2 (250M
  parameters) goes: 3-4 float32 copies, 3-4 GB on every device when
  replicated. BatchNorm statistics, the step and the rng are small and stay
  replicated.
  The train step is jitted with these as in/out shardings, so an updated
  state keeps its layout, and checkpoints restore straight into it.
  """
  s = config.get("sharding")
  if s is None or not s.fsdp:
    return jax.tree.map(lambda _: replicated(mesh), abstract_state)
  return fsdp_shardings(mesh, abstract_state, s.fsdp_min_size)
