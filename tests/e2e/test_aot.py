"""`python -m odin_jax.aot`: the real train step compiled for TPU slices.

libtpu (the test extra) describes TPU chips on this CPU host. Describing
slices and building meshes over them happens in this process, which also
shows that loading libtpu leaves the CPU tests' backend alone; the compiles
(the TPU compiler, ~1 minute of CPU each) run in subprocesses, as a user
runs the command.
"""
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from configs import detcon_b
from odin_jax import aot, hlo_stats, sharding, step

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))))
GiB = 2**30


def _describe(name, num_slices=1):
  return aot.slice_devices(name, num_slices)[1]


def test_slice_names_map_to_topologies_libtpu_accepts():
  assert aot.parse_slice("v4-64")[1:] == (32, "v4:2x4x4")
  assert aot.parse_slice("v4-8")[1:] == (4, "v4:2x2x1")
  assert aot.parse_slice("v5p-128")[1:] == (64, "v5p:4x4x4")
  assert aot.parse_slice("v5e-256")[1:] == (256, "v5e:16x16")
  assert aot.parse_slice("v5litepod-256")[1:] == (256, "v5e:16x16")
  assert aot.parse_slice("v6e-64")[1:] == (64, "v6e:8x8")
  with pytest.raises(ValueError, match=r"v7-8.*Known: v4-8, .*v5e-4"):
    aot.parse_slice("v7-8")
  with pytest.raises(ValueError, match="Known"):
    aot.parse_slice("v4-12")
  # libtpu agrees on the chip count of every name (a wrong grid would give
  # another count or be refused); v4 and v5p chips are one megacore device.
  kinds = {"v4": "TPU v4", "v5p": "TPU v5", "v5e": "TPU v5 lite",
           "v6e": "TPU v6 lite"}
  for name in aot.known_slices():
    family, chips, _ = aot.parse_slice(name)
    devices = _describe(name)
    assert len(devices) == chips, name
    assert devices[0].device_kind == kinds[family.name], name
  # Loading libtpu changed nothing for the CPU tests.
  assert jax.default_backend() == "cpu" and jax.device_count() == 4
  assert float(jax.jit(lambda x: x * 2)(np.float32(3))) == 6


def test_multi_slice_mesh_puts_data_over_dcn_last():
  devices = _describe("v5e-4", num_slices=2)
  mesh = sharding.make_mesh(devices[::-1])   # any order in
  slices = [d.slice_index for d in mesh.devices.flat]
  assert mesh.shape == {"data": 8}
  # Each slice's chips are one contiguous block of 'data': a contiguous
  # part of the batch stays on ICI, only cross-slice reductions use DCN.
  assert slices == sorted(slices) and set(slices) == {0, 1}
  one = sharding.make_mesh(_describe("v4-8"))
  assert one.shape == {"data": 4}


_HLO = """\
HloModule jit_step, entry_computation_layout={()->f32[]}

%fused_computation (p0: f32[64,32]) -> f32[64,32] {
  %p0 = f32[64,32]{1,0} parameter(0)
  ROOT %big = f32[64,32]{1,0} multiply(%p0, %p0)
}

%add (a: f32[], b: f32[]) -> f32[] {
  %a = f32[]{:T(128)} parameter(0)
  %b = f32[]{:T(128)} parameter(1)
  ROOT %s = f32[]{:T(128)} add(%a, %b)
}

%body (t: (s32[], f32[256])) -> (s32[], f32[256]) {
  %t = (s32[], f32[256]{0}) parameter(0)
  %g = f32[256]{0} get-tuple-element(%t), index=1
  %ar = f32[256]{0} all-reduce(%g), replica_groups={}, to_apply=%add
  %i = s32[] get-tuple-element(%t), index=0
  ROOT %r = (s32[], f32[256]{0}) tuple(%i, %ar)
}

%cond (t: (s32[], f32[256])) -> pred[] {
  %t = (s32[], f32[256]{0}) parameter(0)
  ROOT %c = pred[] constant(true)
}

ENTRY %main (x: bf16[16,128], y: f32[1024]) -> f32[] {
  %x = bf16[16,128]{1,0:T(8,128)(2,1)} parameter(0)
  %y = f32[1024]{0} parameter(1)
  %ags = (bf16[16,128]{1,0:T(8,128)(2,1)}, bf16[64,128]{1,0:T(8,128)(2,1)}) all-gather-start(%x), dimensions={0}, metadata={op_name="jit(step)/gather_weights"}
  %agd = bf16[64,128]{1,0:T(8,128)(2,1)} all-gather-done(%ags)
  %rs = f32[256]{0} reduce-scatter(%y), dimensions={0}, to_apply=%add
  %cps = (f32[256]{0}, f32[256]{0}, u32[], u32[]) collective-permute-start(%rs), source_target_pairs={{0,1}}
  %cpd = f32[256]{0} collective-permute-done(%cps)
  %fus = f32[64,32]{1,0} fusion(%y), kind=kLoop, calls=%fused_computation, metadata={op_name="jit(step)/mul"}
  %init = (s32[], f32[256]{0}) tuple(%c0, %cpd)
  %w = (s32[], f32[256]{0}) while(%init), condition=%cond, body=%body, backend_config={"known_trip_count":{"n":"3"}}
  ROOT %out = f32[] constant(0)
}
"""


def test_collective_bytes_count_each_collective_once_per_run():
  got = hlo_stats.collective_bytes(_HLO)
  assert got == {
      "all-gather": 64 * 128 * 2,       # the gathered array, start/done once
      "reduce-scatter": 1024 * 4,       # the array before scattering
      "collective-permute": 256 * 4,    # the buffer, not the u32 contexts
      "all-reduce": 3 * 256 * 4,        # in a 3-trip loop body
      "all-to-all": 0}


def test_largest_values_skip_fusion_bodies_and_arguments():
  rows = hlo_stats.largest_values(_HLO, n=3)
  # The gathered array (not its operand again), the fusion's output (not
  # the values inside its body), the loop's (s32[], f32[256]) state.
  assert [r["bytes"] for r in rows] == [64 * 128 * 2, 64 * 32 * 4,
                                        4 + 256 * 4]
  assert rows[0] == {"bytes": 64 * 128 * 2, "opcode": "all-gather-start",
                     "shape": "bf16[64,128]",
                     "op_name": "jit(step)/gather_weights"}
  assert rows[1] == {"bytes": 64 * 32 * 4, "opcode": "fusion",
                     "shape": "f32[64,32]", "op_name": "jit(step)/mul"}


def _aot(*args, timeout=900):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  env.pop("XLA_FLAGS", None)   # the slice's devices, not simulated CPUs
  return subprocess.run(
      [sys.executable, "-m", "odin_jax.aot",
       "--config=configs/detcon_b.py:test", *args],
      cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def _state_bytes(config):
  """Bytes of the train state and of θ alone, from the abstract state."""
  built = step.build(config, sharding.make_mesh(jax.devices()[:1]), 8)
  nbytes = lambda t: sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(t))
  return nbytes(built.abstract_state), nbytes(built.abstract_state.params)


@pytest.mark.parametrize("topology", ["v4-8", "v5e-4"])
def test_tiny_step_compiles_for_the_smallest_slices(topology, tmp_path):
  out = tmp_path / "aot.json"
  run = _aot(f"--topology={topology}", f"--out={out}")
  assert run.returncode == 0, run.stderr[-3000:]
  assert "HBM per chip" in run.stdout and "Compile time" in run.stdout
  r = json.loads(out.read_text())
  config = detcon_b.get_config("test")
  state, params = _state_bytes(config)
  assert r["fits"] and r["chips"] == 4 and r["batch_per_chip"] == 2
  assert r["hbm_capacity_bytes"] == {"v4-8": 32, "v5e-4": 16}[topology] * GiB
  # Replicated state: every chip holds all of it on entry (TPU tiles may
  # pad), and writes the new state into the donated buffers.
  assert r["arguments_bytes"] >= state
  assert state <= r["aliased_bytes"] <= r["outputs_bytes"]
  assert r["peak_bytes"] == (r["arguments_bytes"] + r["outputs_bytes"] +
                             r["temporaries_bytes"] - r["aliased_bytes"])
  assert r["arguments_bytes"] < r["peak_bytes"] <= r["hbm_capacity_bytes"]
  assert r["flops_per_chip"] > 0
  assert r["flops_per_image"] == pytest.approx(r["flops_per_chip"] * 4 / 8)
  # Data parallel: every gradient of θ is reduced over the chips once.
  c = r["collective_bytes"]
  assert c["all-reduce"] + c["reduce-scatter"] >= params
  assert r["largest_values"] and r["largest_values"][0]["bytes"] > 0


def test_oversized_batch_fails_with_the_options(tmp_path):
  out = tmp_path / "aot.json"
  run = _aot("--topology=v5e-4", "--config.batch_size=8192", f"--out={out}")
  assert run.returncode == 1
  message = run.stderr.strip().splitlines()[-1]
  assert message.startswith("error: The train step does not fit a v5e chip "
                            "of v5e-4: it needs ")
  assert "short by" in message
  for field in ("model.dtype=bfloat16", "model.remat=", "sharding.fsdp=True",
                "batch_size=8192 is 2048 per chip", "grad_accum_steps=2"):
    assert field in message, field
  r = json.loads(out.read_text())
  assert r["fits"] is False and r["error"] in message
