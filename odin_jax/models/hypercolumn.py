"""The hierarchical-grouping network: ResNet + hypercolumn embedding head.

Zhang & Maire 2020 (§4.2): the outputs of ResNet's res3 and res4 blocks
('stage2', stride 8, and 'stage3', stride 16, in resnet.py's naming where
stage1..stage4 = res2..res5) each go through one 3x3 conv-BN-ReLU to 256
channels, are bilinearly upsampled to stride 4 (the 'stage1' grid),
concatenated, and a 3x3 convolution maps them to a 32-d per-pixel
embedding F. The backbone's stride is unchanged and res5 is not used (its
parameters exist, so checkpoints export like every other method's, but it
gets no gradient; under jit its forward is dead code and never runs).

The network is the same ResNet module as DetCon/Odin's (`resnet.ResNet`,
named 'backbone'), so `python -m odin_jax.export` and the evaluation suite
read it unchanged. Shapes, for images [B, S, S, 3] in [0, 1]:
  feature_maps(images) -> resnet maps + 'embedding' [B, S/4, S/4, D]
  embedding(images)    -> float32 [B, S/4, S/4, D]   (D = embedding_dim, 32)
  __call__(images, ...) -> {'embedding': ...}  (the train state's init)
S/4 follows torchvision's rounding (the 'stage1' grid: 224 -> 56, 96 -> 24,
80 -> 20).
"""

from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from odin_jax.models import resnet

# res3, res4 (the paper's hypercolumn inputs) in resnet.py's names.
DEFAULT_STAGES = ("stage2", "stage3")


class HypercolumnHead(nn.Module):
  """Per-stage 3x3 conv-BN-ReLU -> upsample to the finest grid -> concat ->
  3x3 conv to `embedding_dim` channels.

  Inputs: maps, a dict with the `stages` feature maps [B, h_i, w_i, C_i];
  out_hw, the (h, w) output grid. Returns float32 [B, h, w, embedding_dim].
  """
  channels: int = 256
  embedding_dim: int = 32
  stages: Sequence[str] = DEFAULT_STAGES
  bn_momentum: float = 0.9
  bn_epsilon: float = 1e-5
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, maps, out_hw, train: bool = True):
    columns = []
    for name in self.stages:
      x = resnet.conv(self.channels, 3, dtype=self.dtype,
                      name=f"{name}_conv")(maps[name])
      x = nn.BatchNorm(use_running_average=not train,
                       momentum=self.bn_momentum, epsilon=self.bn_epsilon,
                       dtype=self.dtype, name=f"{name}_bn")(x)
      x = nn.relu(x)
      # Bilinear with half-pixel centres (PyTorch align_corners=False).
      x = jax.image.resize(x, (x.shape[0], *out_hw, x.shape[-1]), "bilinear")
      columns.append(x)
    x = jnp.concatenate(columns, axis=-1)
    x = nn.Conv(self.embedding_dim, (3, 3), padding=((1, 1), (1, 1)),
                dtype=self.dtype, name="embedding_conv")(x)
    return x.astype(jnp.float32)


class HierGroupNetwork(nn.Module):
  """ResNet backbone + HypercolumnHead (see the module docstring)."""
  depth: int = 50
  width: float = 1.0
  head_channels: int = 256
  embedding_dim: int = 32
  stages: Sequence[str] = DEFAULT_STAGES
  zero_init_residual: bool = False
  dtype: Any = jnp.float32
  remat: str = "none"

  def setup(self):
    self.backbone = resnet.ResNet(depth=self.depth, width=self.width,
                                  zero_init_residual=self.zero_init_residual,
                                  dtype=self.dtype, remat=self.remat)
    self.head = HypercolumnHead(channels=self.head_channels,
                                embedding_dim=self.embedding_dim,
                                stages=tuple(self.stages), dtype=self.dtype)

  def feature_maps(self, images, train: bool = True) -> dict:
    """ResNet stage maps plus 'embedding' (stride 4), for the evaluations."""
    maps = self.backbone(images, train=train)
    grid = maps["stage1"].shape[1:3]          # stride 4
    return {**maps, "embedding": self.head(maps, grid, train=train)}

  def embedding(self, images, train: bool = True):
    """Per-pixel embedding F: [B, S, S, 3] -> float32 [B, S/4, S/4, D]."""
    return self.feature_maps(images, train)["embedding"]

  # The evaluation's feature 'projection' (and Odin-style tools) read the
  # dense output of the network's head: here that is the embedding.
  dense_projection = embedding

  def __call__(self, images, cells=None, ids=None, train: bool = True,
               with_predictor: bool = True):
    """The step's init signature; cells / ids are not used (pixel-level)."""
    del cells, ids, with_predictor
    return {"embedding": self.embedding(images, train)}


def from_config(config) -> HierGroupNetwork:
  """The network of config.model + config.hiergroup."""
  m, h = config.model, config.hiergroup
  return HierGroupNetwork(
      depth=m.depth, width=m.width, head_channels=h.head_channels,
      embedding_dim=h.embedding_dim, stages=tuple(h.stages),
      zero_init_residual=m.zero_init_residual, dtype=jnp.dtype(m.dtype),
      remat=m.get("remat", "none"))
