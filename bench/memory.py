"""Per-device memory of the train step with remat and FSDP, as ratios.

Two tables, for model.remat in {none, blocks, stages} x sharding.fsdp in
{off, on}, ratios against the first row of the same run:

1. Exact accounting, no compilation (cheap for ResNet-200 x2):
   state  bytes of the train state (θ, ξ, [τ,] LARS momentum, BatchNorm
          statistics) that one device holds: replicated, or its FSDP shards;
   acts   activations the online network saves for its backward pass, for
          one view of this device's batch (what remat trades for compute;
          the step runs the online network on two views).
2. XLA's accounting of the compiled step (--compile, the default; never
   run): `compiled.memory_analysis()` of one device's program
   args   the donated state and this device's slice of the batch,
   temp   XLA's scratch: activations, gradients, gathered weights,
   peak   args + temp + outputs not aliased to the donated arguments,
   and the collectives (all-gather / reduce-scatter / all-reduce) in it.

  python bench/memory.py                              # ResNet-18 x0.5, 96 px
  python bench/memory.py --depth=50 --width=1 --image_size=224 --batch=128
  python bench/memory.py --depth=200 --width=2 --image_size=224 \
      --batch=2048 --devices=64 --compile=0          # exact table only

On CPU, --devices simulates that many devices (XLA_FLAGS) so FSDP has
something to split over. XLA:CPU's scheduler does not turn remat into lower
temp memory (even a plain jax.checkpoint MLP gets no saving there), so on
CPU read remat's effect from 'acts', and measure 'temp' on GPU/TPU.
"""
import argparse
import contextlib
import io
import os
import re
import sys


def parse_args():
  p = argparse.ArgumentParser()
  p.add_argument("--method", default="detcon_b",
                 help="configs/<method>.py (detcon_b, byol, odin, ...)")
  p.add_argument("--depth", type=int, default=18)
  p.add_argument("--width", type=float, default=0.5)
  p.add_argument("--image_size", type=int, default=96)
  p.add_argument("--batch", type=int, default=32, help="global batch")
  p.add_argument("--dtype", default="float32")
  p.add_argument("--devices", type=int, default=4,
                 help="simulated CPU devices (ignored on GPU/TPU)")
  p.add_argument("--fsdp_min_size", type=int, default=2**16)
  p.add_argument("--remat", default="none,blocks,stages")
  p.add_argument("--compile", type=int, default=1,
                 help="1: also compile each step for XLA's accounting")
  return p.parse_args()


ARGS = parse_args() if __name__ == "__main__" else None
if ARGS is not None and "xla_force_host_platform_device_count" not in \
    os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_"
                             f"host_platform_device_count={ARGS.devices}")

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import importlib  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.ad_checkpoint import print_saved_residuals  # noqa: E402

from odin_jax.data.synthetic import synthetic_batch  # noqa: E402
from odin_jax import sharding, step  # noqa: E402
from odin_jax.models import network  # noqa: E402

MB = 2**20
COLLECTIVES = ("all-gather", "reduce-scatter", "all-reduce")
# One line of print_saved_residuals: 'f32[8,40,40,16] output of cos from ..'
_RESIDUAL = re.compile(r"^([a-z]+)(\d*)(?:_\w+)?\[([\d,]*)\] (.*)$")


def saved_residuals(f, *args) -> list[tuple[tuple[int, ...], int, str]]:
  """(shape, bytes per element, where from) of each residual f's VJP saves.

  JAX's public API only prints them (jax.ad_checkpoint.print_saved_residuals,
  one 'dtype[shape] source' line each, traced, not run): the lines are read
  back here.
  """
  text = io.StringIO()
  with contextlib.redirect_stdout(text):
    print_saved_residuals(f, *args)
  out = []
  for line in text.getvalue().splitlines():
    m = _RESIDUAL.match(line)
    if not m:
      raise ValueError(f"unexpected print_saved_residuals line: {line!r}")
    kind, bits, dims, why = m.groups()
    if kind == "bool":
      itemsize = 1
    elif bits:
      itemsize = max(1, int(bits) // 8)
    else:
      raise ValueError(f"unknown residual dtype in {line!r}")
    shape = tuple(int(d) for d in dims.split(",") if d)
    out.append((shape, itemsize, why))
  return out


def bench_config(args, remat: str, fsdp: bool):
  """The method's demo config at the benchmark's size, remat and FSDP."""
  c = importlib.import_module(f"configs.{args.method}").get_config("demo")
  c.model.depth, c.model.width = args.depth, args.width
  c.image_size, c.batch_size = args.image_size, args.batch
  c.model.dtype = args.dtype
  if args.depth >= 50:   # the papers' heads
    c.model.projector_hidden, c.model.projector_dim = 4096, 256
    if c.model.predictor_hidden:
      c.model.predictor_hidden = 4096
  c.model.remat = remat
  c.sharding.fsdp = fsdp
  c.sharding.fsdp_min_size = args.fsdp_min_size
  return c


def _setup(c):
  """The run's own set-up (step.build; 100 steps an epoch) on all devices."""
  mesh = sharding.make_mesh()
  return step.build(c, mesh, num_examples=100 * c.batch_size), mesh


def state_bytes(c) -> tuple[int, int]:
  """(bytes of the state on one device, number of parameters)."""
  built, _ = _setup(c)
  abstract, shardings = built.abstract_state, built.state_sharding
  total = 0
  for x, s in zip(jax.tree.leaves(abstract), jax.tree.leaves(shardings)):
    shard = s.shard_shape(x.shape)
    total += int(np.prod(shard)) * x.dtype.itemsize
  return total, sum(x.size for x in jax.tree.leaves(abstract.params))


def activation_bytes(c) -> int:
  """Bytes the online network saves for backward: one view, one device."""
  built, mesh = _setup(c)
  model, abstract = built.model, built.abstract_state
  b = max(1, c.batch_size // mesh.devices.size)
  s, (h, w) = c.image_size, network.feature_grid(c)
  images = jax.ShapeDtypeStruct((b, s, s, 3), jnp.float32)
  cells = jnp.zeros((b, h, w), jnp.int32)
  ids = jnp.zeros((b, c.num_masks), jnp.int32)

  def loss(params, batch_stats, images):
    out, _ = model.apply({"params": params, "batch_stats": batch_stats},
                         images, cells, ids, train=True,
                         mutable=["batch_stats"])
    return jnp.sum(out["prediction"])

  residuals = saved_residuals(loss, abstract.params, abstract.batch_stats,
                              images)   # traced, not run
  return sum(int(np.prod(shape)) * itemsize
             for shape, itemsize, why in residuals
             if not why.startswith("from the argument"))


def compile_step(c):
  """The train step of config c, lowered on abstract inputs and compiled."""
  built, mesh = _setup(c)
  state = jax.tree.map(
      lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
      built.abstract_state, built.state_sharding)
  batch_sharding = sharding.batch_sharded(mesh)
  batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=batch_sharding)
           for k, v in synthetic_batch(c, np.random.default_rng(0)).items()}
  return built.train_step.lower(state, batch).compile()


def xla_memory(compiled) -> dict:
  """Per-device bytes from XLA's memory analysis, and collective counts."""
  m = compiled.memory_analysis()
  args, out = m.argument_size_in_bytes, m.output_size_in_bytes
  temp, alias = m.temp_size_in_bytes, m.alias_size_in_bytes
  text = compiled.as_text()
  counts = {k: len(re.findall(rf"= [^=]*\b{k}(-start)?\(", text))
            for k in COLLECTIVES}
  return {"args": args, "temp": temp, "peak": args + temp + out - alias,
          **counts}


def _cells(row, base, keys):
  return " ".join(f"{row[k] / MB:9.1f} {row[k] / max(base[k], 1):5.2f}x"
                  for k in keys)


def main():
  args = ARGS
  modes = args.remat.split(",")
  combos = [(r, f) for r in modes for f in (False, True)]
  exact = {}
  for remat, fsdp in combos:
    c = bench_config(args, remat, fsdp)
    state, num_params = state_bytes(c)
    exact[(remat, fsdp)] = {"state": state, "acts": activation_bytes(c)}
  n = jax.device_count()
  print(f"\n{args.method}, ResNet-{args.depth} x{args.width} "
        f"({num_params / 1e6:.1f}M params), {args.image_size} px, global "
        f"batch {args.batch} ({args.batch // n}/device), {args.dtype}, {n} x "
        f"{jax.devices()[0].platform}, fsdp_min_size {args.fsdp_min_size}")
  print("Exact, per device: MiB (ratio to the first row)")
  print(f"{'remat':7s} {'fsdp':5s} {'state':>16s} {'acts (1 view)':>16s}")
  base = exact[combos[0]]
  for key, row in exact.items():
    print(f"{key[0]:7s} {str(key[1]):5s} {_cells(row, base, ('state', 'acts'))}")
  if not args.compile:
    return
  compiled = {key: xla_memory(compile_step(bench_config(args, *key)))
              for key in combos}
  print("XLA memory_analysis of the compiled step, per device: MiB (ratio)")
  print(f"{'remat':7s} {'fsdp':5s} {'args':>16s} {'temp':>16s} "
        f"{'peak':>16s}  gather/scatter/reduce")
  base = compiled[combos[0]]
  for key, row in compiled.items():
    print(f"{key[0]:7s} {str(key[1]):5s} "
          f"{_cells(row, base, ('args', 'temp', 'peak'))}  "
          f"{row['all-gather']}/{row['reduce-scatter']}/{row['all-reduce']}")


if __name__ == "__main__":
  main()
