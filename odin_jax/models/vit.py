"""Vision Transformer (Dosovitskiy et al. 2021) in Flax Linen, as a dense backbone.

DetCon, Odin and R2O need a feature *map*: the ViT returns its patch-token
grid after the final LayerNorm as 'tokens' [B, H/p, W/p, D], which
`objects.pool_features` mask-pools like a ResNet stage, and Odin's discovery
network projects and clusters token by token. The optional class token takes
part in attention but is not part of the map (DetCon pools masks, not CLS).
It also returns 'keys' [B, H/p, W/p, D]: the key projections of the last
block's attention (heads concatenated), the features the instance-
segmentation analysis paper clusters (§3); unused outputs cost nothing
under jit (XLA drops them).

Layout (timm's `VisionTransformer`, so weights export 1:1, see
`timm_state_dict`): patch embedding Conv(p x p, stride p) -> prepend CLS ->
add learnt position embeddings -> `depth` pre-norm blocks
(x + Attn(LN(x)), x + MLP(LN(x)), LayerNorm eps 1e-6, exact-erf GELU, one
fused qkv Linear) -> final LayerNorm. Images [B, H, W, 3] in [0, 1] are
normalised with the ImageNet mean/std inside the model, as in resnet.py.

Resolution. The position embeddings are learnt for a `pos_size` x `pos_size`
input ((pos_size/p)^2 patch positions + 1 for CLS) and resampled bicubically
to the token grid of any other input, so one network trains at 224 and
evaluates object discovery at 448 (Odin App. A.4: ViT-B/8 -> 56x56 tokens).
Inputs whose side is not a multiple of p lose their last H mod p rows / W
mod p columns (a VALID patch conv, timm's behaviour without dynamic padding).

Precision: `dtype` is the compute dtype; parameters are float32, the input
normalisation and the position-embedding resampling are float32, LayerNorm
statistics and the attention softmax are computed in float32.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from odin_jax.models import resnet

# name -> (patch_size, depth, width, num_heads); MLP ratio 4 throughout.
PRESETS = {
    "S/16": (16, 12, 384, 6),
    "B/16": (16, 12, 768, 12),
    "B/8": (8, 12, 768, 12),
}
REMAT_MODES = resnet.REMAT_MODES

# timm: trunc_normal(std=.02) for every Linear weight, zero biases.
_dense_init = nn.initializers.truncated_normal(0.02)


def token_grid(image_size: int, patch_size: int) -> int:
  """Side of the token grid for a square input (VALID patch conv)."""
  return image_size // patch_size


class MlpBlock(nn.Module):
  """Linear(hidden) -> GELU (exact, as torch's nn.GELU) -> Linear(in).

  [..., D] -> [..., D]. Parameter names 'fc1', 'fc2' follow timm's Mlp.
  """
  hidden: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    dim = x.shape[-1]
    x = nn.Dense(self.hidden, dtype=self.dtype, kernel_init=_dense_init,
                 name="fc1")(x)
    x = nn.gelu(x, approximate=False)
    return nn.Dense(dim, dtype=self.dtype, kernel_init=_dense_init,
                    name="fc2")(x)


def split_heads(qkv, num_heads: int):
  """Fused projections [..., N, 3·D] -> q, k, v each [..., N, heads, D/heads].

  The 3·D outputs are ordered (q|k|v, head, channel), timm's
  `qkv(x).reshape(B, N, 3, heads, head_dim)`, so the fused kernel exports
  as one [3·D, D] matrix.
  """
  *lead, n, three_d = qkv.shape
  head_dim = three_d // (3 * num_heads)
  qkv = qkv.reshape(*lead, n, 3, num_heads, head_dim)
  return qkv[..., 0, :, :], qkv[..., 1, :, :], qkv[..., 2, :, :]


class SelfAttention(nn.Module):
  """Global multi-head self-attention, [B, N, D] -> [B, N, D].

  `jax.nn.dot_product_attention` (XLA everywhere; it may pick a fused
  kernel on GPU): the softmax runs in float32 whatever the compute dtype.
  """
  num_heads: int
  dtype: Any = jnp.float32
  with_keys: bool = False   # also return the keys k [B, N, D] (heads joined)

  @nn.compact
  def __call__(self, x):
    dim = x.shape[-1]
    if dim % self.num_heads:
      raise ValueError(f"ViT width {dim} is not divisible by num_heads="
                       f"{self.num_heads}.")
    qkv = nn.Dense(3 * dim, dtype=self.dtype, kernel_init=_dense_init,
                   name="qkv")(x)
    q, k, v = split_heads(qkv, self.num_heads)
    out = jax.nn.dot_product_attention(q, k, v)          # [B, N, heads, hd]
    out = out.reshape(*out.shape[:-2], dim)
    out = nn.Dense(dim, dtype=self.dtype, kernel_init=_dense_init,
                   name="proj")(out)
    if self.with_keys:
      return out, k.reshape(*k.shape[:-2], dim)
    return out


class EncoderBlock(nn.Module):
  """Pre-norm transformer block: x + Attn(LN(x)); x + MLP(LN(x)).

  with_keys: return (x, the attention's keys [B, N, D]) instead of x.
  """
  num_heads: int
  mlp_ratio: float = 4.0
  dtype: Any = jnp.float32
  with_keys: bool = False

  @nn.compact
  def __call__(self, x):
    dim = x.shape[-1]
    norm = lambda name: nn.LayerNorm(epsilon=1e-6, dtype=self.dtype,
                                     name=name)
    attn = SelfAttention(self.num_heads, self.dtype, self.with_keys,
                         name="attn")(norm("norm1")(x))
    attn, keys = attn if self.with_keys else (attn, None)
    x = x + attn
    x = x + MlpBlock(int(dim * self.mlp_ratio), self.dtype, name="mlp")(
        norm("norm2")(x))
    return (x, keys) if self.with_keys else x


def resample_pos_embed(pos, old_grid: tuple[int, int],
                       new_grid: tuple[int, int]):
  """Bicubic resize of patch position embeddings [1, h0·w0, D] -> [1, h·w, D].

  Done in float32 on the (h0, w0) grid: the embeddings of neighbouring
  patches are interpolated, as timm's `resample_abs_pos_embed` does.
  """
  if tuple(old_grid) == tuple(new_grid):
    return pos
  d = pos.shape[-1]
  grid = pos.reshape(1, *old_grid, d).astype(jnp.float32)
  grid = jax.image.resize(grid, (1, *new_grid, d), "bicubic", antialias=False)
  return grid.reshape(1, new_grid[0] * new_grid[1], d)


class ViT(nn.Module):
  """ViT backbone: images [B, H, W, 3] in [0, 1] -> {'tokens', 'keys'}.

  Both [B, H/p, W/p, D]: the final LayerNorm's patch tokens, and the last
  block's attention keys (module docstring).

  Attributes:
    patch_size: p (16 for S/16 and B/16, 8 for B/8).
    depth: number of transformer blocks (12 for S and B).
    width: token dimension D (384 for S, 768 for B).
    num_heads: attention heads (6 for S, 12 for B); must divide width.
    mlp_ratio: MLP hidden width / D (4).
    pos_size: input side the position embeddings are learnt for (the
      training view side); other sizes resample them (module docstring).
    cls_token: prepend a learnt class token (timm's default layout).
    dtype: computation dtype (parameters stay float32).
    remat: 'none', or 'blocks' / 'stages' (a ViT has no stages: both
      recompute each block's activations in the backward pass).
  `train` is accepted for the ResNet's call signature; a ViT has no
  BatchNorm or dropout here, so it changes nothing.
  """
  patch_size: int = 16
  depth: int = 12
  width: int = 768
  num_heads: int = 12
  mlp_ratio: float = 4.0
  pos_size: int = 224
  cls_token: bool = True
  dtype: Any = jnp.float32
  remat: str = "none"

  @nn.compact
  def __call__(self, images, train: bool = True) -> dict[str, jnp.ndarray]:
    del train
    if self.remat not in REMAT_MODES:
      raise ValueError(f"ViT remat must be one of {REMAT_MODES}, got "
                       f"{self.remat!r}.")
    p = self.patch_size
    if images.shape[1] < p or images.shape[2] < p:
      raise ValueError(f"ViT input {images.shape[1:3]} is smaller than one "
                       f"{p}x{p} patch.")
    mean = jnp.asarray(resnet.IMAGENET_MEAN, jnp.float32)
    std = jnp.asarray(resnet.IMAGENET_STD, jnp.float32)
    x = ((images.astype(jnp.float32) - mean) / std).astype(self.dtype)
    x = nn.Conv(self.width, (p, p), (p, p), padding="VALID", dtype=self.dtype,
                kernel_init=nn.initializers.lecun_normal(),
                name="patch_embed")(x)
    b, h, w, d = x.shape
    x = x.reshape(b, h * w, d)

    old = (token_grid(self.pos_size, p),) * 2
    prefix = int(self.cls_token)
    pos = self.param("pos_embed", nn.initializers.normal(0.02),
                     (1, prefix + old[0] * old[1], d))
    patch_pos = resample_pos_embed(pos[:, prefix:], old, (h, w))
    x = x + patch_pos.astype(self.dtype)
    if self.cls_token:
      cls = self.param("cls_token", nn.initializers.zeros, (1, 1, d))
      cls = (cls + pos[:, :1]).astype(self.dtype)
      x = jnp.concatenate([jnp.broadcast_to(cls, (b, 1, d)), x], axis=1)

    block = nn.remat(EncoderBlock) if self.remat != "none" else EncoderBlock
    for i in range(self.depth):
      last = i == self.depth - 1
      x = block(self.num_heads, self.mlp_ratio, self.dtype, with_keys=last,
                name=f"block{i}")(x)
      if last:
        x, keys = x
    x = nn.LayerNorm(epsilon=1e-6, dtype=self.dtype, name="norm")(x)
    return {"tokens": x[:, prefix:].reshape(b, h, w, d),
            "keys": keys[:, prefix:].reshape(b, h, w, d)}


def num_params(patch_size: int, depth: int, width: int, mlp_ratio: float = 4.0,
               pos_size: int = 224, cls_token: bool = True) -> int:
  """Parameters of `ViT` (= timm's model with num_classes=0), by formula.

  patch conv 3p²D + D; CLS D; position (1 + (s/p)²)·D; per block two
  LayerNorms 4D, qkv 3D² + 3D, proj D² + D, MLP 2·D·rD + rD + D; final
  LayerNorm 2D.
  """
  d, hidden = width, int(width * mlp_ratio)
  tokens = token_grid(pos_size, patch_size) ** 2 + int(cls_token)
  block = 4 * d + (3 * d * d + 3 * d) + (d * d + d) + (2 * d * hidden +
                                                       hidden + d)
  return (3 * patch_size**2 * d + d + int(cls_token) * d + tokens * d +
          depth * block + 2 * d)


def _linear(prefix: str, dense: dict) -> dict[str, np.ndarray]:
  """Flax Dense {'kernel' [in, out], 'bias'} -> torch Linear [out, in]."""
  out = {f"{prefix}.weight": np.asarray(dense["kernel"]).T}
  if "bias" in dense:
    out[f"{prefix}.bias"] = np.asarray(dense["bias"])
  return out


def _layer_norm(prefix: str, norm: dict) -> dict[str, np.ndarray]:
  return {f"{prefix}.weight": np.asarray(norm["scale"]),
          f"{prefix}.bias": np.asarray(norm["bias"])}


def _conv(prefix: str, conv: dict) -> dict[str, np.ndarray]:
  """Flax Conv kernel HWIO -> torch Conv2d OIHW."""
  return {f"{prefix}.weight": np.asarray(conv["kernel"]).transpose(3, 2, 0, 1),
          f"{prefix}.bias": np.asarray(conv["bias"])}


def timm_state_dict(backbone_params) -> dict[str, np.ndarray]:
  """ViT parameters -> a state dict in timm's `VisionTransformer` layout.

  `backbone_params` is the ViT's parameter tree (`params['backbone']` of an
  `ObjectNetwork`). Keys and shapes (D width, p patch, L depth, N tokens
  of the learnt grid; e.g. vit_base_patch16_224: D 768, p 16, N 196):
    cls_token                  [1, 1, D]           (when the model has one)
    pos_embed                  [1, 1 + N, D]       (CLS position first)
    patch_embed.proj.weight    [D, 3, p, p]        (torch OIHW)
    patch_embed.proj.bias      [D]
    blocks.{i}.norm1.weight / .bias                 [D]
    blocks.{i}.attn.qkv.weight [3D, D]  (rows: q | k | v, head-major)
    blocks.{i}.attn.qkv.bias   [3D]
    blocks.{i}.attn.proj.weight [D, D], .bias [D]
    blocks.{i}.norm2.weight / .bias                 [D]
    blocks.{i}.mlp.fc1.weight  [4D, D], .bias [4D]
    blocks.{i}.mlp.fc2.weight  [D, 4D], .bias [D]
    norm.weight / norm.bias    [D]
  i = 0..L-1. There is no classifier: create the timm model with
  num_classes=0 and load strictly, e.g.
    m = timm.create_model('vit_base_patch16_224', num_classes=0)
    m.load_state_dict({k: torch.from_numpy(v) for k, v in sd.items()})
  For another input size pass img_size=... (timm then expects a resampled
  pos_embed; `timm.layers.resample_abs_pos_embed` does it). The network
  expects images normalised with the ImageNet mean/std (timm's
  IMAGENET_DEFAULT_MEAN/STD), not the 0.5/0.5 of some timm ViT weights.
  """
  params = jax.device_get(backbone_params)
  out = {}
  if "cls_token" in params:
    out["cls_token"] = np.asarray(params["cls_token"])
  out["pos_embed"] = np.asarray(params["pos_embed"])
  out.update(_conv("patch_embed.proj", params["patch_embed"]))
  depth = sum(1 for k in params if k.startswith("block"))
  for i in range(depth):
    blk, pre = params[f"block{i}"], f"blocks.{i}"
    out.update(_layer_norm(f"{pre}.norm1", blk["norm1"]))
    out.update(_linear(f"{pre}.attn.qkv", blk["attn"]["qkv"]))
    out.update(_linear(f"{pre}.attn.proj", blk["attn"]["proj"]))
    out.update(_layer_norm(f"{pre}.norm2", blk["norm2"]))
    out.update(_linear(f"{pre}.mlp.fc1", blk["mlp"]["fc1"]))
    out.update(_linear(f"{pre}.mlp.fc2", blk["mlp"]["fc2"]))
  out.update(_layer_norm("norm", params["norm"]))
  return {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in out.items()}
