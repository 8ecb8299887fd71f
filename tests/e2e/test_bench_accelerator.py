"""bench/accelerator.py --smoke: the accelerator check's code path on CPU.

One subprocess (the environment, XLA cache included, is inherited from
conftest.py) runs every row with the `:test` network; the JSON must hold
every row with positive, mutually consistent numbers.
"""
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))))
ROWS = ("detcon_b", "detcon_b_records", "byol", "kmeans", "odin",
        "odin_cached")


def test_smoke_writes_every_row(tmp_path):
  out = tmp_path / "accelerator.json"
  # The timeout only detects a hang (the smoke run takes minutes on 2 cores).
  done = subprocess.run(
      [sys.executable, os.path.join(ROOT, "bench", "accelerator.py"),
       "--smoke", f"--out={out}", "--time_budget_s=100000"],
      cwd=tmp_path, env=dict(os.environ), capture_output=True, text=True,
      timeout=1800, check=False)
  assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
  result = json.loads(out.read_text())
  assert result["smoke"] and result["device_kind"] and result["image_size"]
  rows = result["rows"]
  assert set(rows) == set(ROWS), rows.keys()
  for name in ROWS:
    assert "skipped" not in rows[name], (name, rows[name])
    assert name in done.stdout, f"{name} missing from the printed table"
  for name in ("detcon_b", "detcon_b_records", "byol", "odin", "odin_cached"):
    r = rows[name]
    assert r["batch"] == 8 and r["step_s"] > 0, (name, r)
    # img/s is the batch over the measured step time.
    assert abs(r["images_per_s"] - r["batch"] / r["step_s"]) < 1e-6 * r[
        "images_per_s"], (name, r)
  for name in ("detcon_b", "byol", "odin", "odin_cached"):
    assert rows[name]["peak_gib"] > 0, (name, rows[name])
  # Odin holds a third network (τ) and the spanning view: more memory.
  assert rows["odin"]["peak_gib"] > rows["detcon_b"]["peak_gib"]
  for name in ("byol", "odin", "odin_cached", "detcon_b_records"):
    r = rows[name]
    expected = rows["detcon_b"]["images_per_s"] / r["images_per_s"]
    assert abs(r["time_per_image_vs_detcon_b"] - expected) < 1e-9, (name, r)
  k = rows["kmeans"]
  assert k["sklearn_s"] > 0 and k["jnp_s"] > 0
  assert abs(k["time_ratio"] - k["sklearn_s"] / k["jnp_s"]) < 1e-9
  assert 0.5 < k["inertia_ratio"] < 2.0, k
  # The throughput goal is an H100's: not judged on a CPU.
  assert rows["detcon_b_records"]["goal_met"] is None
  assert "2000" in rows["detcon_b_records"]["goal"]
  assert k["goal_met"] == (k["time_ratio"] >= 10)
