"""The accelerator check: one command, one JSON, one table (issue 17).

  python bench/accelerator.py                   # ResNet-50 bf16, 224 px
  python bench/accelerator.py --smoke           # CPU minutes (test suite)
  python bench/accelerator.py --out=FILE.json --time_budget_s=420

On the first device (`jax.devices()[0]`), one row each:
  detcon_b          DetCon-B ResNet-50 bf16 at 224 px, synthetic batches, at
                    the largest global batch of --batches that fits;
  detcon_b_records  the same step fed by the real input pipeline
                    (records written by data.precompute with FH masks,
                    pipeline.make_train_dataset, host -> device each step);
  byol              BYOL at DetCon-B's settings;
  odin              Odin, continuous τ (on-device discovery + k-means);
  odin_cached       Odin with cached masks (DetCon-B + FPN reading masks);
  kmeans            batched jnp k-means against scikit-learn on the same
                    points (bench/discovery.bench_kmeans).
Throughput is images (view pairs) per second: batch / median step time,
warm-up steps excluded, every step blocked (bench/step_time.time_runners).
Peak memory per row is XLA's memory analysis of that compiled step (args +
temp + unaliased outputs, bench/memory.xla_memory); the device's own peak
over the whole run and its limit are added where the runtime reports them
(GPU/TPU: memory_stats()).
Goals (issue 17): detcon_b_records >= 2000 img/s on one H100; k-means
>= 10x scikit-learn; Odin continuous <= 1.6x DetCon-B's step time
(bench/discovery.py). A row that would start after --time_budget_s is
recorded as skipped, so the command ends in time on a slow machine.

--smoke runs the same code with the `:test` network (ResNet-18 x0.125,
80 px, batch 8), 2 timed steps, a few records and a tiny k-means.
"""
from __future__ import annotations

import argparse
import gc
import itertools
import json
import os
import sys
import tempfile
import time

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, _ROOT)

import jax  # noqa: E402
import numpy as np  # noqa: E402

from bench import discovery as discovery_bench  # noqa: E402
from bench import precompute as image_maker  # noqa: E402
from bench import step_time  # noqa: E402
from bench.memory import xla_memory  # noqa: E402
from configs import byol, detcon_b, odin  # noqa: E402
from odin_jax import runtime, sharding, step  # noqa: E402
from odin_jax.data import pipeline, synthetic  # noqa: E402
from odin_jax.data import records  # noqa: E402
from odin_jax.data.records import precompute  # noqa: E402

GOAL_IMAGES_PER_S = 2000.0    # DetCon-B R50 bf16, real pipeline, one H100
GOAL_KMEANS_SPEEDUP = 10.0    # jnp k-means / scikit-learn
GOAL_ODIN_RATIO = 1.6         # Odin continuous step / DetCon-B step
# Descending global batches tried for DetCon-B; the other methods start
# from DetCon-B's choice (Odin's larger step may need a smaller one).
FULL_BATCHES = (1024, 768, 512, 384, 256, 128, 64)
GIB = 2**30


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--smoke", action="store_true",
                 help="tiny network and data: the CPU smoke test")
  p.add_argument("--out", default="accelerator.json", help="JSON written here")
  p.add_argument("--time_budget_s", type=float, default=420.0,
                 help="rows that would start later are skipped")
  p.add_argument("--batches", default=None,
                 help="comma-separated descending global batches to try")
  p.add_argument("--steps", type=int, default=None, help="timed steps a row")
  p.add_argument("--warmup", type=int, default=None, help="untimed steps")
  p.add_argument("--records", type=int, default=None,
                 help="images written as records for detcon_b_records")
  args = p.parse_args(argv)
  smoke = args.smoke
  args.batches = tuple(int(b) for b in args.batches.split(",")) \
      if args.batches else ((8,) if smoke else FULL_BATCHES)
  args.steps = args.steps or (2 if smoke else 10)
  args.warmup = args.warmup if args.warmup is not None else (1 if smoke else 3)
  args.records = args.records or (8 if smoke else 64)
  return args


def make_config(module, args):
  """module's config for the check: the papers' network in bf16 at 224 px,
  or the `:test` preset with --smoke."""
  c = module.get_config("test" if args.smoke else "imagenet")
  c.model.dtype = "bfloat16"
  return c


def odin_cached(args):
  """Odin with masks read from the data (refreshed once per copy period):
  its step is DetCon-B's with the FPN, plus the τ copy."""
  c = make_config(odin, args)
  c.odin.tau_update, c.odin.cached = "copy", True
  return c


def is_out_of_memory(error: Exception) -> bool:
  text = str(error)
  return "RESOURCE_EXHAUSTED" in text or "out of memory" in text.lower()


class Runner:
  """One config's train step (step.build) at one batch on `mesh`, compiled
  for a synthetic batch; run() -> seconds of one blocked step."""

  def __init__(self, config, mesh):
    self.config = config
    self.built = step.build(config, mesh, num_examples=1000 * config.batch_size)
    self.mesh = mesh
    self.state = self.built.init_state(jax.random.PRNGKey(0))
    self.batch = sharding.to_global(mesh, synthetic.synthetic_batch(
        config, np.random.default_rng(0)))
    self.compiled = self.built.train_step.lower(self.state, self.batch).compile()
    self.memory = xla_memory(self.compiled)

  def run(self) -> float:
    start = time.perf_counter()
    self.state, metrics = self.compiled(self.state, self.batch)
    jax.block_until_ready(metrics)
    return time.perf_counter() - start

  def close(self):
    """Frees the device arrays, so the next row has the whole device."""
    self.state = self.batch = self.compiled = None
    gc.collect()


def fit_runner(config, mesh, batches) -> Runner:
  """A Runner at the first of `batches` (descending) whose step compiles and
  runs one step without running out of device memory."""
  errors = []
  for batch in batches:
    if batch % mesh.devices.size:
      continue
    config.batch_size = batch
    try:
      runner = Runner(config, mesh)
      runner.run()
      return runner
    except Exception as e:  # pylint: disable=broad-except
      if not is_out_of_memory(e):
        raise
      errors.append(f"{batch}: {str(e).splitlines()[0][:120]}")
      runner = None
      gc.collect()
  raise RuntimeError(f"{config.method}: no batch of {batches} fits on "
                     f"{jax.devices()[0].device_kind}: " + "; ".join(errors))


def device_memory() -> dict:
  """The device's own counters (GPU/TPU; {} on CPU), in GiB. The peak is
  the process's so far (all rows, and any batch that did not fit): the
  runtime offers no public reset, so rows report XLA's per-step peak."""
  stats = jax.devices()[0].memory_stats() or {}
  return {k + "_gib": stats[k] / GIB for k in ("peak_bytes_in_use",
                                               "bytes_limit") if k in stats}


def time_step_row(name, config, mesh, batches, args) -> dict:
  """Images/s of config's step on synthetic batches at the largest batch of
  `batches` that fits."""
  runner = fit_runner(config, mesh, batches)
  try:
    seconds = step_time.time_runners({name: runner.run}, args)[name]
    peak = runner.memory["peak"]   # XLA's memory analysis of this step
  finally:
    runner.close()
  return {"batch": config.batch_size, "step_s": seconds,
          "images_per_s": config.batch_size / seconds,
          "peak_gib": peak / GIB}


def write_records(config, folder: str, num_images: int,
                  num_workers: int = 0) -> str:
  """num_images ImageNet-like JPEGs (bench/precompute.make_images) as
  records with config's masks (FH), by data.precompute; returns the dir."""
  images = os.path.join(folder, "images")
  os.makedirs(images)
  image_maker.make_images(images, num_images)
  out = os.path.join(folder, "records")
  precompute.run(precompute.Options(
      source=f"folder:{images}", output_dir=out,
      masks=(records.mask_setting_string(config.masks),),
      num_shards=min(4, num_images), num_workers=num_workers,
      log_every_s=1e9))
  return out


def time_records_row(config, mesh, args) -> dict:
  """DetCon-B's step fed by the real input pipeline from records: each
  step reads, decodes and augments a batch on the host (tf.data, in
  parallel with the device) and copies it to the device."""
  with tempfile.TemporaryDirectory() as tmp:
    source = records.RecordSource(write_records(
        config, tmp, args.records, num_workers=1 if args.smoke else 0),
                                  config.masks)
    built = step.build(config, mesh, num_examples=source.num_examples)
    state = built.init_state(jax.random.PRNGKey(0))
    keys = set(built.method.batch_keys())
    batches = pipeline.numpy_batches(pipeline.make_train_dataset(
        config, source, global_batch_size=config.batch_size,
        process_index=0, process_count=1))

    def steps(n, state):
      metrics = None
      for batch in itertools.islice(batches, n):
        state, metrics = built.train_step(state, sharding.to_global(
            mesh, {k: v for k, v in batch.items() if k in keys}))
      jax.block_until_ready(metrics)
      return state

    state = steps(args.warmup + 1, state)   # + 1: compiles the step
    start = time.perf_counter()
    state = steps(args.steps, state)
    seconds = (time.perf_counter() - start) / args.steps
    del state
    gc.collect()
  return {"batch": config.batch_size, "step_s": seconds,
          "images_per_s": config.batch_size / seconds,
          "records": args.records}


def kmeans_row(args) -> dict:
  """bench/discovery.bench_kmeans: Odin-like features (56x56 cells, D=128,
  K=16, 32 images), or a tiny problem with --smoke."""
  sizes = (dict(batch=2, size=8, dim=8, clusters=4, iters=3, repeats=1)
           if args.smoke else dict(batch=32, size=56, dim=128, clusters=16,
                                   iters=10, repeats=3))
  out = discovery_bench.bench_kmeans(**sizes)
  return {**sizes, **out}


def measure(args, mesh) -> dict:
  """Every row, in priority order, each skipped once the budget is spent."""
  start = time.perf_counter()
  rows = {}

  def row(name, fn):
    spent = time.perf_counter() - start
    if spent > args.time_budget_s:
      rows[name] = {"skipped": f"time budget {args.time_budget_s:g} s spent"}
      return
    began = time.perf_counter()
    rows[name] = fn()
    rows[name]["wall_s"] = time.perf_counter() - began
    print(f"[accelerator] {name}: {rows[name]}", flush=True)

  base = make_config(detcon_b, args)
  row("detcon_b", lambda: time_step_row("detcon_b", base, mesh,
                                        args.batches, args))
  fitted = rows["detcon_b"]["batch"]
  # The others start from DetCon-B's batch ("the same settings").
  same = tuple(b for b in args.batches if b <= fitted)
  row("detcon_b_records", lambda: time_records_row(base, mesh, args))
  row("byol", lambda: time_step_row("byol", make_config(byol, args), mesh,
                                    same, args))
  row("kmeans", lambda: kmeans_row(args))
  row("odin", lambda: time_step_row("odin", make_config(odin, args), mesh,
                                    same, args))
  row("odin_cached", lambda: time_step_row("odin_cached", odin_cached(args),
                                           mesh, same, args))
  return rows


def add_ratios_and_goals(rows: dict, device_kind: str) -> None:
  """Each row's ratio to DetCon-B's step time and its goal, in place."""
  base = rows["detcon_b"].get("step_s")
  for name in ("detcon_b_records", "byol", "odin", "odin_cached"):
    r = rows.get(name, {})
    if "step_s" in r and base:
      # Per image: rows may run at a smaller batch than DetCon-B.
      r["time_per_image_vs_detcon_b"] = (
          rows["detcon_b"]["images_per_s"] / r["images_per_s"])
  on_h100 = "H100" in device_kind
  if "images_per_s" in rows.get("detcon_b_records", {}):
    r = rows["detcon_b_records"]
    r["goal"] = f">= {GOAL_IMAGES_PER_S:g} img/s on one H100"
    r["goal_met"] = (r["images_per_s"] >= GOAL_IMAGES_PER_S) if on_h100 \
        else None   # the goal is stated for an H100 only
  if "time_ratio" in rows.get("kmeans", {}):
    r = rows["kmeans"]
    r["goal"] = f">= {GOAL_KMEANS_SPEEDUP:g}x scikit-learn"
    r["goal_met"] = r["time_ratio"] >= GOAL_KMEANS_SPEEDUP
  if "time_per_image_vs_detcon_b" in rows.get("odin", {}):
    r = rows["odin"]
    r["goal"] = f"<= {GOAL_ODIN_RATIO:g}x DetCon-B"
    r["goal_met"] = r["time_per_image_vs_detcon_b"] <= GOAL_ODIN_RATIO


def table(result: dict) -> str:
  """The printed summary of result (the JSON's contents)."""
  lines = [f"{result['device_kind']} ({result['platform']} x"
           f"{result['device_count']}), {result['network']}, "
           f"{result['image_size']} px, bf16"
           + (" [smoke]" if result["smoke"] else ""),
           f"{'row':17s} {'batch':>6s} {'img/s':>9s} {'x detcon_b':>10s} "
           f"{'peak GiB':>8s}  goal"]
  for name, r in result["rows"].items():
    if "skipped" in r:
      lines.append(f"{name:17s} skipped: {r['skipped']}")
      continue
    goal = r.get("goal", "")
    if goal:
      met = r.get("goal_met")
      goal += {True: " (met)", False: " (NOT met)",
               None: " (not an H100)"}[met]
    if name == "kmeans":
      lines.append(f"{name:17s} {r['batch']:6d} "
                   f"{'':>9s} {'':>10s} {'':>8s}  scikit-learn "
                   f"{r['sklearn_s']:.3f} s / jnp {r['jnp_s']:.3f} s = "
                   f"{r['time_ratio']:.1f}x, inertia x{r['inertia_ratio']:.3f}"
                   f"; {goal}")
      continue
    ratio = r.get("time_per_image_vs_detcon_b", 1.0)
    peak = f"{r['peak_gib']:8.2f}" if "peak_gib" in r else f"{'-':>8s}"
    lines.append(f"{name:17s} {r['batch']:6d} {r['images_per_s']:9.1f} "
                 f"{ratio:10.3f} {peak}  {goal}")
  memory = result.get("device_memory")
  if memory:
    lines.append("device memory over the run: " + ", ".join(
        f"{k[:-4]} {v:.2f} GiB" for k, v in memory.items()))
  return "\n".join(lines)


def main(argv=None):
  args = parse_args(argv)
  runtime.setup(distributed=False)   # TF off the GPU; persistent XLA cache
  mesh = sharding.make_mesh(jax.devices()[:1])   # the check is per chip
  device = jax.devices()[0]
  started = time.perf_counter()
  rows = measure(args, mesh)
  add_ratios_and_goals(rows, device.device_kind)
  c = make_config(detcon_b, args)
  result = {
      "device_kind": device.device_kind, "platform": device.platform,
      "device_count": 1, "smoke": args.smoke,
      "network": f"ResNet-{c.model.depth} x{c.model.width:g}",
      "image_size": c.image_size, "steps": args.steps,
      "warmup": args.warmup, "time_budget_s": args.time_budget_s,
      "wall_s": time.perf_counter() - started,
      "device_memory": device_memory(), "rows": rows}
  with open(args.out, "w") as f:
    json.dump(result, f, indent=1)
  print(table(result))
  print(f"wrote {args.out} ({result['wall_s']:.0f} s)")
  return result


if __name__ == "__main__":
  main()
