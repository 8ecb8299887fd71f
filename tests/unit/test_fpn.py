"""FPN: shapes on odd ResNet grids, values, top-down information, parameters."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from odin_jax.models import fpn, resnet

# ResNet-18 x0.125 stage channels (64w, 128w, 256w, 512w).
CHANNELS = (8, 16, 32, 64)


def stage_dict(rng, size: int, batch: int = 2):
  """Synthetic ResNet outputs for a `size` px image: 'stage1'..'stage4'."""
  return {f"stage{i + 1}": rng.normal(size=(
      batch, resnet.stage_grid(size, f"stage{i + 1}"),
      resnet.stage_grid(size, f"stage{i + 1}"), c)).astype(np.float32)
          for i, c in enumerate(CHANNELS)}


def numpy_conv(x, kernel, bias):
  """Stride-1 cross-correlation, zero padding k // 2: [B,H,W,C] -> [B,H,W,O]."""
  k = kernel.shape[0]
  p = k // 2
  xp = np.pad(x, ((0, 0), (p, p), (p, p), (0, 0)))
  out = np.zeros(x.shape[:3] + (kernel.shape[-1],))
  for dy in range(k):
    for dx in range(k):
      out += np.einsum("bhwc,co->bhwo",
                       xp[:, dy:dy + x.shape[1], dx:dx + x.shape[2]],
                       kernel[dy, dx])
  return out + bias


@pytest.mark.parametrize("size,grids", [(80, (20, 10, 5, 3)),
                                        (96, (24, 12, 6, 3))])
def test_backbone_with_fpn_shapes(size, grids):
  model = fpn.BackboneWithFPN(depth=18, width=0.125, fpn_channels=16)
  out, _ = jax.eval_shape(lambda: model.init_with_output(
      jax.random.PRNGKey(0), jnp.zeros((2, size, size, 3)), train=False))
  for level, grid, c in zip(fpn.LEVELS, grids, CHANNELS):
    assert out[level].shape == (2, grid, grid, 16), level
    stage = fpn.LEVEL_STAGE[level]
    assert out[stage].shape == (2, grid, grid, c), stage
  assert out["stem"].shape == (2, grids[0], grids[0], 8)


def test_upsample_nearest_is_torch_rule():
  x = np.arange(3 * 4, dtype=np.float32).reshape(1, 3, 4, 1)
  got = np.asarray(fpn.upsample_nearest(jnp.asarray(x), (5, 8)))[0, :, :, 0]
  # torch interpolate(size=(5, 8), mode='nearest'): rows 0,0,1,1,2; columns
  # are a x2 repeat since 8 = 2 * 4.
  want = x[0, [0, 0, 1, 1, 2]][:, np.repeat(np.arange(4), 2), 0]
  np.testing.assert_array_equal(got, want)


def test_fpn_matches_numpy_reference():
  rng = np.random.default_rng(0)
  feats = stage_dict(rng, 80)
  module = fpn.FPN(channels=8)
  out, variables = module.init_with_output(jax.random.PRNGKey(1), feats)
  p = jax.tree.map(np.asarray, variables["params"])
  merged = None
  for level in ("p5", "p4", "p3", "p2"):
    lat = p[f"lateral_{level}"]
    m = numpy_conv(feats[fpn.LEVEL_STAGE[level]], lat["kernel"], lat["bias"])
    if merged is not None:
      h, w = m.shape[1:3]
      rows = np.floor(np.arange(h) * merged.shape[1] / h).astype(int)
      cols = np.floor(np.arange(w) * merged.shape[2] / w).astype(int)
      m = m + merged[:, rows][:, :, cols]
    merged = m
    o = p[f"output_{level}"]
    np.testing.assert_allclose(np.asarray(out[level]),
                               numpy_conv(m, o["kernel"], o["bias"]),
                               rtol=1e-4, atol=1e-4)
  # Biases start at zero; kernels have variance 1 / fan_in.
  assert not np.any(p["output_p2"]["bias"])
  assert np.var(p["output_p2"]["kernel"]) == pytest.approx(1 / (9 * 8),
                                                           rel=0.25)


def test_top_down_path_carries_stage4_to_p2():
  rng = np.random.default_rng(1)
  feats = stage_dict(rng, 80)            # grids 20, 10, 5, 3
  module = fpn.FPN(channels=8)
  params = module.init(jax.random.PRNGKey(0), feats)
  apply = jax.jit(module.apply)
  base = apply(params, feats)
  # Perturb one stage4 cell: p2 must change exactly where that cell reaches
  # through three nearest upsamplings (3 -> 5 -> 10 -> 20: rows 0..7) and the
  # 3x3 output conv (one more row/column).
  bumped = dict(feats, stage4=feats["stage4"].copy())
  bumped["stage4"][:, 0, 0] += 10.0
  diff = np.abs(np.asarray(apply(params, bumped)["p2"] - base["p2"])).max(
      axis=(0, 3))
  reach = np.zeros((20, 20), bool)
  reach[:9, :9] = True
  assert (diff[reach] > 1e-3).all()
  np.testing.assert_array_equal(diff[~reach], 0.0)
  # The pathway is top-down only: stage1 does not reach p5.
  low = dict(feats, stage1=feats["stage1"] + 10.0)
  np.testing.assert_array_equal(np.asarray(apply(params, low)["p5"]),
                                np.asarray(base["p5"]))
  assert np.abs(np.asarray(apply(params, low)["p2"] - base["p2"])).min() > 0


@pytest.mark.parametrize("levels", [fpn.LEVELS, ("p2",), ("p3", "p5")])
def test_parameter_count(levels):
  ch = 16
  feats = jax.tree.map(jnp.asarray, stage_dict(np.random.default_rng(2), 80))
  variables = jax.eval_shape(
      fpn.FPN(channels=ch, levels=levels).init, jax.random.PRNGKey(0), feats)
  count = sum(x.size for x in jax.tree.leaves(variables))
  assert set(variables) == {"params"}               # no norm statistics
  # Laterals from the finest level asked for up to stage4, 1x1 conv + bias;
  # one 3x3 conv + bias per output level.
  first = min(fpn.LEVELS.index(level) for level in levels)
  want = (sum((c + 1) * ch for c in CHANNELS[first:])
          + len(levels) * (3 * 3 * ch + 1) * ch)
  assert count == want == fpn.num_params(CHANNELS, ch, levels)
  if levels == fpn.LEVELS:
    assert count == (9 + 17 + 33 + 65) * 16 + 4 * 145 * 16   # = 11264


def test_bad_levels_fail_loudly():
  feats = stage_dict(np.random.default_rng(3), 80)
  with pytest.raises(ValueError, match="p6"):
    fpn.FPN(channels=4, levels=("p2", "p6")).init(jax.random.PRNGKey(0), feats)
