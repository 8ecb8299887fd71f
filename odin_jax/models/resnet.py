"""ResNet v1 (torchvision layout) in Flax Linen, returning every stage's features.

Why not the flax example ResNet: it pads with 'SAME', which for stride-2
convolutions on even inputs pads (0, 1) while PyTorch pads (1, 1). Weights
exported to torchvision then see shifted inputs, which is known to cost
several points of accuracy after conversion. Here every padding is explicit
and identical to torchvision's (stem 7x7/2 padded 3, 3x3 convs padded 1,
max-pool 3x3/2 padded 1 with -inf), and the stride of a bottleneck sits on
its 3x3 conv ("ResNet v1.5", as torchvision and the DetCon/BYOL code use).

Shapes: images [B, H, W, 3] in [0, 1] (normalised with the ImageNet mean/std
inside the model) -> dict of feature maps
  'stem'   [B, H/4,  W/4,  64w]
  'stage1' [B, H/4,  W/4,  64w·e]
  'stage2' [B, H/8,  W/8,  128w·e]
  'stage3' [B, H/16, W/16, 256w·e]
  'stage4' [B, H/32, W/32, 512w·e]
with w the width multiplier and e the block expansion (1 basic, 4 bottleneck);
sizes round up (torchvision arithmetic), e.g. 80 px -> stage4 3x3.

Output stride: `output_stride` 16 (or 8) keeps stage4 (and stage3) at the
resolution of stage3 (stage2), DeepLab-style: the stage's strided conv runs
at stride 1 and every 3x3 conv after it in the stage is dilated x2 (x4).
The parameters are the same as at stride 32, and the dilated maps sampled
at every 2nd (4th) cell equal the stride-32 maps exactly (at inference; in
training BatchNorm sees more cells). It is for small images, where the
stride-32 map is tiny: 96-px views give stage4 3x3 at 32 and 6x6 at 16
(the paper's 224 px give 7x7). No preset uses it.

Precision: `dtype` is the compute dtype of convolutions and activations;
parameters are always created in float32 (param_dtype), BatchNorm computes
its batch statistics and keeps its running statistics in float32 (flax's
force_float32_reductions), and the input normalisation is done in float32
before the cast. Feature maps come out in `dtype`.

Memory: `remat` ('none' | 'blocks' | 'stages') recomputes the activations of
every residual block (or stage) in the backward pass instead of storing
them (`nn.remat`). It changes neither the parameter tree nor the results
(up to float rounding): parameter names are the same with or without it.
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

REMAT_MODES = ("none", "blocks", "stages")
OUTPUT_STRIDES = (8, 16, 32)

# depth -> (block kind, blocks per stage)
STAGE_SIZES = {
    18: ("basic", (2, 2, 2, 2)),
    34: ("basic", (3, 4, 6, 3)),
    50: ("bottleneck", (3, 4, 6, 3)),
    101: ("bottleneck", (3, 4, 23, 3)),
    152: ("bottleneck", (3, 8, 36, 3)),
    200: ("bottleneck", (3, 24, 36, 3)),
}

ModuleDef = Any


def conv(features: int, kernel: int, stride: int = 1, *, dilation: int = 1,
         dtype=jnp.float32, name: str | None = None) -> nn.Conv:
  """A bias-free conv with torchvision's symmetric padding of
  dilation * (kernel // 2) (the output keeps the input's size at stride 1)."""
  pad = dilation * (kernel // 2)
  return nn.Conv(features, (kernel, kernel), (stride, stride),
                 padding=((pad, pad), (pad, pad)),
                 kernel_dilation=(dilation, dilation), use_bias=False,
                 dtype=dtype, kernel_init=nn.initializers.variance_scaling(
                     2.0, "fan_out", "normal"), name=name)


class BasicBlock(nn.Module):
  """Two 3x3 convs (ResNet-18/34). Output channels = features.

  dilation: of the first 3x3 conv (the strided one); dilation_after: of the
  convs after it (they differ in the first block of a dilated stage).
  """
  features: int
  stride: int
  norm: ModuleDef
  dtype: Any = jnp.float32
  dilation: int = 1
  dilation_after: int = 1
  expansion = 1

  @nn.compact
  def __call__(self, x):
    residual = x
    y = conv(self.features, 3, self.stride, dilation=self.dilation,
             dtype=self.dtype)(x)
    y = nn.relu(self.norm()(y))
    y = conv(self.features, 3, dilation=self.dilation_after,
             dtype=self.dtype)(y)
    y = self.norm(name="bn_last")(y)
    if residual.shape != y.shape:
      residual = conv(self.features, 1, self.stride, dtype=self.dtype,
                      name="proj_conv")(residual)
      residual = self.norm(name="proj_bn")(residual)
    return nn.relu(residual + y)


class BottleneckBlock(nn.Module):
  """1x1 -> 3x3 (strided) -> 1x1 bottleneck. Output channels = 4·features.

  dilation: of the 3x3 conv (dilation_after is unused: only 1x1 convs
  follow it).
  """
  features: int
  stride: int
  norm: ModuleDef
  dtype: Any = jnp.float32
  dilation: int = 1
  dilation_after: int = 1
  expansion = 4

  @nn.compact
  def __call__(self, x):
    residual = x
    y = nn.relu(self.norm()(conv(self.features, 1, dtype=self.dtype)(x)))
    y = conv(self.features, 3, self.stride, dilation=self.dilation,
             dtype=self.dtype)(y)
    y = nn.relu(self.norm()(y))
    y = conv(self.features * 4, 1, dtype=self.dtype)(y)
    y = self.norm(name="bn_last")(y)
    if residual.shape != y.shape:
      residual = conv(self.features * 4, 1, self.stride, dtype=self.dtype,
                      name="proj_conv")(residual)
      residual = self.norm(name="proj_bn")(residual)
    return nn.relu(residual + y)


def max_pool_3x3_s2(x):
  """torchvision's MaxPool2d(3, 2, padding=1): pads with -inf, not zeros."""
  return nn.max_pool(x, (3, 3), (2, 2), padding=((1, 1), (1, 1)))


class ResNet(nn.Module):
  """ResNet v1 backbone. See the module docstring for shapes.

  Attributes:
    depth: one of 18, 34, 50, 101, 152, 200.
    width: channel multiplier (DetCon's ResNet-200 x2 uses 2); fractional
      widths (e.g. 0.25) make tiny test and demo networks.
    bn_momentum, bn_epsilon: BatchNorm settings (0.9 / 1e-5 as in the papers).
    zero_init_residual: zero the last BN scale of each block (Goyal et al.).
    dtype: computation dtype (parameters stay float32).
    remat: 'none', 'blocks' (keep only each residual block's input for the
      backward pass and recompute the rest) or 'stages' (keep only each
      stage's input: fewer saved activations, but the backward replays a
      whole stage at once, so that stage's activations are live together;
      for deep stages, e.g. ResNet-200's 36-block stage3, 'blocks' peaks
      lower). Both cost one extra forward pass of the backbone.
    output_stride: 32 (standard), 16 (stage4 dilated) or 8 (stages 3-4
      dilated); see the module docstring.
  """
  depth: int = 50
  width: float = 1.0
  bn_momentum: float = 0.9
  bn_epsilon: float = 1e-5
  zero_init_residual: bool = False
  dtype: Any = jnp.float32
  remat: str = "none"
  output_stride: int = 32

  @nn.compact
  def __call__(self, images, train: bool = True) -> dict[str, jnp.ndarray]:
    if self.depth not in STAGE_SIZES:
      raise ValueError(f"ResNet depth must be one of {sorted(STAGE_SIZES)}, "
                       f"got {self.depth}.")
    if self.output_stride not in OUTPUT_STRIDES:
      raise ValueError(f"ResNet output_stride must be one of {OUTPUT_STRIDES}"
                       f", got {self.output_stride!r}.")
    if self.remat not in REMAT_MODES:
      raise ValueError(f"ResNet remat must be one of {REMAT_MODES}, got "
                       f"{self.remat!r}.")
    kind, stage_sizes = STAGE_SIZES[self.depth]
    block_cls = BasicBlock if kind == "basic" else BottleneckBlock
    norm = functools.partial(
        nn.BatchNorm, use_running_average=not train,
        momentum=self.bn_momentum, epsilon=self.bn_epsilon, dtype=self.dtype)
    if self.zero_init_residual:
      last_norm_init = nn.initializers.zeros
    else:
      last_norm_init = nn.initializers.ones

    def block_norm(name=None):
      init = last_norm_init if name == "bn_last" else nn.initializers.ones
      return norm(name=name, scale_init=init)

    # Normalise in float32, then cast: a bfloat16 (x - mean) / std would add
    # a rounding error on top of the cast's.
    mean = jnp.asarray(IMAGENET_MEAN, jnp.float32)
    std = jnp.asarray(IMAGENET_STD, jnp.float32)
    x = ((images.astype(jnp.float32) - mean) / std).astype(self.dtype)

    def channels(c: int) -> int:
      return max(1, int(round(c * self.width)))

    feats = {}
    x = conv(channels(64), 7, 2, dtype=self.dtype, name="stem_conv")(x)
    x = nn.relu(norm(name="stem_bn")(x))
    x = max_pool_3x3_s2(x)
    feats["stem"] = x
    # nn.remat of a class keeps the module's name, and nn.remat of a
    # function of `self` creates the blocks in self's own scope: either way
    # the parameters are 'stage{i}_block{j}/...' exactly as without remat.
    block = nn.remat(block_cls) if self.remat == "blocks" else block_cls

    def stage(module, x, i: int, num_blocks: int):
      # `module` is self, or under nn.remat its clone bound to the lifted
      # scope: the blocks must be its children to be inside the transform.
      before, after = stage_dilations(i, self.output_stride)
      for j in range(num_blocks):
        strided = i > 0 and j == 0 and before == after
        x = block(channels(64 * 2**i), 2 if strided else 1, block_norm,
                  dtype=self.dtype, dilation=before if j == 0 else after,
                  dilation_after=after, parent=module,
                  name=f"stage{i + 1}_block{j + 1}")(x)
      return x

    if self.remat == "stages":
      # i and num_blocks are Python ints that shape the graph: static.
      stage = nn.remat(stage, static_argnums=(2, 3))
    for i, num_blocks in enumerate(stage_sizes):
      x = stage(self, x, i, num_blocks)
      feats[f"stage{i + 1}"] = x
    return feats


def feature_channels(depth: int, width: float) -> int:
  """Channels of 'stage4' for a given depth and width (2048 for R50 x1)."""
  kind, _ = STAGE_SIZES[depth]
  return max(1, int(round(512 * width))) * (1 if kind == "basic" else 4)


def conv_out_size(size: int, kernel: int, stride: int, pad: int) -> int:
  return (size + 2 * pad - kernel) // stride + 1


def stage_dilations(i: int, output_stride: int = 32) -> tuple[int, int]:
  """(dilation of stage i's first 3x3 conv, of its later 3x3 convs), i = 0..3.

  At output stride 32 every stage is (1, 1) and stages 1-3 stride by 2. A
  dilated stage (i >= 1 and 4 * 2**i > output_stride) does not stride: its
  first conv keeps the previous stage's dilation and the rest double it
  (torchvision's replace_stride_with_dilation, extended to basic blocks).
  """
  def dilation(stage: int) -> int:   # accumulated by stages 1..stage
    return max(1, 4 * 2**stage // output_stride)
  return (dilation(i - 1) if i > 0 else 1), dilation(i)


def stage_grid(image_size: int, stage: str = "stage4",
               output_stride: int = 32) -> int:
  """Side of the feature map of `stage` for a square input, torchvision rules."""
  s = conv_out_size(image_size, 7, 2, 3)     # stem conv
  s = conv_out_size(s, 3, 2, 1)              # max-pool -> 'stem' and 'stage1'
  order = ("stem", "stage1", "stage2", "stage3", "stage4")
  for i in range(1, order.index(stage)):     # stages 2-4 halve it unless
    before, after = stage_dilations(i, output_stride)   # dilated
    if before == after:
      s = conv_out_size(s, 3, 2, 1)
  return s


