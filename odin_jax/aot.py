r"""Compile the real train step for a TPU slice on a CPU host; no TPU needed.

  python -m odin_jax.aot --config=configs/detcon_b.py:imagenet --topology=v4-64
  python -m odin_jax.aot --config=configs/odin.py:imagenet --topology=v5e-256 \
      --num_slices=2 --config.model.dtype=bfloat16 --out=/tmp/aot.json

libtpu (the `tpu` and `test` extras) describes a slice's chips without the
hardware (jax.experimental.topologies); a mesh over those devices lets
`jax.jit(...).lower(abstract state, abstract batch).compile()` run the TPU
compiler here. The step is `step.build`'s, the one train.py runs, on
abstract state (jax.eval_shape) and an abstract batch with the pipeline's
shapes and dtypes (ShapeDtypeStructs carrying their shardings), so nothing
is allocated.

It prints one table per chip: chips and per-chip batch, HBM (arguments,
outputs, temporaries, peak) against the chip's capacity, FLOPs per chip and
per image, bytes per collective kind (hlo_stats.py), the largest values by
HLO op, and the compile time; --out writes it as JSON. When the step does
not fit it exits non-zero with one message naming the chip, the shortfall
and the config fields that would help.

Slice names are those Cloud TPU uses: v4-N and v5p-N count TensorCores
(N/2 chips; each chip is one megacore device), v5e-N (= v5litepod-N) and
v6e-N count chips.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import re
import sys
import time

from absl import app
from absl import flags
import jax
from jax.experimental import topologies
from ml_collections import config_flags
import numpy as np

from odin_jax import config_check, hlo_stats, methods, sharding, step
from odin_jax.data import pipeline, sources

GiB = 2**30


@dataclasses.dataclass(frozen=True)
class Family:
  """One TPU generation."""
  name: str                 # 'v4' in the slice 'v4-64' and in libtpu's
                            # topology 'v4:2x4x4'
  megacore: bool            # two TensorCores per chip act as one device
  hbm_gib: float            # HBM per chip
  dims: int                 # 3-D torus (v4, v5p) or 2-D (v5e, v6e)
  max_chips: int            # largest power-of-two slice


FAMILIES = {f.name: f for f in (
    Family("v4", True, 32, 3, 2048),
    Family("v5p", True, 95, 3, 4096),
    Family("v5e", False, 16, 2, 256),
    Family("v6e", False, 32, 2, 256),
)}
ALIASES = {"v5litepod": "v5e"}
MIN_CHIPS = 4   # libtpu's default host is 2x2 chips: smaller slices fail


class DoesNotFitError(RuntimeError):
  """The step needs more HBM per chip than the slice has."""


class NoLibtpuError(RuntimeError):
  """libtpu is missing or could not describe the slice."""


def torus_shape(chips: int, dims: int) -> tuple[int, ...]:
  """Chips -> the slice's chip grid, as Cloud TPU lays slices out.

  From 2x2 (2x2x1) the smallest side doubles, the later one on a tie:
  4 -> 2x2x1, 8 -> 2x2x2, 16 -> 2x2x4, 32 -> 2x4x4, 64 -> 4x4x4 (v4-128);
  4 -> 2x2, 8 -> 2x4, 16 -> 4x4, ..., 256 -> 16x16 (v5e-256).
  """
  shape = [2, 2] + [1] * (dims - 2)
  while shape[0] * shape[1] * (shape[2] if dims == 3 else 1) < chips:
    smallest = min(shape)
    i = max(j for j, s in enumerate(shape) if s == smallest)
    shape[i] *= 2
  return tuple(shape)


def known_slices() -> list[str]:
  """Every slice name `parse_slice` accepts, e.g. 'v4-8', 'v5e-256'."""
  names = []
  for f in FAMILIES.values():
    chips = MIN_CHIPS
    while chips <= f.max_chips:
      names.append(f"{f.name}-{chips * (2 if f.megacore else 1)}")
      chips *= 2
  return names


def parse_slice(name: str) -> tuple[Family, int, str]:
  """'v4-64' -> (v4, 32 chips, 'v4:2x4x4'); ValueError lists known names."""
  prefix, _, count = name.strip().lower().partition("-")
  family = FAMILIES.get(ALIASES.get(prefix, prefix))
  known = known_slices()
  canonical = f"{family.name}-{count}" if family else name
  if family is None or not count.isdigit() or canonical not in known:
    raise ValueError(f"--topology={name!r} is not a slice this tool knows. "
                     f"Known: {', '.join(known)} (v5litepod-N = v5e-N).")
  chips = int(count) // (2 if family.megacore else 1)
  grid = "x".join(map(str, torus_shape(chips, family.dims)))
  return family, chips, f"{family.name}:{grid}"


def slice_devices(name: str, num_slices: int = 1):
  """(family, the devices of `num_slices` slices of `name`) from libtpu."""
  # Only libtpu's compiler is used, never a chip, so other processes may
  # load it at the same time (a training job on this TPU VM, a second
  # compile): skip its one-process-per-host lock file.
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  family, _, topology = parse_slice(name)
  kwargs = {"chip_config_name": "megacore"} if family.megacore else {}
  try:
    desc = topologies.get_topology_desc(
        platform="tpu", topology_name=topology, num_slices=num_slices,
        **kwargs)
  except Exception as e:  # pylint: disable=broad-except
    hint = ("" if importlib.util.find_spec("libtpu") else
            " libtpu is not installed: pip install -e '.[tpu]' (jax[tpu] "
            "at the installed jax version).")
    raise NoLibtpuError(f"libtpu could not describe {name} ({topology}): "
                       f"{e}{hint}") from e
  return family, list(desc.devices)


def abstract_batch(config, mesh) -> dict:
  """The train step's batch as ShapeDtypeStructs sharded over 'data'.

  Shapes and dtypes come from the input pipeline itself: it is traced
  (never run) on a one-example in-memory source of the config's image size,
  so the batch keeps up with the pipeline's contract.
  """
  size = int(config.image_size)
  hierarchy = None
  if config.masks.method == "hierarchy":
    leaves = int(config.masks.hier_max_leaves)
    hierarchy = np.zeros((1, leaves, leaves), np.float32)
  # One shard of one example serves either dataset.host_split.
  source = sources.ArraySource(np.zeros((1, size, size, 3), np.uint8),
                               np.zeros((1, size, size), np.int32), hierarchy,
                               shard_sizes=(1,))
  spec = pipeline.make_train_dataset(
      config, source, global_batch_size=config.batch_size, process_index=0,
      process_count=1).element_spec
  batch_sharding = sharding.batch_sharded(mesh)
  keys = methods.get(config).batch_keys()
  return {k: jax.ShapeDtypeStruct(tuple(v.shape), v.dtype.as_numpy_dtype,
                                  sharding=batch_sharding)
          for k, v in spec.items() if k in keys}


def compile_step(config, devices):
  """Compiles `step.build(config, mesh).train_step` for `devices`.

  Returns (compiled, mesh, seconds to lower and compile).
  """
  config_check.validate(config)
  mesh = sharding.make_mesh(devices)
  sharding.check_batch_size(config.batch_size, mesh)
  # The schedules' lengths change values, never shapes: any size will do.
  built = step.build(config, mesh, num_examples=config.batch_size)
  state = jax.tree.map(
      lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
      built.abstract_state, built.state_sharding)
  start = time.perf_counter()
  compiled = built.train_step.lower(state, abstract_batch(config, mesh)
                                    ).compile()
  return compiled, mesh, time.perf_counter() - start


def _flops(compiled) -> float:
  """XLA's FLOPs of one run of the per-chip program.

  (XLA's TPU cost model also gives 'optimal_seconds', which has come back
  negative (issue 17): no time estimate is reported.)
  """
  costs = compiled.cost_analysis()
  if isinstance(costs, (list, tuple)):   # older jax: one dict per program
    costs = costs[0] if costs else {}
  return float((costs or {}).get("flops", 0.0))


def analyse(compiled, config, family: Family, slice_name: str,
            num_slices: int, chips: int, seconds: float) -> dict:
  """The report of one compiled step (all sizes per chip, in bytes).

  peak = arguments + outputs + temporaries - aliased: the arguments (state
  and this chip's batch) are live on entry, XLA's temporaries are one block
  live during the step, and outputs need new memory except those written
  into donated argument buffers (the new state reuses the old state's:
  `alias`), so this is the most HBM the step holds at once.
  """
  m = compiled.memory_analysis()
  args, outs = int(m.argument_size_in_bytes), int(m.output_size_in_bytes)
  temps, alias = int(m.temp_size_in_bytes), int(m.alias_size_in_bytes)
  flops = _flops(compiled)
  text = compiled.as_text()
  return {
      "slice": slice_name, "num_slices": num_slices, "chip": family.name,
      "chips": chips, "global_batch": int(config.batch_size),
      "batch_per_chip": int(config.batch_size) // chips,
      "method": config.method, "dtype": config.model.dtype,
      "remat": config.model.get("remat", "none"),
      "fsdp": bool(config.sharding.fsdp),
      "grad_accum_steps": int(config.grad_accum_steps),
      "hbm_capacity_bytes": int(family.hbm_gib * GiB),
      "arguments_bytes": args, "outputs_bytes": outs,
      "temporaries_bytes": temps, "aliased_bytes": alias,
      "code_bytes": int(m.generated_code_size_in_bytes),
      "peak_bytes": args + outs + temps - alias,
      "flops_per_chip": flops,
      "flops_per_image": flops * chips / max(int(config.batch_size), 1),
      "collective_bytes": hlo_stats.collective_bytes(text),
      "largest_values": hlo_stats.largest_values(text, 5),
      "compile_seconds": round(seconds, 1)}


def _gib(n: float) -> str:
  return f"{n / GiB:8.2f} GiB"


def format_table(r: dict) -> str:
  """The report as the table the command prints."""
  slices = f" x {r['num_slices']} slices" if r["num_slices"] > 1 else ""
  lines = [
      f"{r['slice']}{slices}: {r['chips']} {r['chip']} chips, global batch "
      f"{r['global_batch']} ({r['batch_per_chip']} per chip)",
      "HBM per chip",
      f"  arguments     {_gib(r['arguments_bytes'])}",
      f"  outputs       {_gib(r['outputs_bytes'])}"
      f"  ({_gib(r['aliased_bytes']).strip()} in donated buffers)",
      f"  temporaries   {_gib(r['temporaries_bytes'])}",
      f"  peak          {_gib(r['peak_bytes'])}  of "
      f"{_gib(r['hbm_capacity_bytes']).strip()}"
      f" ({100 * r['peak_bytes'] / r['hbm_capacity_bytes']:.1f}%)",
      f"FLOPs per chip per step  {r['flops_per_chip']:.4g}",
      f"FLOPs per image          {r['flops_per_image']:.4g}",
      "Collectives per chip per step"]
  lines += [f"  {kind:19s} {n / 2**20:10.1f} MiB"
            for kind, n in r["collective_bytes"].items()]
  lines.append("Largest values (HLO op, per chip)")
  lines += [f"  {v['bytes'] / 2**20:9.1f} MiB  {v['opcode']:14s} "
            f"{v['shape'][:40]:40s} {v['op_name'][-60:]}"
            for v in r["largest_values"]]
  lines.append(f"Compile time  {r['compile_seconds']:.1f} s")
  return "\n".join(lines)


def _options(config, batch_per_chip: int) -> list[str]:
  """What would shrink the step, each with its config field."""
  options = []
  if config.model.dtype != "bfloat16":
    options.append("model.dtype=bfloat16 (activations in half the bytes)")
  if config.model.get("remat", "none") == "none":
    options.append("model.remat=blocks or stages (recompute activations in "
                   "the backward pass)")
  if not config.sharding.fsdp:
    options.append("sharding.fsdp=True (split θ, ξ and optimizer state over "
                   "the chips)")
  options.append(
      f"a smaller per-chip batch: batch_size={config.batch_size} is "
      f"{batch_per_chip} per chip; lower it or use a larger slice")
  options.append(f"grad_accum_steps={2 * int(config.grad_accum_steps)} "
                 "(micro-batches: the same batch in less memory)")
  return options


def _not_fit(config, slice_name: str, family: Family, batch_per_chip: int,
             need_gib: float | None, capacity_gib: float, what: str = "",
             detail: str = "") -> DoesNotFitError:
  """The one message: chip, need, capacity, shortfall and the options."""
  need = ("more HBM per chip than it has" if need_gib is None else
          f"{need_gib:.2f} GiB of HBM per chip{what}, the chip has "
          f"{capacity_gib:.2f} GiB, short by {need_gib - capacity_gib:.2f} GiB")
  return DoesNotFitError(
      f"The train step does not fit a {family.name} chip of {slice_name}: "
      f"it needs {need}.{detail} Options (--config.FIELD=VALUE): "
      + "; ".join(_options(config, batch_per_chip)) + ".")


def check_fits(r: dict, config, family: Family) -> None:
  """Raises DoesNotFitError when the report's peak exceeds the chip's HBM."""
  short = r["peak_bytes"] - r["hbm_capacity_bytes"]
  if short > 0:
    raise _not_fit(config, r["slice"], family, r["batch_per_chip"],
                   r["peak_bytes"] / GiB, r["hbm_capacity_bytes"] / GiB)


# XLA:TPU refuses to compile a program that cannot fit, e.g. "Ran out of
# memory on HBM, the total memory required for HLO temporaries (96.91G)
# exceeds available HBM (15.75G)", or "Used 20.1G of 15.75G hbm. Exceeded
# hbm capacity by 4.4G." (sizes in units of 1024).
_UNITS = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}
_XLA_OOM = (
    re.compile(r"required for (?P<what>[\w ]+?) \((?P<need>[\d.]+)(?P<nu>[KMGT]?)"
               r"\) exceeds available HBM \((?P<have>[\d.]+)(?P<hu>[KMGT]?)\)"),
    re.compile(r"Used (?P<need>[\d.]+)(?P<nu>[KMGT]?) of (?P<have>[\d.]+)"
               r"(?P<hu>[KMGT]?) hbm"))


def from_compile_error(error: Exception, config, slice_name: str,
                       family: Family, batch_per_chip: int
                       ) -> DoesNotFitError | None:
  """The DoesNotFitError for XLA's out-of-memory refusal (None for other
  errors): its sizes, the shortfall and the options."""
  text = str(error)
  if "RESOURCE_EXHAUSTED" not in text:
    return None
  for pattern in _XLA_OOM:
    m = pattern.search(text)
    if m:
      need = float(m["need"]) * _UNITS[m["nu"]] / GiB
      have = float(m["have"]) * _UNITS[m["hu"]] / GiB
      what = m.groupdict().get("what")
      return _not_fit(config, slice_name, family, batch_per_chip, need, have,
                      f" for {what}" if what else "")
  first = text.strip().splitlines()[0][:300]
  return _not_fit(config, slice_name, family, batch_per_chip, None,
                  family.hbm_gib, detail=f" (XLA: {first})")


def run(config, slice_name: str, num_slices: int = 1, out: str = "") -> dict:
  """Compiles config's step for the slice, prints the table, writes `out`
  (JSON) and raises DoesNotFitError when the step does not fit (the JSON
  then holds the slice, 'fits': false and the message)."""
  family, devices = slice_devices(slice_name, num_slices)
  chips = len(devices)
  report = {"slice": slice_name, "num_slices": num_slices,
            "chip": family.name, "chips": chips,
            "global_batch": int(config.batch_size),
            "batch_per_chip": int(config.batch_size) // chips}
  try:
    try:
      compiled, _, seconds = compile_step(config, devices)
    except Exception as e:  # pylint: disable=broad-except
      oom = from_compile_error(e, config, slice_name, family,
                               report["batch_per_chip"])
      if oom is None:
        raise
      raise oom from None
    report = analyse(compiled, config, family, slice_name, num_slices,
                     chips, seconds)
    print(format_table(report), flush=True)
    check_fits(report, config, family)
    report["fits"] = True
  except DoesNotFitError as e:
    report.update(fits=False, error=str(e))
    raise
  finally:
    if out:
      os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
      with open(out, "w", encoding="utf-8") as f:
        json.dump(report, f, indent=1)
  return report


_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "configs/<method>.py[:preset]", lock_config=True)
_TOPOLOGY = flags.DEFINE_string(
    "topology", None, "TPU slice, e.g. v4-64, v5e-256, v5p-128, v6e-64.")
_NUM_SLICES = flags.DEFINE_integer(
    "num_slices", 1, "Slices of a multi-slice job ('data' spans DCN).")
_OUT = flags.DEFINE_string("out", "", "Write the table as JSON here.")


def main(argv):
  del argv
  try:
    run(_CONFIG.value, _TOPOLOGY.value, _NUM_SLICES.value, _OUT.value)
  except (DoesNotFitError, NoLibtpuError, ValueError) as e:
    print(f"error: {e}", file=sys.stderr, flush=True)
    sys.exit(1)


if __name__ == "__main__":
  # The compile needs libtpu's descriptions only: run nothing on a TPU.
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  flags.mark_flags_as_required(["config", "topology"])
  app.run(main)
