"""Name and layout conversions of a ResNet backbone's variables.

Pure functions from the Flax variables of odin_jax.models.resnet.ResNet
({'params': ..., 'batch_stats': ...}) to
  flat '/'-joined Flax names            (`flatten`, the npz format),
  torchvision's ResNet state_dict       (`torchvision_state_dict`),
  detectron2's ResNet checkpoint        (`detectron2_checkpoint`, with the
                                         config it needs: `detectron2_config`).
The torchvision layout follows torchvision.models.resnet (conv1, bn1,
layer{1-4}.{j}.conv{k}/bn{k}, downsample.0/1; stride on the 3x3 conv, as in
our model). detectron2's names follow detectron2/modeling/backbone/resnet.py
(BasicStem 'stem.conv1', stages 'res2'..'res5', each Conv2d's norm as
'<conv>.norm', the projection as 'shortcut'), the same renaming as its
tools/convert-torchvision-to-d2.py.
"""

from __future__ import annotations

import json
import re

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
  from odin_jax.models import resnet
  kind, stage_sizes = resnet.STAGE_SIZES[depth]
  flat = flatten(variables)
  used = set()

  def take(name):
    used.add(name)
    return flat[name]

  modules = [("stem_conv", "conv1"), ("stem_bn", "bn1")]
  for i, blocks in enumerate(stage_sizes, 1):
    for j in range(blocks):
      modules += [(f"stage{i}_block{j + 1}/{f}", f"layer{i}.{j}.{t}")
                  for f, t in (_BASIC if kind == "basic" else _BOTTLENECK)]
  out = {}
  for flax_name, torch_name in modules:
    if f"params/{flax_name}/kernel" in flat:
      kernel = take(f"params/{flax_name}/kernel")
      out[f"{torch_name}.weight"] = np.ascontiguousarray(
          kernel.transpose(3, 2, 0, 1), np.float32)
    elif f"params/{flax_name}/scale" in flat:
      for flax_key, torch_key in (("params/{}/scale", "weight"),
                                  ("params/{}/bias", "bias"),
                                  ("batch_stats/{}/mean", "running_mean"),
                                  ("batch_stats/{}/var", "running_var")):
        out[f"{torch_name}.{torch_key}"] = np.asarray(
            take(flax_key.format(flax_name)), np.float32)
      out[f"{torch_name}.num_batches_tracked"] = np.asarray(
          num_batches_tracked, np.int64)
    elif "downsample" not in torch_name:  # only shortcuts are optional
      raise ValueError(f"The backbone has no {flax_name!r} (torchvision "
                       f"{torch_name}); is it a ResNet-{depth}?")
  left = sorted(set(flat) - used)
  if left:
    raise ValueError(f"Backbone variables without a torchvision name: "
                     f"{left[:5]} (is it a ResNet-{depth}?).")
  return out


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
