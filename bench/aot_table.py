r"""The README's TPU table: every paper preset compiled for real slices by
`python -m odin_jax.aot`, on this CPU host, no TPU needed.

  python bench/aot_table.py                 # compile what is not cached yet
  python bench/aot_table.py --only=detcon_b_v4-64,byol_v4-64
  python bench/aot_table.py --render        # print the markdown table only
  python bench/aot_table.py --smoke         # DetCon-B `:test` on v4-8 only

Each job is one `python -m odin_jax.aot` subprocess; its JSON is cached in
bench/results/aot/<job>.json (delete a file to recompile it). A ResNet-50
step takes 6-20 minutes to compile on 2 CPU cores, so the whole table is a
few CPU-hours: run it in the background (`nice`), it resumes where it
stopped. The rendered table compares each preset's FLOPs per image with the
paper's arithmetic (ANALYTIC_GFLOPS below) and gives DetCon-B / BYOL.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)
RESULTS = os.environ.get("ODIN_JAX_AOT_RESULTS",
                         os.path.join(HERE, "results", "aot"))


@dataclasses.dataclass(frozen=True)
class Job:
  name: str
  config: str          # configs/<method>.py[:preset]
  topology: str
  num_slices: int = 1
  overrides: tuple = ()
  label: str = ""      # the row's name in the table


ODIN_CACHED = ("--config.odin.tau_update=copy", "--config.odin.cached=True")

# In the order they are worth having: the DetCon-B / BYOL ratio first.
JOBS = (
    Job("detcon_b_v4-64", "configs/detcon_b.py", "v4-64", label="DetCon-B"),
    Job("byol_v4-64", "configs/byol.py", "v4-64", label="BYOL"),
    Job("odin_v4-64", "configs/odin.py", "v4-64", label="Odin"),
    Job("detcon_b_v5e-256", "configs/detcon_b.py", "v5e-256",
        label="DetCon-B"),
    Job("odin_v5e-256", "configs/odin.py", "v5e-256", label="Odin"),
    Job("detcon_b_2xv5e-256", "configs/detcon_b.py", "v5e-256", 2,
        label="DetCon-B"),
    Job("odin_2xv5e-256", "configs/odin.py", "v5e-256", 2, label="Odin"),
    Job("simclr_v4-64", "configs/simclr.py", "v4-64", label="SimCLR"),
    Job("detcon_s_v4-64", "configs/detcon_s.py", "v4-64", label="DetCon-S"),
    Job("odin_cached_v4-64", "configs/odin.py", "v4-64",
        overrides=ODIN_CACHED, label="Odin cached"),
    Job("r2o_v4-64", "configs/r2o.py", "v4-64", label="R2O"),
    Job("detcon_b_vit_b16_v4-64", "configs/detcon_b.py:vit_b16", "v4-64",
        label="DetCon-B ViT-B/16"),
    Job("odin_swin_t_v4-64", "configs/odin.py:swin_t", "v4-64",
        label="Odin Swin-T"),
)

# The papers' arithmetic for one image's step, in GFLOPs (multiply-adds x 2,
# forward + backward = 3x forward for trained networks, 1x for targets).
# ResNet-50 forward at 224 px: 4.1 GMACs = 8.2 GFLOPs. Two views pass the
# online network (fwd + bwd: 3x) and the target network (fwd: 1x), so a
# BYOL-style step is 2 x (3 + 1) x 8.2 = 65.6 GFLOPs per image; the heads,
# the loss and the optimizer add a few percent. DetCon's paper reports its
# step at +11.6 % over BYOL's (DetCon §4.4, FH masks precomputed).
R50_FWD_GFLOPS = 8.2
ODIN_PIXEL_PROJECTOR = 2 * 112 * 112 * 2 * 256 * 4096 / 1e9
ANALYTIC_GFLOPS = {
    "BYOL": 2 * 4 * R50_FWD_GFLOPS,
    "SimCLR": 2 * 3 * R50_FWD_GFLOPS,     # no target network
    "DetCon-B": 2 * 4 * R50_FWD_GFLOPS,
    "DetCon-S": 2 * 3 * R50_FWD_GFLOPS,
    "R2O": 2 * 4 * R50_FWD_GFLOPS + 4 * R50_FWD_GFLOPS,   # + 448-px target
    # Odin: + τ on the 448-px spanning view (4x the pixels, forward only)
    # + τ's projector on every pixel of its 112 x 112 p2 map (256 -> 4096
    # -> 256: 2 x 12544 x 2 x 256 x 4096 FLOPs = 52.6 GFLOPs). Not counted:
    # the FPN, the heads, k-means and the block remat's recomputed forward.
    "Odin": 2 * 4 * R50_FWD_GFLOPS + 4 * R50_FWD_GFLOPS + ODIN_PIXEL_PROJECTOR,
    "Odin cached": 2 * 4 * R50_FWD_GFLOPS,
}
PAPER_DETCON_OVER_BYOL = 1.116
# --smoke: the tiny `:test` step on the smallest v4 slice (about a minute of
# CPU), through the same job machinery; its JSON goes to RESULTS like the
# others (set ODIN_JAX_AOT_RESULTS to keep it out of bench/results/aot).
SMOKE_JOB = Job("smoke_detcon_b_test_v4-8", "configs/detcon_b.py:test",
                "v4-8", label="DetCon-B :test")


def job_path(job: Job) -> str:
  return os.path.join(RESULTS, job.name + ".json")


def run_job(job: Job) -> int:
  """Compiles one job in a subprocess; its JSON lands in job_path."""
  cmd = [sys.executable, "-m", "odin_jax.aot", f"--config={job.config}",
         f"--topology={job.topology}", f"--num_slices={job.num_slices}",
         f"--out={job_path(job)}", *job.overrides]
  print(f"[aot_table] {job.name}: {' '.join(cmd[1:])}", flush=True)
  start = time.time()
  rc = subprocess.call(cmd, cwd=ROOT)
  print(f"[aot_table] {job.name}: rc {rc} after {time.time() - start:.0f} s",
        flush=True)
  return rc


def _gib(n) -> str:
  return f"{n / 2**30:.1f}"


def render(jobs=JOBS) -> str:
  """The markdown table over the cached JSON files (missing rows say so)."""
  rows = ["| preset | slice | chips × batch/chip | dtype, remat | peak / HBM "
          "GiB (margin) | GFLOPs/image (paper arithmetic) | all-reduce / "
          "all-gather MiB per step | compile s |",
          "|---|---|---|---|---|---|---|---|"]
  results = {}
  for job in jobs:
    if not os.path.exists(job_path(job)):
      rows.append(f"| {job.label} | {_slice(job)} | not compiled yet |"
                  " | | | | |")
      continue
    with open(job_path(job), encoding="utf-8") as f:
      r = json.load(f)
    results[job.name] = r
    cap = r["hbm_capacity_bytes"] if "hbm_capacity_bytes" in r else None
    if not r.get("fits", False) and "peak_bytes" not in r:
      rows.append(f"| {job.label} | {_slice(job)} | {r['chips']} × "
                  f"{r['batch_per_chip']} | | does not fit: "
                  f"{r.get('error', '?').splitlines()[0][:120]} | | | |")
      continue
    margin = (cap - r["peak_bytes"]) / cap
    paper = ANALYTIC_GFLOPS.get(job.label)
    paper_s = f" ({paper:.1f})" if paper else ""
    coll = r["collective_bytes"]
    rows.append(
        f"| {job.label} | {_slice(job)} | {r['chips']} × "
        f"{r['batch_per_chip']} | {r.get('dtype', '?')}, "
        f"{r.get('remat', '?')} | {_gib(r['peak_bytes'])} / {_gib(cap)} "
        f"({'fits' if r.get('fits') else 'DOES NOT FIT'}, "
        f"{100 * margin:.0f} % free) | "
        f"{r['flops_per_image'] / 1e9:.1f}{paper_s} | "
        f"{coll['all-reduce'] / 2**20:.0f} / {coll['all-gather'] / 2**20:.0f}"
        f" | {r['compile_seconds']:.0f} |")
  text = "\n".join(rows)
  d, b = results.get("detcon_b_v4-64"), results.get("byol_v4-64")
  if d and b:
    ratio = d["flops_per_image"] / b["flops_per_image"]
    text += (f"\n\nDetCon-B ÷ BYOL FLOPs per image on v4-64: {ratio:.3f} "
             f"(+{100 * (ratio - 1):.1f} %; the paper reports "
             f"+{100 * (PAPER_DETCON_OVER_BYOL - 1):.1f} %).")
  return text


def colour_share(job: Job) -> str:
  """The on-device colour augmentation (data/color.py `prepare`) compiled
  alone for the job's slice and batch, against the job's cached step."""
  import jax  # pylint: disable=g-import-not-at-top
  import importlib  # pylint: disable=g-import-not-at-top
  from odin_jax import aot, sharding  # pylint: disable=g-import-not-at-top
  from odin_jax.data import color  # pylint: disable=g-import-not-at-top
  path, _, preset = job.config.partition(":")
  module = importlib.import_module(
      "configs." + os.path.splitext(os.path.basename(path))[0])
  config = module.get_config(preset or None)
  _, devices = aot.slice_devices(job.topology, job.num_slices)
  mesh = sharding.make_mesh(devices)
  batch = aot.abstract_batch(config, mesh)
  key = jax.random.PRNGKey(0)
  compiled = jax.jit(lambda b: color.prepare(b, key, config)).lower(
      batch).compile()
  flops = aot._flops(compiled)   # pylint: disable=protected-access
  with open(job_path(job), encoding="utf-8") as f:
    step_flops = json.load(f)["flops_per_chip"]
  return (f"{job.label} on {_slice(job)}: colour augmentation "
          f"{flops / 1e9:.2f} GFLOPs per chip per step = "
          f"{100 * flops / step_flops:.2f} % of the step's "
          f"{step_flops / 1e12:.2f} TFLOPs (goal <= 2 %)")


def _slice(job: Job) -> str:
  return (f"{job.num_slices}× {job.topology}" if job.num_slices > 1
          else job.topology)


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--only", default="", help="comma-separated job names")
  p.add_argument("--render", action="store_true",
                 help="print the table from the cached JSON only")
  p.add_argument("--list", action="store_true", help="list the job names")
  p.add_argument("--smoke", action="store_true",
                 help="compile (unless cached) and render only the tiny "
                 "`:test` job (CPU smoke test)")
  p.add_argument("--colour_share", action="store_true",
                 help="compile the on-device colour augmentation alone for "
                 "DetCon-B's v4-64 job and print its share of the step")
  args = p.parse_args(argv)
  if args.list:
    print("\n".join(j.name for j in JOBS))
    return 0
  if args.colour_share:
    print(colour_share(JOBS[0]))
    return 0
  jobs = JOBS
  if args.smoke:
    jobs = (SMOKE_JOB,)
  elif args.only:
    wanted = args.only.split(",")
    unknown = sorted(set(wanted) - {j.name for j in JOBS})
    if unknown:
      p.error(f"unknown jobs {unknown}; --list shows them")
    jobs = tuple(j for j in JOBS if j.name in wanted)
  if not args.render:
    os.makedirs(RESULTS, exist_ok=True)
    for job in jobs:
      if os.path.exists(job_path(job)):
        print(f"[aot_table] {job.name}: cached", flush=True)
        continue
      if run_job(job) and args.smoke:
        return 1
  print(render((SMOKE_JOB,) if args.smoke else JOBS))
  return 0


if __name__ == "__main__":
  sys.exit(main())
