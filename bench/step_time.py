"""Step time of DetCon-B, BYOL, DetCon-S and SimCLR, as ratios in one run.

Same network, batch and resolution for all four; only the method differs.
  python bench/step_time.py                 # ResNet-18 x0.5, 96 px, batch 32
  python bench/step_time.py --depth=50 --width=1 --image_size=224 --batch=64
  python bench/step_time.py --smoke         # `:test` nets, 1 step: the tests
Prints a table; the goal is DetCon-B <= 1.05 x BYOL (paper: +11.6% FLOPs).
It also prints the on-device colour augmentation's share of DetCon-B's step
(data/color.py, the step's first act): its FLOPs and its time run alone,
against the whole step's (goal: <= 2 %).
"""
import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from configs import byol, detcon_b, detcon_s, simclr  # noqa: E402
from odin_jax import sharding, step  # noqa: E402
from odin_jax.data import color, synthetic  # noqa: E402


def bench_config(module, args):
  """module's demo config (args.preset's, if set) resized to the benchmark's
  network and batch."""
  c = module.get_config(getattr(args, "preset", None) or "demo")
  c.model.depth, c.model.width = args.depth, args.width
  c.image_size, c.batch_size = args.image_size, args.batch
  if args.depth >= 50:   # each method's paper heads (its imagenet preset):
    paper = module.get_config().model   # BYOL/DetCon-B 4096/256 (+ 4096
    for field in ("projector_hidden", "projector_dim",   # predictor),
                  "predictor_hidden"):    # SimCLR/DetCon-S 2048/128
      c.model[field] = paper[field]
  return c


def make_runner(c):
  """Compiles config c's train step; returns run() -> seconds of one jitted,
  blocked step (the state is carried from step to step), with run.flops the
  step's FLOPs by XLA's cost analysis."""
  mesh = sharding.make_mesh()
  # The run's own set-up (step.build): 100 steps an epoch for the schedules.
  built = step.build(c, mesh, num_examples=100 * c.batch_size)
  state, fn = built.init_state(jax.random.PRNGKey(0)), built.train_step
  batch = sharding.to_global(mesh, synthetic.synthetic_batch(c, np.random.default_rng(0)))
  compiled = fn.lower(state, batch).compile()
  carry = {"state": state}

  def run():
    t = time.perf_counter()
    carry["state"], m = compiled(carry["state"], batch)
    jax.block_until_ready(m)
    return time.perf_counter() - t

  run.flops = compiled_flops(compiled)
  return run


def compiled_flops(compiled) -> float:
  """XLA's FLOP count of a compiled program. A while loop's body (k-means's
  iterations) is counted once, not per iteration."""
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return float(cost.get("flops", float("nan")))


def time_runners(runners: dict, args, reduce=np.median) -> dict:
  """Median (or reduce(times); reduce=None: the list) of the seconds per
  step of each runner, interleaved round by round.

  After args.warmup steps each, round r runs one step of every runner in
  turn, so a change of load on a shared host hits all of them alike (timing
  one method after the other made ratios drift by 2x on a loaded machine).
  """
  for run in runners.values():
    for _ in range(args.warmup):
      run()
  times = {name: [] for name in runners}
  for _ in range(args.steps):
    for name, run in runners.items():
      times[name].append(run())
  if reduce is None:
    return times
  return {name: float(reduce(t)) for name, t in times.items()}


def time_configs(configs: dict, args) -> dict:
  """Median step seconds of each config (name -> config), interleaved."""
  return time_runners({name: make_runner(c) for name, c in configs.items()},
                      args)


def time_config(c, args):
  """Median wall time of one jitted, blocked train step of config c."""
  return time_configs({"c": c}, args)["c"]


def time_method(module, args):
  return time_config(bench_config(module, args), args)


def augmentation_share(c, args) -> dict:
  """The colour augmentation (color.prepare) alone against config c's step:
  FLOPs by XLA's count and median blocked time, interleaved."""
  step_run = make_runner(c)
  batch = synthetic.synthetic_batch(c, np.random.default_rng(1))
  key = jax.random.PRNGKey(0)
  prepare = jax.jit(lambda b: color.prepare(b, key, c))
  compiled = prepare.lower(batch).compile()
  device_batch = jax.device_put(batch)

  def prep_run():
    t = time.perf_counter()
    jax.block_until_ready(compiled(device_batch))
    return time.perf_counter() - t

  times = time_runners({"step": step_run, "colour": prep_run}, args)
  return {"flops_share": compiled_flops(compiled) / step_run.flops,
          "time_share": times["colour"] / times["step"],
          "step_ms": 1000 * times["step"], "colour_ms": 1000 * times["colour"]}


def parse_args(argv=None):
  p = argparse.ArgumentParser()
  p.add_argument("--depth", type=int, default=18)
  p.add_argument("--width", type=float, default=0.5)
  p.add_argument("--image_size", type=int, default=96)
  p.add_argument("--batch", type=int, default=32)
  p.add_argument("--steps", type=int, default=10)
  p.add_argument("--warmup", type=int, default=2)
  p.add_argument("--smoke", action="store_true",
                 help="the `:test` preset (ResNet-18 x0.125, 80 px, batch 8),"
                 " 1 warm-up + 1 timed step: the CPU smoke test")
  args = p.parse_args(argv)
  args.preset = "demo"
  if args.smoke:
    args.preset = "test"
    args.width, args.image_size, args.batch = 0.125, 80, 8
    args.steps, args.warmup = 1, 1
  return args


def main(argv=None):
  args = parse_args(argv)
  methods = {"byol": byol, "detcon_b": detcon_b, "simclr": simclr, "detcon_s": detcon_s}
  runners = {name: make_runner(bench_config(mod, args))
             for name, mod in methods.items()}
  t = time_runners(runners, args)
  print(f"\n{jax.devices()[0].platform} x{jax.device_count()}, ResNet-{args.depth} "
        f"x{args.width}, {args.image_size}px, batch {args.batch}, median of {args.steps} "
        f"interleaved steps; FLOPs: XLA's count of the compiled step")
  print(f"{'method':10s} {'step (ms)':>10s} {'time ratio':>18s} {'FLOPs ratio':>12s}")
  for name, base in (("byol", "byol"), ("detcon_b", "byol"), ("simclr", "simclr"),
                     ("detcon_s", "simclr")):
    flops = runners[name].flops / runners[base].flops
    print(f"{name:10s} {1000 * t[name]:10.1f} {t[name] / t[base]:8.3f} x {base:8s}"
          f" {flops:8.3f} x")
  share = augmentation_share(bench_config(detcon_b, args), args)
  print(f"colour augmentation on the device (DetCon-B): "
        f"{100 * share['flops_share']:.2f} % of the step's FLOPs, "
        f"{100 * share['time_share']:.2f} % of its time "
        f"({share['colour_ms']:.1f} of {share['step_ms']:.1f} ms); goal <= 2 %")


if __name__ == "__main__":
  main()
