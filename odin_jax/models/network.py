"""Projection / prediction MLPs and the network that ties them to a backbone.

The same module definition serves the online, target and (for Odin) discovery
networks: they differ only by their parameter pytrees, which makes EMA
updates, copies and checkpoints plain `jax.tree.map`s.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from odin_jax import objects
from odin_jax.models import fpn as fpn_lib
from odin_jax.models import resnet
from odin_jax.models import swin
from odin_jax.models import vit


class MLP(nn.Module):
  """Linear(hidden) -> BatchNorm -> ReLU -> Linear(out), as in BYOL/DetCon.

  [N, D] -> [N, out]. BatchNorm statistics are over all N rows, i.e. over
  every (image, mask) pair of the global batch when run under `jax.jit`.
  """
  hidden: int = 4096
  out: int = 256
  bn_momentum: float = 0.9
  bn_epsilon: float = 1e-5
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool = True):
    x = nn.Dense(self.hidden, dtype=self.dtype)(x)
    x = nn.BatchNorm(use_running_average=not train, momentum=self.bn_momentum,
                     epsilon=self.bn_epsilon, dtype=self.dtype)(x)
    x = nn.relu(x)
    return nn.Dense(self.out, dtype=self.dtype)(x)


class ObjectNetwork(nn.Module):
  """Backbone -> mask-pooled hidden vectors -> projector [-> predictor].

  Inputs:
    images: float [B, S, S, 3] in [0, 1].
    cells:  int [B, h, w] segment id of each cell of the feature grid
            (`objects.downsample_segments`).
    ids:    int [B, M] the sampled segment ids to pool.
  Returns dict:
    'hidden'     [B, M, C] mask-pooled backbone features h_m
    'projection' [B, M, P] g(h_m)
    'prediction' [B, M, P] q(g(h_m)) when with_predictor, else == projection.
  """
  depth: int = 50
  width: float = 1.0
  projector_hidden: int = 4096
  projector_dim: int = 256
  predictor_hidden: int = 4096   # 0: this network has no predictor
  feature_stage: str = "stage4"
  fpn_channels: int = 0          # > 0: FPN on stages 1-4 ('p2'..'p5' maps)
  zero_init_residual: bool = False
  dtype: Any = jnp.float32
  remat: str = "none"            # backbone rematerialisation (resnet.py)
  output_stride: int = 32        # ResNet: 16 / 8 dilate stage4 / stages 3-4
  # 'resnet' (depth, width above) | 'vit' | 'swin': then backbone_options
  # are the vit.ViT / swin.Swin fields as ((name, value), ...) pairs.
  backbone_kind: str = "resnet"
  backbone_options: tuple = ()

  def setup(self):
    if self.backbone_kind == "vit":
      self.backbone = vit.ViT(**dict(self.backbone_options), dtype=self.dtype,
                              remat=self.remat)
    elif self.backbone_kind == "swin":
      self.backbone = swin.Swin(**dict(self.backbone_options),
                                dtype=self.dtype, remat=self.remat)
    else:
      self.backbone = resnet.ResNet(depth=self.depth, width=self.width,
                                    zero_init_residual=self.zero_init_residual,
                                    dtype=self.dtype, remat=self.remat,
                                    output_stride=self.output_stride)
    if self.fpn_channels:
      if self.output_stride != 32:
        raise ValueError("An FPN needs the ResNet's strides 4-32 (its levels "
                         "are 2x apart): model.output_stride must be 32 with "
                         f"fpn_channels > 0, got {self.output_stride}.")
      # Only the level that is used gets an output conv: the others would
      # be parameters that see weight decay and no gradient.
      levels = ((self.feature_stage,) if self.feature_stage in fpn_lib.LEVELS
                else fpn_lib.LEVELS)
      self.fpn = fpn_lib.FPN(channels=self.fpn_channels, levels=levels,
                             dtype=self.dtype)
    self.projector = MLP(self.projector_hidden, self.projector_dim,
                         dtype=self.dtype)
    if self.predictor_hidden:
      self.predictor = MLP(self.predictor_hidden, self.projector_dim,
                           dtype=self.dtype)

  def feature_maps(self, images, train: bool = True) -> dict:
    """ResNet stage maps, plus the FPN level(s) when the network has one."""
    maps = self.backbone(images, train=train)
    if self.fpn_channels:
      maps = {**maps, **self.fpn(maps)}
    return maps

  def dense_projection(self, images, train: bool = True):
    """g(h) at every cell of the hidden map: [B, S, S, 3] -> [B, h, w, P].

    Odin's discovery network applies the projector to each hidden vector of
    the map independently (then k-means segments the projections).
    """
    feature_map = self.feature_maps(images, train)[self.feature_stage]
    b, h, w, c = feature_map.shape
    z = self.projector(feature_map.reshape(b * h * w, c), train)
    return z.reshape(b, h, w, -1).astype(jnp.float32)

  def __call__(self, images, cells, ids, train: bool = True,
               with_predictor: bool = True):
    feature_map = self.feature_maps(images, train)[self.feature_stage]
    hidden = objects.pool_features(feature_map.astype(jnp.float32), cells, ids)
    batch, num_masks, channels = hidden.shape
    z = self.projector(hidden.reshape(batch * num_masks, channels), train)
    p = z
    if self.predictor_hidden and with_predictor:
      p = self.predictor(z, train)
    # Losses are computed in float32 whatever the compute dtype.
    z = z.reshape(batch, num_masks, -1).astype(jnp.float32)
    p = p.reshape(batch, num_masks, -1).astype(jnp.float32)
    return {"hidden": hidden, "projection": z, "prediction": p}


def from_config(config) -> ObjectNetwork:
  """Builds the ObjectNetwork described by `config.model` (the network of
  every method but hierarchical grouping's: methods.get(config).network()
  gives the one a config trains)."""
  m = config.model
  return ObjectNetwork(
      depth=m.depth, width=m.width, projector_hidden=m.projector_hidden,
      projector_dim=m.projector_dim, predictor_hidden=m.predictor_hidden,
      feature_stage=m.feature_stage, fpn_channels=m.fpn_channels,
      zero_init_residual=m.zero_init_residual,
      dtype=jnp.dtype(m.dtype), remat=m.get("remat", "none"),
      output_stride=m.get("output_stride", 32),
      **transformer_fields(config))


def transformer_fields(config) -> dict:
  """ObjectNetwork's backbone_kind / backbone_options for config.model."""
  m = config.model
  kind = m.get("backbone", "resnet")
  if kind == "vit":
    v = m.vit
    options = dict(patch_size=v.patch_size, depth=v.depth, width=v.width,
                   num_heads=v.num_heads, mlp_ratio=v.mlp_ratio,
                   pos_size=v.pos_size or config.image_size,
                   cls_token=v.cls_token)
  elif kind == "swin":
    s = m.swin
    options = dict(patch_size=s.patch_size, embed_dim=s.embed_dim,
                   depths=tuple(s.depths), num_heads=tuple(s.num_heads),
                   window=s.window, mlp_ratio=s.mlp_ratio)
  else:
    return {}
  return {"backbone_kind": kind, "backbone_options": tuple(options.items())}


def feature_grid(config, image_size: int | None = None) -> tuple[int, int]:
  """Side of the hidden map h (7x7 for R50 stage4 at 224, 56x56 for 'p2',
  S/p for ViT tokens, e.g. 28x28 for B/8 at 224)."""
  stage = config.model.feature_stage
  size = image_size or config.image_size
  backbone = config.model.get("backbone", "resnet")
  if backbone == "vit":      # 'tokens': one cell per patch
    return (vit.token_grid(size, config.model.vit.patch_size),) * 2
  stage = fpn_lib.LEVEL_STAGE.get(stage, stage)
  if backbone == "swin":
    side = swin.stage_grid(size, stage, config.model.swin.patch_size)
  else:
    side = resnet.stage_grid(size, stage,
                             config.model.get("output_stride", 32))
  return side, side
