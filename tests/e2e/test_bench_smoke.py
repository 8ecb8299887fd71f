"""Every bench/ script runs at its smallest size: benchmarks cannot rot.

Each script runs as a user runs it (`python bench/X.py ...`, repository
root as cwd) in a subprocess that inherits conftest.py's environment (CPU,
4 simulated devices, the collective timeout) and its persistent XLA cache
(through JAX_COMPILATION_CACHE_DIR, which jax reads itself: most scripts do
not call runtime.setup). The smallest sizes are the `:test` networks, a
batch of 8, one or two steps, a handful of images. Each must exit 0 and
print its result lines. bench/accelerator.py has its own, stricter test
(tests/e2e/test_bench_accelerator.py); test_every_script_is_covered keeps the
two lists complete when a script is added.

The timeouts only detect a hang: cold (an empty XLA cache) on 2 loaded
cores a script takes up to a few minutes.
"""
from __future__ import annotations

import json
import os
import pathlib
import re
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
BENCH = ROOT / "bench"
HANG_S = 1200

# script -> (arguments, lines its output must hold). {tmp} is a fresh
# directory of the test's own.
CASES = {
    "step_time.py": (
        ["--smoke"],
        [r"ResNet-18 x0\.125, 80px, batch 8",
         r"^detcon_b +[\d.]+ +[\d.]+ x byol +[\d.]+ x$",
         r"^detcon_s +[\d.]+ +[\d.]+ x simclr +[\d.]+ x$",
         r"colour augmentation on the device \(DetCon-B\): [\d.]+ % of the "
         r"step's FLOPs"]),
    "discovery.py": (
        ["--smoke"],
        [r"k-means: B=2 images of N=8x8=64 points, D=8, K=4",
         r"speed-up scikit-learn / jnp: [\d.]+x",
         r"inertia jnp / scikit-learn: [\d.]+",
         r"step time, ResNet-18 x0\.125, 64px views, batch 8",
         r"^  odin +[\d.]+ ms .* x detcon_b_fpn",
         r"^  r2o +[\d.]+ ms",
         r"GFLOP per step .* odin / detcon_b = [\d.]+",
         r"odin_cached refresh: [\d.]+ ms per image"]),
    "memory.py": (
        ["--depth=18", "--width=0.125", "--image_size=64", "--batch=8",
         "--remat=none"],
        [r"detcon_b, ResNet-18 x0\.125 \([\d.]+M params\), 64 px, global "
         r"batch 8 \(2/device\)",
         r"^none +False +[\d.]+ +1\.00x +[\d.]+ +1\.00x$",
         r"^none +True +[\d.]+ +[\d.]+x +[\d.]+ +1\.00x$",
         r"XLA memory_analysis of the compiled step",
         r"^none +True( +[\d.]+ +[\d.]+x){3}  \d+/\d+/\d+$"]),
    "precompute.py": (
        ["--images=4", "--workers=2"],
        [r"^4 JPEGs ~500x375",
         r"parallel efficiency \(2 workers\): wall [\d.]+",
         r"ImageNet 1\.33 M images on 16 cores: [\d.]+ h",
         r"1-worker and 2-worker outputs byte-identical: True"]),
    "input_pipeline.py": (
        ["--smoke", "--workers=1"],
        [r"64 px view pairs \+ masks from records, batch 8",
         r"read \+ decode alone: [\d.]+ examples/s",
         r"^ +1 +[\d.]+ +[\d.]+ +[\d.]+ +[\d.]+ +[\d.]+x$",
         r"Feed rate \(DetCon-B ResNet-50",
         r"^  H100 .* pairs/s vs +\d+ needed"]),
    "discovery_gain.py": (
        ["--config=configs/detcon_b.py:test", "--seeds=0", "--params=params",
         "--root={tmp}"],
        [r"^seed 0 params: ABO\^i [\d.]+ -> [\d.]+ \([+-][\d.]+\)",
         r"^\| 0 \| 4 \| params \| [\d.]+ \| [\d.]+ \|",
         r"^params: gain over 1 seeds: mean [+-][\d.]+"]),
    "aot_table.py": (
        ["--render"],
        [r"^\| preset \| slice \|",
         r"^\| DetCon-B \| v4-64 \| 32 × 128 \| .* \| [\d.]+ \(65\.6\) \|",
         r"DetCon-B ÷ BYOL FLOPs per image on v4-64: [\d.]+"]),
}
# Scripts whose smoke test lives elsewhere: script -> that test file.
COVERED_ELSEWHERE = {"accelerator.py": "tests/e2e/test_bench_accelerator.py"}


def bench_env(**extra) -> dict:
  """conftest.py's environment, its XLA cache made visible to jax itself."""
  env = dict(os.environ)
  env.setdefault("JAX_PLATFORMS", "cpu")
  cache = env.get("ODIN_JAX_XLA_CACHE")
  if cache:
    env.setdefault("JAX_COMPILATION_CACHE_DIR", cache)
    env.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "1.0")
  env.update(extra)
  return env


def run_script(script: str, args, env=None) -> subprocess.CompletedProcess:
  done = subprocess.run(
      [sys.executable, str(BENCH / script), *args], cwd=ROOT,
      env=env or bench_env(), capture_output=True, text=True,
      timeout=HANG_S, check=False)
  assert done.returncode == 0, (script, done.stdout[-3000:],
                                done.stderr[-5000:])
  return done


def assert_prints(script: str, stdout: str, patterns) -> None:
  for pattern in patterns:
    assert re.search(pattern, stdout, re.M), (script, pattern, stdout[-3000:])


@pytest.mark.parametrize("script", sorted(CASES))
def test_script_runs_at_its_smallest_size(script, tmp_path):
  args, patterns = CASES[script]
  args = [a.format(tmp=tmp_path) for a in args]
  done = run_script(script, args)
  assert_prints(script, done.stdout, patterns)


def test_aot_table_compiles_a_tiny_job_through_its_machinery(tmp_path):
  # The TPU compiler (libtpu) reads XLA_FLAGS too and knows no XLA:CPU
  # flags; the slice's devices are libtpu's, not simulated CPUs (as in
  # tests/e2e/test_aot.py).
  env = bench_env(ODIN_JAX_AOT_RESULTS=str(tmp_path))
  env.pop("XLA_FLAGS", None)
  done = run_script("aot_table.py", ["--smoke"], env=env)
  result = json.loads((tmp_path / "smoke_detcon_b_test_v4-8.json").read_text())
  assert result["fits"] and result["chips"] == 4
  assert result["batch_per_chip"] == 2 and result["flops_per_image"] > 0
  assert_prints("aot_table.py", done.stdout, [
      r"\[aot_table\] smoke_detcon_b_test_v4-8: rc 0 after",
      r"^\| DetCon-B :test \| v4-8 \| 4 × 2 \| .*fits, \d+ % free\) \| "
      r"[\d.]+ \|"])
  # A second run finds its JSON cached and only renders.
  again = run_script("aot_table.py", ["--smoke"], env=env)
  assert "smoke_detcon_b_test_v4-8: cached" in again.stdout
  assert_prints("aot_table.py", again.stdout, [r"^\| DetCon-B :test \| v4-8"])


def test_every_script_is_covered():
  scripts = {p.name for p in BENCH.glob("*.py") if p.name != "__init__.py"}
  covered = set(CASES) | set(COVERED_ELSEWHERE)
  assert scripts == covered, (
      f"without a smoke test: {sorted(scripts - covered)}; "
      f"gone: {sorted(covered - scripts)}")
  for script, test in COVERED_ELSEWHERE.items():
    assert f'"{script}"' in (ROOT / test).read_text(), (script, test)


def test_no_bench_script_imports_private_jax():
  """jax._src is JAX's private implementation: it moves between releases."""
  private = re.compile(r"\bjax\._src\b|from jax import _src\b")
  users = [p.name for p in sorted(BENCH.glob("*.py"))
           if private.search(p.read_text(encoding="utf-8"))]
  assert users == []
