"""Swin Transformer (Liu et al. 2021) in Flax Linen, returning four stages.

Odin (Table 3) pretrains Swin-T / Swin-S with an FPN on their four stages,
exactly as on a ResNet: 'stage1'..'stage4' at strides 4 / 8 / 16 / 32 with
C, 2C, 4C, 8C channels (C = embed_dim: 96 for T and S), so
`fpn.FPN` and `ObjectNetwork` use it unchanged.

Layout (timm's `SwinTransformer`, so weights export 1:1, see
`timm_state_dict`): patch embedding Conv(4x4, stride 4) + LayerNorm ->
stage 1 blocks -> [patch merging (2x2 neighbourhood concatenated, LayerNorm,
Linear 4C -> 2C without bias) -> stage i blocks] for i = 2..4. Each block is
x + W-MSA(LN(x)); x + MLP(LN(x)) with window attention over
window_size x window_size windows, a learnt relative position bias per head
((2w-1)^2 table entries), and every second block's windows shifted by w/2
(cyclic roll + mask, so shifted windows do not mix wrapped-around tokens).
Each stage's output goes through its own LayerNorm before it is returned
(the Swin detection backbones' practice; 'stage4''s is timm's final norm).

Any input size: the image is padded to a multiple of the patch size,
odd maps are padded before patch merging (timm), and a map that is not a
multiple of the window is zero-padded at the bottom / right before
windowing; padded tokens are never attended to (masked as keys), so real
tokens see exactly the tokens of their (shifted) window. Along a side that
fits in one window there is no shift (timm: window = map then). Sizes
round up like the ResNet's: 80 px -> 20, 10, 5, 3; 224 px -> 56, 28, 14, 7.

Precision: `dtype` is the compute dtype; parameters, input normalisation,
LayerNorm statistics and the attention softmax stay float32.
"""

from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from odin_jax.models import resnet
from odin_jax.models import vit
from odin_jax.numerics import MASKED as _MASKED  # masks attention logits

# name -> (embed_dim, depths, num_heads); patch 4, window 7, MLP ratio 4.
PRESETS = {
    "T": (96, (2, 2, 6, 2), (3, 6, 12, 24)),
    "S": (96, (2, 2, 18, 2), (3, 6, 12, 24)),
}
STAGES = ("stage1", "stage2", "stage3", "stage4")
_dense_init = nn.initializers.truncated_normal(0.02)


def _ceil_div(a: int, b: int) -> int:
  return -(-a // b)


def stage_grid(image_size: int, stage: str = "stage4",
               patch_size: int = 4) -> int:
  """Side of `stage`'s map for a square input (pads round up)."""
  side = _ceil_div(image_size, patch_size)
  for _ in range(STAGES.index(stage)):
    side = _ceil_div(side, 2)
  return side


def relative_position_index(window: int) -> np.ndarray:
  """[w², w²] index into the (2w-1)² bias table for each (query, key) pair.

  Offset (dy, dx) = query - key, each in [-(w-1), w-1], maps to
  (dy + w - 1)·(2w - 1) + (dx + w - 1) (timm's / the Swin paper's index).
  """
  ys, xs = np.meshgrid(np.arange(window), np.arange(window), indexing="ij")
  ys, xs = ys.reshape(-1), xs.reshape(-1)
  dy = ys[:, None] - ys[None, :] + window - 1
  dx = xs[:, None] - xs[None, :] + window - 1
  return dy * (2 * window - 1) + dx


def _partition(x, window: int):
  """[B, H, W, C] (H, W multiples of window) -> [B, nW, w·w, C]."""
  b, h, w, c = x.shape
  x = x.reshape(b, h // window, window, w // window, window, c)
  return x.transpose(0, 1, 3, 2, 4, 5).reshape(b, -1, window * window, c)


def _merge(windows, window: int, h: int, w: int):
  """Inverse of `_partition`: [B, nW, w·w, C] -> [B, H, W, C]."""
  b, _, _, c = windows.shape
  x = windows.reshape(b, h // window, w // window, window, window, c)
  return x.transpose(0, 1, 3, 2, 4, 5).reshape(b, h, w, c)


def window_mask(height: int, width: int, window: int, shift: tuple[int, int]
                ) -> np.ndarray:
  """Which keys each query may attend to, per window: bool [nW, w², w²].

  The map (height x width real tokens) is padded to multiples of the window
  and rolled by -shift. A query sees a key of its window iff the key is a
  real token and both come from the same region of the rolled map: the
  rows [0, Hp - w), [Hp - w, Hp - s), [Hp - s, Hp) (columns likewise) are
  the regions, so tokens that wrapped around the border stay apart (Swin's
  SW-MSA mask). Without shift every window is one region.
  """
  hp, wp = _ceil_div(height, window) * window, _ceil_div(width, window) * window

  def regions(size: int, s: int) -> np.ndarray:
    r = np.zeros(size, np.int32)
    if s:
      r[size - window:size - s] = 1
      r[size - s:] = 2
    return r

  def real(size: int, n: int, s: int) -> np.ndarray:
    # Rolled position i holds the padded map's token (i + s) mod size.
    return (np.arange(size) + s) % size < n

  region = regions(hp, shift[0])[:, None] * 3 + regions(wp, shift[1])[None]
  valid = real(hp, height, shift[0])[:, None] & real(wp, width, shift[1])[None]
  region = _partition(region[None, :, :, None], window)[0, :, :, 0]   # [nW, N]
  valid = _partition(valid[None, :, :, None], window)[0, :, :, 0]
  return (region[:, :, None] == region[:, None, :]) & valid[:, None, :]


class WindowAttention(nn.Module):
  """(Shifted-)window multi-head self-attention: [B, H, W, C] -> same.

  shift: w/2 for the SW-MSA blocks, 0 for W-MSA; it is dropped along a side
  that fits in one window. Parameters: 'qkv' (fused, timm layout), 'proj',
  'relative_position_bias_table' [(2w-1)², heads].
  """
  num_heads: int
  window: int = 7
  shift: int = 0
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    b, h, w, c = x.shape
    ws = self.window
    if c % self.num_heads:
      raise ValueError(f"Swin width {c} is not divisible by num_heads="
                       f"{self.num_heads}.")
    shift = (self.shift if h > ws else 0, self.shift if w > ws else 0)
    hp, wp = _ceil_div(h, ws) * ws, _ceil_div(w, ws) * ws
    x = jnp.pad(x, ((0, 0), (0, hp - h), (0, wp - w), (0, 0)))
    x = jnp.roll(x, (-shift[0], -shift[1]), axis=(1, 2))
    windows = _partition(x, ws)                          # [B, nW, N, C]

    qkv = nn.Dense(3 * c, dtype=self.dtype, kernel_init=_dense_init,
                   name="qkv")(windows)
    q, k, v = vit.split_heads(qkv, self.num_heads)        # [B, nW, N, h, d]
    table = self.param("relative_position_bias_table", _dense_init,
                       ((2 * ws - 1) ** 2, self.num_heads))
    bias = table[relative_position_index(ws)]            # [N, N, heads]
    allowed = window_mask(h, w, ws, shift)               # [nW, N, N]
    bias = (jnp.transpose(bias, (2, 0, 1))[None] +       # [nW, heads, N, N]
            jnp.where(allowed, 0.0, _MASKED)[:, None])
    # Windows of all images as one batch axis: rank-4 dot products compile
    # (XLA:CPU) about twice as fast as rank-5 ones with two batch axes.
    nw, n = windows.shape[1], ws * ws
    q, k, v = (t.reshape(b * nw, n, self.num_heads, -1) for t in (q, k, v))
    scale = (c // self.num_heads) ** -0.5
    logits = jnp.einsum("bqhd,bkhd->bhqk", q * scale, k)
    logits = logits.reshape(b, nw, self.num_heads, n, n).astype(jnp.float32)
    weights = jax.nn.softmax(logits + bias, axis=-1).astype(self.dtype)
    out = jnp.einsum("bhqk,bkhd->bqhd",
                     weights.reshape(b * nw, self.num_heads, n, n), v)
    out = nn.Dense(c, dtype=self.dtype, kernel_init=_dense_init,
                   name="proj")(out.reshape(b, nw, n, c))

    out = _merge(out, ws, hp, wp)
    out = jnp.roll(out, shift, axis=(1, 2))
    return out[:, :h, :w]


class SwinBlock(nn.Module):
  """x + WindowAttention(LN(x)); x + MLP(LN(x)). [B, H, W, C] -> same."""
  num_heads: int
  window: int = 7
  shift: int = 0
  mlp_ratio: float = 4.0
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    c = x.shape[-1]
    norm = lambda name: nn.LayerNorm(epsilon=1e-5, dtype=self.dtype,
                                     name=name)
    x = x + WindowAttention(self.num_heads, self.window, self.shift,
                            self.dtype, name="attn")(norm("norm1")(x))
    return x + vit.MlpBlock(int(c * self.mlp_ratio), self.dtype, name="mlp")(
        norm("norm2")(x))


class PatchMerging(nn.Module):
  """2x2 neighbourhoods -> one token: [B, H, W, C] -> [B, ⌈H/2⌉, ⌈W/2⌉, 2C].

  Odd sides are zero-padded first. The four tokens are concatenated in
  timm's order (0,0), (1,0), (0,1), (1,1) as (row, column) offsets, then
  LayerNorm(4C) and a bias-free Linear(4C -> 2C).
  """
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    b, h, w, c = x.shape
    x = jnp.pad(x, ((0, 0), (0, h % 2), (0, w % 2), (0, 0)))
    x = jnp.concatenate([x[:, 0::2, 0::2], x[:, 1::2, 0::2],
                         x[:, 0::2, 1::2], x[:, 1::2, 1::2]], axis=-1)
    x = nn.LayerNorm(epsilon=1e-5, dtype=self.dtype, name="norm")(x)
    return nn.Dense(2 * c, use_bias=False, dtype=self.dtype,
                    kernel_init=_dense_init, name="reduction")(x)


class Swin(nn.Module):
  """Swin backbone: images [B, H, W, 3] in [0, 1] -> dict of feature maps
    'stage1' [B, H/4,  W/4,  C]      'stage2' [B, H/8,  W/8,  2C]
    'stage3' [B, H/16, W/16, 4C]     'stage4' [B, H/32, W/32, 8C]
  (sides round up), each after its stage's LayerNorm.

  Attributes:
    patch_size: 4.
    embed_dim: C (96 for Swin-T and Swin-S).
    depths: blocks per stage ((2, 2, 6, 2) T, (2, 2, 18, 2) S).
    num_heads: heads per stage ((3, 6, 12, 24)); each must divide its width.
    window: window side w (7).
    mlp_ratio: MLP hidden width / channels (4).
    dtype: computation dtype (parameters stay float32).
    remat: 'none', or 'blocks' / 'stages' (both recompute each block's
      activations in the backward pass; names and values are unchanged).
  `train` is accepted for the ResNet's call signature and changes nothing.
  """
  patch_size: int = 4
  embed_dim: int = 96
  depths: Sequence[int] = (2, 2, 6, 2)
  num_heads: Sequence[int] = (3, 6, 12, 24)
  window: int = 7
  mlp_ratio: float = 4.0
  dtype: Any = jnp.float32
  remat: str = "none"

  @nn.compact
  def __call__(self, images, train: bool = True) -> dict[str, jnp.ndarray]:
    del train
    if len(self.depths) != len(STAGES) or len(self.num_heads) != len(STAGES):
      raise ValueError(f"Swin needs 4 stages: depths={self.depths}, "
                       f"num_heads={self.num_heads}.")
    if self.remat not in vit.REMAT_MODES:
      raise ValueError(f"Swin remat must be one of {vit.REMAT_MODES}, got "
                       f"{self.remat!r}.")
    p = self.patch_size
    mean = jnp.asarray(resnet.IMAGENET_MEAN, jnp.float32)
    std = jnp.asarray(resnet.IMAGENET_STD, jnp.float32)
    x = ((images.astype(jnp.float32) - mean) / std).astype(self.dtype)
    _, h, w, _ = x.shape
    x = jnp.pad(x, ((0, 0), (0, -h % p), (0, -w % p), (0, 0)))
    x = nn.Conv(self.embed_dim, (p, p), (p, p), padding="VALID",
                dtype=self.dtype, name="patch_embed")(x)
    x = nn.LayerNorm(epsilon=1e-5, dtype=self.dtype, name="patch_norm")(x)

    block = nn.remat(SwinBlock) if self.remat != "none" else SwinBlock
    feats = {}
    for i, (depth, heads) in enumerate(zip(self.depths, self.num_heads)):
      if i:
        x = PatchMerging(self.dtype, name=f"stage{i + 1}_merge")(x)
      for j in range(depth):
        shift = self.window // 2 if j % 2 else 0
        x = block(heads, self.window, shift, self.mlp_ratio, self.dtype,
                  name=f"stage{i + 1}_block{j + 1}")(x)
      feats[STAGES[i]] = nn.LayerNorm(epsilon=1e-5, dtype=self.dtype,
                                      name=f"stage{i + 1}_norm")(x)
    return feats


def stage_channels(embed_dim: int) -> tuple[int, ...]:
  """Channels of 'stage1'..'stage4': C, 2C, 4C, 8C."""
  return tuple(embed_dim * 2**i for i in range(len(STAGES)))


def num_params(embed_dim: int, depths: Sequence[int],
               num_heads: Sequence[int], window: int = 7,
               patch_size: int = 4, mlp_ratio: float = 4.0,
               stage_norms: bool = True) -> int:
  """Parameters of `Swin` by formula; stage_norms=False gives timm's count
  without its classifier (timm has only the last stage's norm).

  Patch conv 3p²C + C and its LayerNorm 2C; per block at width c with h
  heads: two LayerNorms 4c, qkv 3c² + 3c, proj c² + c, MLP 2·c·rc + rc + c,
  bias table (2w-1)²·h; patch merging into width 2c: LayerNorm 8c, Linear
  8c²; one LayerNorm 2c per stage output.
  """
  total = 3 * patch_size**2 * embed_dim + embed_dim + 2 * embed_dim
  for i, (depth, heads) in enumerate(zip(depths, num_heads)):
    c = embed_dim * 2**i
    if i:
      total += 4 * c + 2 * c * c          # merging from c/2: LN(2c), 2c -> c
    hidden = int(c * mlp_ratio)
    block = (4 * c + 3 * c * c + 3 * c + c * c + c + 2 * c * hidden + hidden
             + c + (2 * window - 1) ** 2 * heads)
    total += depth * block
    if stage_norms or i == len(depths) - 1:
      total += 2 * c
  return total


def timm_state_dict(backbone_params) -> dict[str, np.ndarray]:
  """Swin parameters -> a state dict in timm's `SwinTransformer` layout.

  `backbone_params` is the Swin's parameter tree (`params['backbone']`).
  Keys (timm >= 0.9 layout, as `swin_tiny_patch4_window7_224`; C_i the
  width of stage i = 0..3, w the window, i.e. C_0 96 and w 7 for Swin-T):
    patch_embed.proj.weight [C_0, 3, 4, 4] (OIHW), patch_embed.proj.bias
    patch_embed.norm.weight / .bias                     [C_0]
    layers.{i}.downsample.norm.weight / .bias   [2·C_i]   i = 1..3
    layers.{i}.downsample.reduction.weight      [C_i, 2·C_i]  (no bias)
    layers.{i}.blocks.{j}.norm1.weight / .bias          [C_i]
    layers.{i}.blocks.{j}.attn.relative_position_bias_table [(2w-1)², heads]
    layers.{i}.blocks.{j}.attn.qkv.weight [3C_i, C_i], .bias [3C_i]
    layers.{i}.blocks.{j}.attn.proj.weight [C_i, C_i], .bias [C_i]
    layers.{i}.blocks.{j}.norm2.weight / .bias          [C_i]
    layers.{i}.blocks.{j}.mlp.fc1.weight [4C_i, C_i], .bias [4C_i]
    layers.{i}.blocks.{j}.mlp.fc2.weight [C_i, 4C_i], .bias [C_i]
    norm.weight / norm.bias                             [C_3]  (= 'stage4_norm')
  The buffers relative_position_index / attn_mask are not persistent in
  timm and not exported; 'stage1_norm'..'stage3_norm' (our per-stage
  output norms, for the FPN) have no timm counterpart and are dropped.
  Load with num_classes=0, strictly, through `load_state_dict`:
    m = timm.create_model('swin_tiny_patch4_window7_224', num_classes=0)
    m.load_state_dict({k: torch.from_numpy(v) for k, v in sd.items()})
  not through `pretrained_cfg_overlay=dict(file=...)`: timm's checkpoint
  filter takes a dict without 'head.fc.weight' for the pre-0.9 layout and
  renumbers the downsample keys. Inputs are ImageNet mean/std normalised.
  """
  params = jax.device_get(backbone_params)
  out = vit._conv("patch_embed.proj", params["patch_embed"])
  out.update(vit._layer_norm("patch_embed.norm", params["patch_norm"]))
  for i in range(len(STAGES)):
    if f"stage{i + 1}_merge" in params:
      merge = params[f"stage{i + 1}_merge"]
      out.update(vit._layer_norm(f"layers.{i}.downsample.norm", merge["norm"]))
      out.update(vit._linear(f"layers.{i}.downsample.reduction",
                             merge["reduction"]))
    j = 0
    while f"stage{i + 1}_block{j + 1}" in params:
      blk, pre = params[f"stage{i + 1}_block{j + 1}"], f"layers.{i}.blocks.{j}"
      out.update(vit._layer_norm(f"{pre}.norm1", blk["norm1"]))
      out[f"{pre}.attn.relative_position_bias_table"] = np.asarray(
          blk["attn"]["relative_position_bias_table"])
      out.update(vit._linear(f"{pre}.attn.qkv", blk["attn"]["qkv"]))
      out.update(vit._linear(f"{pre}.attn.proj", blk["attn"]["proj"]))
      out.update(vit._layer_norm(f"{pre}.norm2", blk["norm2"]))
      out.update(vit._linear(f"{pre}.mlp.fc1", blk["mlp"]["fc1"]))
      out.update(vit._linear(f"{pre}.mlp.fc2", blk["mlp"]["fc2"]))
      j += 1
  out.update(vit._layer_norm("norm", params["stage4_norm"]))
  return {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in out.items()}
