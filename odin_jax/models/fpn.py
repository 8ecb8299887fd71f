"""Feature Pyramid Network (Lin et al. 2017) on ResNet stages, in Flax Linen.

Odin (Hénaff et al. 2022, §3.1 "Pretraining details") puts an FPN on the
ResNet and uses its highest-resolution output, stride 4 ('p2'), as the hidden
map h of the discovery and representation networks; the FPN is discarded for
transfer. The paper gives no further FPN details, so this follows the FPN
paper (and torchvision's / detectron2's default FPN):

  lateral_i = Conv1x1(stage_i)                 i = 1..4, `channels` out
  m_5 = lateral_4
  m_i = lateral_{i-1} + upsample(m_{i+1})      i = 4, 3, 2
  p_i = Conv3x3(m_i)                           i = 2..5

- No normalisation and no non-linearity in the FPN ("there are no
  non-linearities in these extra layers", FPN §3); convs have biases.
- Upsampling is nearest neighbour to the lateral's exact size, not a x2
  repeat: ResNet sizes round up (80 px -> 20, 10, 5, 3), so a coarser map
  is not always half the finer one. Output cell i takes input cell
  floor(i · in / out), torch's `F.interpolate(size=..., mode='nearest')`
  (torchvision's FPN); for out = 2·in this is exactly a x2 repeat.
- Weights: kaiming-uniform with a=1 (variance 1/fan_in), biases zero,
  torchvision's / detectron2's FPN init.
- No extra 'p6' (max-pool) level: only detectors use it.

Shapes: the ResNet dict ('stage1' [B, H/4, W/4, C1] ... 'stage4'
[B, H/32, W/32, C4]) -> {'p2': [B, H/4, W/4, channels], 'p3': [B, H/8, ...],
'p4': [B, H/16, ...], 'p5': [B, H/32, W/32, channels]} (the levels asked for).
"""

from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax.numpy as jnp

from odin_jax import numerics
from odin_jax.models import resnet

LEVELS = ("p2", "p3", "p4", "p5")
# Each FPN level has the grid of the ResNet stage feeding its lateral.
LEVEL_STAGE = {"p2": "stage1", "p3": "stage2", "p4": "stage3", "p5": "stage4"}

# torch's kaiming_uniform_(a=1): uniform with variance 1 / fan_in.
_fpn_init = nn.initializers.variance_scaling(1.0, "fan_in", "uniform")


def upsample_nearest(x, size: tuple[int, int]):
  """Nearest-neighbour resize [B, h, w, C] -> [B, H, W, C] (torch's rule).

  Output row i reads input row floor(i · h / H) (columns likewise), i.e.
  `torch.nn.functional.interpolate(x, size=(H, W), mode='nearest')`.
  """
  return numerics.resize_nearest(x, size, centre=False, axes=(1, 2))


class FPN(nn.Module):
  """Top-down feature pyramid over ResNet 'stage1'..'stage4' (see module doc).

  Attributes:
    channels: width of every lateral and output map (256 in FPN and Odin).
    levels: which of 'p2'..'p5' to return; only their 3x3 output convs are
      created (the top-down path always runs from 'stage4' down to the
      finest level asked for).
    dtype: computation dtype (parameters stay float32).
  Call: feats (dict with 'stage1'..'stage4' [B, h_i, w_i, C_i]; other keys
  ignored) -> dict level -> [B, h, w, channels] of that level's stage grid.
  """
  channels: int = 256
  levels: Sequence[str] = LEVELS
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, feats: dict) -> dict[str, jnp.ndarray]:
    unknown = set(self.levels) - set(LEVELS)
    if unknown or not self.levels:
      raise ValueError(f"FPN levels must be a non-empty subset of {LEVELS}, "
                       f"got {tuple(self.levels)}.")
    finest = min(LEVELS.index(level) for level in self.levels)
    out = {}
    merged = None
    for i in range(len(LEVELS) - 1, finest - 1, -1):     # p5, p4, ..., finest
      level = LEVELS[i]
      x = feats[LEVEL_STAGE[level]]
      lateral = nn.Conv(self.channels, (1, 1), dtype=self.dtype,
                        kernel_init=_fpn_init, name=f"lateral_{level}")(x)
      if merged is not None:
        lateral = lateral + upsample_nearest(merged, lateral.shape[1:3])
      merged = lateral
      if level in self.levels:
        out[level] = nn.Conv(self.channels, (3, 3), padding=((1, 1), (1, 1)),
                             dtype=self.dtype, kernel_init=_fpn_init,
                             name=f"output_{level}")(merged)
    return {level: out[level] for level in LEVELS if level in out}


def num_params(stage_channels: Sequence[int], channels: int,
               levels: Sequence[str] = LEVELS) -> int:
  """Parameters of an FPN on stages with `stage_channels` (C1..C4).

  Laterals for every stage from the finest level asked for up to stage4,
  (C_i + 1)·channels each; a 3x3 output conv per level asked for,
  (9·channels + 1)·channels each.
  """
  finest = min(LEVELS.index(level) for level in levels)
  lateral = sum((c + 1) * channels for c in stage_channels[finest:])
  return lateral + len(levels) * (9 * channels + 1) * channels


class BackboneWithFPN(nn.Module):
  """ResNet + FPN: images [B, H, W, 3] in [0, 1] -> the ResNet's dict
  ('stem', 'stage1'..'stage4') plus the FPN's 'p2'..'p5' (the levels asked
  for), 'p2' [B, H/4, W/4, fpn_channels] being Odin's hidden map h.

  Attributes are those of `resnet.ResNet` and `FPN`.
  """
  depth: int = 50
  width: float = 1.0
  fpn_channels: int = 256
  levels: Sequence[str] = LEVELS
  zero_init_residual: bool = False
  bn_momentum: float = 0.9
  bn_epsilon: float = 1e-5
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, images, train: bool = True) -> dict[str, jnp.ndarray]:
    feats = resnet.ResNet(depth=self.depth, width=self.width,
                          bn_momentum=self.bn_momentum,
                          bn_epsilon=self.bn_epsilon,
                          zero_init_residual=self.zero_init_residual,
                          dtype=self.dtype, name="backbone")(images, train)
    pyramid = FPN(self.fpn_channels, self.levels, dtype=self.dtype,
                  name="fpn")(feats)
    return {**feats, **pyramid}
