"""Name and layout conversions of a backbone's variables, both ways.

One mapping table per backbone (`resnet_table`, `vit_table`, `swin_table`:
flat Flax name <-> torch name, and the layout change) serves the export
(`to_state_dict`) and the import (odin_jax/export/weights_in.py, through
`from_torch`). From the Flax variables ({'params': ..., 'batch_stats':
...}) of odin_jax.models.resnet.ResNet / vit.ViT / swin.Swin to
  flat '/'-joined Flax names            (`flatten`, the npz format),
  torchvision's ResNet state_dict       (`torchvision_state_dict`),
  timm's ViT / Swin state_dict          (`timm_state_dict`),
  detectron2's ResNet checkpoint        (`detectron2_checkpoint`, with the
                                         config it needs: `detectron2_config`).
The torchvision layout follows torchvision.models.resnet (conv1, bn1,
layer{1-4}.{j}.conv{k}/bn{k}, downsample.0/1; stride on the 3x3 conv, as in
our model). detectron2's names follow detectron2/modeling/backbone/resnet.py
(BasicStem 'stem.conv1', stages 'res2'..'res5', each Conv2d's norm as
'<conv>.norm', the projection as 'shortcut'), the same renaming as its
tools/convert-torchvision-to-d2.py. timm's follow its VisionTransformer and
SwinTransformer (timm >= 0.9).
"""

from __future__ import annotations

import json
import re
from typing import NamedTuple

import numpy as np

# Depths detectron2's build_resnet_backbone knows (no ResNet-200).
DETECTRON2_DEPTHS = (18, 34, 50, 101, 152)

# Flax module of a residual block -> torchvision module, in torchvision's
# order (which is also the order of the state_dict written).
_BASIC = (("Conv_0", "conv1"), ("BatchNorm_0", "bn1"), ("Conv_1", "conv2"),
          ("bn_last", "bn2"), ("proj_conv", "downsample.0"),
          ("proj_bn", "downsample.1"))
_BOTTLENECK = (("Conv_0", "conv1"), ("BatchNorm_0", "bn1"),
               ("Conv_1", "conv2"), ("BatchNorm_1", "bn2"),
               ("Conv_2", "conv3"), ("bn_last", "bn3"),
               ("proj_conv", "downsample.0"), ("proj_bn", "downsample.1"))

# --- The mapping tables: one per backbone, read by export and import -------
#
# An Entry maps one flat Flax name ('params/stem_conv/kernel', as `flatten`)
# to one torch state_dict name and says how the array changes on the way:
#   CONV     Flax Conv kernel [kh, kw, I, O] <-> torch Conv2d weight
#            [O, I, kh, kw]
#   LINEAR   Flax Dense kernel [in, out] <-> torch Linear weight [out, in]
#   SAME     the same array (biases, norms, embeddings, BN statistics)
#   COUNTER  torch's BatchNorm num_batches_tracked (int64 []): written from
#            the step on export, not a Flax variable (ignored on import);
#            its `flax` is the BN's scale, whose presence it follows.
# Export (`to_state_dict`, `to_torch`) and import (weights_in.match,
# `from_torch`) apply the same entries in opposite directions.

CONV, LINEAR, SAME, COUNTER = "conv", "linear", "same", "counter"


class Entry(NamedTuple):
  """One array: its flat Flax name, its torch name, and a kind above."""
  flax: str
  torch: str
  kind: str


def to_torch(kind: str, array: np.ndarray) -> np.ndarray:
  """A Flax array in torch's layout (see the kinds above)."""
  if kind == CONV:
    return array.transpose(3, 2, 0, 1)
  return array.T if kind == LINEAR else array


def from_torch(kind: str, array: np.ndarray) -> np.ndarray:
  """The inverse of `to_torch`."""
  if kind == CONV:
    return array.transpose(2, 3, 1, 0)
  return array.T if kind == LINEAR else array


def torch_shape(kind: str, shape: tuple) -> tuple:
  """The torch shape of a Flax array of `shape`."""
  return to_torch(kind, np.empty(shape, np.int8)).shape


def _conv(flax: str, torch: str, bias: bool = False) -> list[Entry]:
  out = [Entry(f"params/{flax}/kernel", f"{torch}.weight", CONV)]
  return out + ([Entry(f"params/{flax}/bias", f"{torch}.bias", SAME)]
                if bias else [])


def _dense(flax: str, torch: str, bias: bool = True) -> list[Entry]:
  out = [Entry(f"params/{flax}/kernel", f"{torch}.weight", LINEAR)]
  return out + ([Entry(f"params/{flax}/bias", f"{torch}.bias", SAME)]
                if bias else [])


def _norm(flax: str, torch: str) -> list[Entry]:
  """LayerNorm: scale / bias -> weight / bias."""
  return [Entry(f"params/{flax}/scale", f"{torch}.weight", SAME),
          Entry(f"params/{flax}/bias", f"{torch}.bias", SAME)]


def _batch_norm(flax: str, torch: str) -> list[Entry]:
  return _norm(flax, torch) + [
      Entry(f"batch_stats/{flax}/mean", f"{torch}.running_mean", SAME),
      Entry(f"batch_stats/{flax}/var", f"{torch}.running_var", SAME),
      Entry(f"params/{flax}/scale", f"{torch}.num_batches_tracked", COUNTER)]


def resnet_table(depth: int) -> tuple[Entry, ...]:
  """odin_jax.models.resnet.ResNet(depth) <-> torchvision's ResNet names.

  Every block's shortcut (downsample.0/1) is listed; a block without one
  (same shape in and out) simply has neither name.
  """
  from odin_jax.models import resnet
  kind, stage_sizes = resnet.STAGE_SIZES[depth]
  table = _conv("stem_conv", "conv1") + _batch_norm("stem_bn", "bn1")
  for i, blocks in enumerate(stage_sizes, 1):
    for j in range(blocks):
      for flax, torch in (_BASIC if kind == "basic" else _BOTTLENECK):
        module = (_conv if torch.startswith("conv") or torch == "downsample.0"
                  else _batch_norm)
        table += module(f"stage{i}_block{j + 1}/{flax}",
                        f"layer{i}.{j}.{torch}")
  return tuple(table)


def _block_entries(flax: str, torch: str, bias_table: bool) -> list[Entry]:
  """A pre-norm transformer block (vit.EncoderBlock / swin's block)."""
  table = _norm(f"{flax}/norm1", f"{torch}.norm1")
  if bias_table:
    table.append(Entry(f"params/{flax}/attn/relative_position_bias_table",
                       f"{torch}.attn.relative_position_bias_table", SAME))
  for name in ("attn/qkv", "attn/proj"):
    table += _dense(f"{flax}/{name}", f"{torch}.{name.replace('/', '.')}")
  table += _norm(f"{flax}/norm2", f"{torch}.norm2")
  for name in ("mlp/fc1", "mlp/fc2"):
    table += _dense(f"{flax}/{name}", f"{torch}.{name.replace('/', '.')}")
  return table


def count_indices(names, pattern: str, first: int = 0) -> int:
  """How many consecutive i from `first` have a name starting with
  pattern.format(i)."""
  names, n = tuple(names), 0
  while any(k.startswith(pattern.format(first + n)) for k in names):
    n += 1
  return n


def vit_table(flax_names) -> tuple[Entry, ...]:
  """odin_jax.models.vit.ViT <-> timm's VisionTransformer names.

  The depth and the class token are read from `flax_names` (the flat
  names of the ViT's variables: the model's on export, the config's
  network on import); see vit.timm_state_dict for the keys and shapes.
  """
  names = tuple(flax_names)
  table = ([Entry("params/cls_token", "cls_token", SAME)]
           if "params/cls_token" in names else [])
  table += [Entry("params/pos_embed", "pos_embed", SAME)]
  table += _conv("patch_embed", "patch_embed.proj", bias=True)
  for i in range(count_indices(names, "params/block{}/")):
    table += _block_entries(f"block{i}", f"blocks.{i}", bias_table=False)
  return tuple(table + _norm("norm", "norm"))


def swin_table(flax_names) -> tuple[Entry, ...]:
  """odin_jax.models.swin.Swin <-> timm's SwinTransformer (>= 0.9) names.

  Blocks per stage are read from `flax_names`. Our per-stage output norms
  'stage1_norm'..'stage3_norm' have no timm counterpart (not in the
  table: dropped on export, kept at their init on import); 'stage4_norm'
  is timm's final 'norm'. See swin.timm_state_dict for keys and shapes.
  """
  names = tuple(flax_names)
  table = (_conv("patch_embed", "patch_embed.proj", bias=True) +
           _norm("patch_norm", "patch_embed.norm"))
  for i in range(4):
    merge = f"stage{i + 1}_merge"
    if any(k.startswith(f"params/{merge}/") for k in names):
      table += _norm(f"{merge}/norm", f"layers.{i}.downsample.norm")
      table += _dense(f"{merge}/reduction", f"layers.{i}.downsample.reduction",
                      bias=False)
    # Flax counts blocks from 1, timm from 0.
    blocks = count_indices(names, f"params/stage{i + 1}_block{{}}/", 1)
    for j in range(blocks):
      table += _block_entries(f"stage{i + 1}_block{j + 1}",
                              f"layers.{i}.blocks.{j}", bias_table=True)
  return tuple(table + _norm("stage4_norm", "norm"))


def table_for(backbone: str, flax_names, depth: int | None = None
              ) -> tuple[Entry, ...]:
  """The mapping table of a 'resnet' (give depth) / 'vit' / 'swin'."""
  if backbone == "resnet":
    return resnet_table(depth)
  if backbone == "vit":
    return vit_table(flax_names)
  if backbone == "swin":
    return swin_table(flax_names)
  raise NotImplementedError(f"No torch names for the {backbone!r} backbone "
                            "(resnet, vit and swin have them).")


# Flax names of a backbone that its torch format has no place for.
UNMAPPED = {"swin": ("params/stage1_norm/", "params/stage2_norm/",
                     "params/stage3_norm/")}


def to_state_dict(flat: dict, table, num_batches_tracked: int = 0,
                  unmapped=()) -> dict[str, np.ndarray]:
  """Flat Flax variables -> {torch name: float32 array}, in table order.

  Entries whose Flax name is absent are skipped (a block without a
  shortcut); a Flax variable no entry names raises ValueError unless it
  starts with one of `unmapped`.
  """
  out, used = {}, set()
  for entry in table:
    if entry.flax not in flat:
      continue
    if entry.kind == COUNTER:
      out[entry.torch] = np.asarray(num_batches_tracked, np.int64)
      continue
    used.add(entry.flax)
    out[entry.torch] = np.ascontiguousarray(
        to_torch(entry.kind, np.asarray(flat[entry.flax])), np.float32)
  left = sorted(k for k in set(flat) - used
                if not k.startswith(tuple(unmapped)))
  if left:
    raise ValueError(f"Backbone variables without a torch name: {left[:5]}.")
  return out


def timm_state_dict(backbone: str, backbone_params) -> dict[str, np.ndarray]:
  """A ViT / Swin backbone's parameters as a timm state_dict (the table of
  `table_for`; keys and shapes: vit.timm_state_dict / swin.timm_state_dict,
  which give the same result)."""
  import jax
  flat = flatten({"params": jax.device_get(backbone_params)})
  return to_state_dict(flat, table_for(backbone, flat),
                       unmapped=UNMAPPED.get(backbone, ()))


def flatten(variables: dict) -> dict[str, np.ndarray]:
  """{'params': {...}, 'batch_stats': {...}} -> {'params/a/b': array}."""
  from flax import traverse_util
  return {k: np.asarray(v) for k, v in
          traverse_util.flatten_dict(variables, sep="/").items()}


def torchvision_state_dict(variables: dict, depth: int,
                           num_batches_tracked: int = 0
                           ) -> dict[str, np.ndarray]:
  """The backbone as a torchvision ResNet state_dict (without fc).

  Args:
    variables: {'params': backbone params, 'batch_stats': backbone stats} of
      odin_jax.models.resnet.ResNet(depth=depth, ...).
    depth: the ResNet depth (block kind and blocks per stage).
    num_batches_tracked: the value of every BN's counter (the step).
  Returns:
    {torchvision name: array}: conv weights [O, I, kh, kw] float32 (from
    Flax's [kh, kw, I, O]); BN weight/bias/running_mean/running_var [C];
    num_batches_tracked int64 []. Raises ValueError if a Flax variable has
    no torchvision counterpart (the model changed) or one is missing.
  """
  flat = flatten(variables)
  table = resnet_table(depth)
  absent = [e for e in table if e.flax not in flat
            and ".downsample." not in e.torch]   # only shortcuts are optional
  if absent:
    raise ValueError(f"The backbone has no {absent[0].flax!r} (torchvision "
                     f"{absent[0].torch}); is it a ResNet-{depth}?")
  try:
    return to_state_dict(flat, table, num_batches_tracked)
  except ValueError as e:
    raise ValueError(f"{e} (is it a ResNet-{depth}?)") from None


def detectron2_name(torchvision_name: str) -> str:
  """torchvision ResNet name -> detectron2's (its ResNet / BasicStem).

  conv1.w -> stem.conv1.w; bn1.x -> stem.conv1.norm.x; layer{i}.{j}.conv{k}
  -> res{i+1}.{j}.conv{k}; .bn{k}.x -> .conv{k}.norm.x; downsample.0 ->
  shortcut; downsample.1 -> shortcut.norm.
  """
  name = re.sub(r"^layer(\d)\.", lambda m: f"res{int(m[1]) + 1}.",
                torchvision_name)
  if not name.startswith("res"):
    name = "stem." + name
  name = re.sub(r"\bbn(\d)\.", r"conv\1.norm.", name)
  return name.replace("downsample.0.", "shortcut.").replace(
      "downsample.1.", "shortcut.norm.")


def detectron2_checkpoint(state_dict: dict[str, np.ndarray]) -> dict:
  """A torchvision state_dict as detectron2's pickled checkpoint dict."""
  model = {detectron2_name(k): v for k, v in state_dict.items()}
  if len(model) != len(state_dict):   # a renaming bug, never the input
    raise ValueError("torchvision -> detectron2 renaming is not one-to-one")
  return {"model": model, "__author__": "odin_jax",
          "matching_heuristics": True}


def channels(width: float, c: int) -> int:
  return max(1, int(round(c * width)))   # as odin_jax.models.resnet


def detectron2_config(depth: int, width: float) -> tuple[dict, list[str]]:
  """The detectron2 config entries for these weights, and warnings."""
  from odin_jax.models import resnet
  mean255 = [round(255 * m, 3) for m in resnet.IMAGENET_MEAN]
  std255 = [round(255 * s, 3) for s in resnet.IMAGENET_STD]
  expansion = 1 if resnet.STAGE_SIZES[depth][0] == "basic" else 4
  base = channels(width, 64)
  cfg = {"MODEL.WEIGHTS": "detectron2.pkl", "MODEL.PIXEL_MEAN": mean255,
         "MODEL.PIXEL_STD": std255, "INPUT.FORMAT": "RGB",
         "MODEL.RESNETS.DEPTH": depth, "MODEL.RESNETS.STRIDE_IN_1X1": False,
         "MODEL.RESNETS.NUM_GROUPS": 1,
         "MODEL.RESNETS.WIDTH_PER_GROUP": base,
         "MODEL.RESNETS.STEM_OUT_CHANNELS": base,
         "MODEL.RESNETS.RES2_OUT_CHANNELS": base * expansion}
  warnings = []
  # detectron2 doubles the channels per stage; odin_jax rounds each stage.
  if any(channels(width, 64 * 2**i) != base * 2**i for i in range(4)):
    warnings.append(f"width {width}: stage widths are not 2x apart, which "
                    "detectron2's ResNet cannot express.")
  if expansion == 1 and base != 64:
    warnings.append("detectron2's build_resnet_backbone requires "
                    "RES2_OUT_CHANNELS = 64 for R18/R34 (width 1).")
  return cfg, warnings


def detectron2_yaml(cfg: dict) -> str:
  """{'A.B.C': v} -> nested YAML text (detectron2's config file syntax)."""
  tree: dict = {}
  for key, value in cfg.items():
    *parents, leaf = key.split(".")
    node = tree
    for name in parents:
      node = node.setdefault(name, {})
    node[leaf] = value

  def emit(node: dict, indent: int) -> list[str]:
    lines = []
    for name, value in node.items():
      if isinstance(value, dict):
        lines += [" " * indent + f"{name}:"] + emit(value, indent + 2)
      else:   # JSON scalars and flow lists are valid YAML
        lines.append(" " * indent + f"{name}: {json.dumps(value)}")
    return lines
  return "\n".join(emit(tree, 0)) + "\n"
