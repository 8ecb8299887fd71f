"""The COCO fine-tuning configs (configs/finetune/) against the export.

detectron2 and mmdetection are not installed here. The detectron2 YAML is
read with PyYAML and the mmdetection config is executed as the plain
Python file it is (mmengine would resolve its 'mmdet::' bases, which needs
mmdet). Each is checked for the recipe (Mask R-CNN R50-FPN, SyncBN
everywhere, whole network trained, 1x = 90k iterations at 16 images = 12
epochs, lr 0.02) and for what the weights need (RGB, ImageNet mean / std x
255, stride on the 3x3 conv). The exported key names and shapes of a
ResNet-50 are compared with the frameworks' documented formats, written
out below from their ResNet definitions (torchvision / mmdetection:
conv1, bn1, layer1-4, downsample.0/1; detectron2: stem.conv1, res2-5,
conv<k>.norm, shortcut) rather than read from odin_jax.
"""

from __future__ import annotations

import os
import runpy

import jax
import numpy as np
import pytest
import yaml

from odin_jax.export import convert
from odin_jax.export import writer
from odin_jax.models import resnet

REPO = os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))))
FINETUNE = os.path.join(REPO, "configs", "finetune")
D2_CONFIG = os.path.join(FINETUNE, "detectron2_mask_rcnn_R_50_FPN_1x_syncbn.yaml")
MMDET_CONFIG = os.path.join(FINETUNE, "mmdet_mask-rcnn_r50_fpn_syncbn_1x_coco.py")
COCO_TRAIN_IMAGES = 118_287
MEAN255 = [123.675, 116.28, 103.53]   # ImageNet mean / std x 255, RGB
STD255 = [58.395, 57.12, 57.375]
_BN = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")


def _flat(tree: dict, prefix: str = "") -> dict:
  out = {}
  for key, value in tree.items():
    if isinstance(value, dict):
      out.update(_flat(value, f"{prefix}{key}."))
    else:
      out[f"{prefix}{key}"] = value
  return out


@pytest.fixture(scope="module")
def d2():
  with open(D2_CONFIG, encoding="utf-8") as f:
    return _flat(yaml.safe_load(f))


@pytest.fixture(scope="module")
def mmdet():
  return runpy.run_path(MMDET_CONFIG)


# --- Documented key formats (independent of odin_jax) ---------------------


def _torchvision_r50() -> dict:
  """torchvision.models.resnet50's state_dict names -> shapes, without fc
  (= mmdet's ResNet(depth=50, style='pytorch'))."""
  out = {"conv1.weight": (64, 3, 7, 7)}
  out.update({f"bn1.{k}": (64,) for k in _BN})
  in_ch = 64
  for layer, blocks in enumerate((3, 4, 6, 3), 1):
    width = 64 * 2**(layer - 1)
    for b in range(blocks):
      p = f"layer{layer}.{b}."
      convs = ((width, in_ch, 1), (width, width, 3), (4 * width, width, 1))
      for k, (o, i, s) in enumerate(convs, 1):
        out[f"{p}conv{k}.weight"] = (o, i, s, s)
        out.update({f"{p}bn{k}.{n}": (o,) for n in _BN})
      if b == 0:
        out[f"{p}downsample.0.weight"] = (4 * width, in_ch, 1, 1)
        out.update({f"{p}downsample.1.{n}": (4 * width,) for n in _BN})
      in_ch = 4 * width
  return {k: (() if k.endswith("num_batches_tracked") else v)
          for k, v in out.items()}


def _detectron2_r50() -> dict:
  """detectron2's ResNet-50 (BasicStem + res2..res5 BottleneckBlocks, each
  Conv2d's norm as '<conv>.norm', the projection as 'shortcut') names ->
  shapes; the same convolutions as torchvision's."""
  out = {"stem.conv1.weight": (64, 3, 7, 7)}
  out.update({f"stem.conv1.norm.{k}": (64,) for k in _BN})
  in_ch = 64
  for stage, blocks in enumerate((3, 4, 6, 3), 2):
    width = 64 * 2**(stage - 2)
    for b in range(blocks):
      p = f"res{stage}.{b}."
      convs = ((width, in_ch, 1), (width, width, 3), (4 * width, width, 1))
      names = [f"conv{k}" for k in (1, 2, 3)]
      if b == 0:
        convs += ((4 * width, in_ch, 1),)
        names.append("shortcut")
      for name, (o, i, s) in zip(names, convs):
        out[f"{p}{name}.weight"] = (o, i, s, s)
        out.update({f"{p}{name}.norm.{n}": (o,) for n in _BN})
      in_ch = 4 * width
  return {k: (() if k.endswith("num_batches_tracked") else v)
          for k, v in out.items()}


@pytest.fixture(scope="module")
def exported():
  """The export's torchvision state_dict and detectron2 checkpoint of a
  ResNet-50 x1 (zeros of the Flax shapes: names and shapes only)."""
  model = resnet.ResNet(depth=50)
  shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0),
                          jax.ShapeDtypeStruct((1, 64, 64, 3), np.float32))
  variables = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), shapes)
  state_dict = convert.torchvision_state_dict(dict(variables), 50)
  return state_dict, convert.detectron2_checkpoint(state_dict)["model"]


def _shapes(state_dict: dict) -> dict:
  return {k: tuple(np.shape(v)) for k, v in state_dict.items()}


def test_exported_names_match_torchvision_and_mmdet_resnet50(exported):
  state_dict, _ = exported
  want = _torchvision_r50()
  # 53 convs + 53 BNs x 5 entries: resnet50().state_dict() has 320
  # keys, fc.weight and fc.bias being the other two.
  assert len(want) == 318
  assert _shapes(state_dict) == want
  assert list(state_dict) == list(want)   # torchvision's order too


def test_exported_names_match_detectron2_resnet50(exported):
  _, model = exported
  assert _shapes(model) == _detectron2_r50()


# --- detectron2 -----------------------------------------------------------


def test_detectron2_recipe(d2):
  assert d2["MODEL.META_ARCHITECTURE"] == "GeneralizedRCNN"
  assert d2["MODEL.BACKBONE.NAME"] == "build_resnet_fpn_backbone"
  assert d2["MODEL.MASK_ON"] is True and d2["MODEL.RESNETS.DEPTH"] == 50
  for key in ("RESNETS", "FPN", "ROI_BOX_HEAD", "ROI_MASK_HEAD"):
    assert d2[f"MODEL.{key}.NORM"] == "SyncBN", key
  assert d2["MODEL.BACKBONE.FREEZE_AT"] == 0   # the whole network trains
  assert (d2["MODEL.ROI_BOX_HEAD.NUM_CONV"], d2["MODEL.ROI_BOX_HEAD.NUM_FC"]
          ) == (4, 1)
  # 1x: 90k iterations of 16 images = 12 COCO epochs, lr 0.02 / 10 at 60k
  # and 80k.
  assert d2["SOLVER.IMS_PER_BATCH"] == 16 and d2["SOLVER.MAX_ITER"] == 90000
  assert round(90000 * 16 / COCO_TRAIN_IMAGES) == 12
  assert d2["SOLVER.STEPS"] == [60000, 80000]
  assert d2["SOLVER.BASE_LR"] == 0.02
  assert d2["SOLVER.WEIGHT_DECAY"] == 0.0001
  assert d2["DATASETS.TRAIN"] == ["coco_2017_train"]
  assert d2["TEST.PRECISE_BN.ENABLED"] is True


def test_detectron2_config_fits_the_export(d2):
  """Every entry the export writes for a ResNet-50 x1 (its README / yaml)
  is in the config with the same value; the input is RGB normalised by
  the ImageNet statistics, as the network was trained."""
  cfg, warnings = convert.detectron2_config(50, 1.0)
  assert not warnings
  for key, value in cfg.items():
    if key == "MODEL.WEIGHTS":
      assert d2[key].endswith("/" + writer.FILES["detectron2"][0])
    else:
      assert d2[key] == value, key
  np.testing.assert_allclose(d2["MODEL.PIXEL_MEAN"],
                             255 * np.array(resnet.IMAGENET_MEAN))
  np.testing.assert_allclose(d2["MODEL.PIXEL_STD"],
                             255 * np.array(resnet.IMAGENET_STD))
  assert d2["MODEL.PIXEL_MEAN"] == MEAN255 and d2["MODEL.PIXEL_STD"] == STD255
  assert d2["INPUT.FORMAT"] == "RGB"
  assert d2["MODEL.RESNETS.STRIDE_IN_1X1"] is False
  # The export's own YAML snippet reads back as a subset of this file.
  snippet = _flat(yaml.safe_load(convert.detectron2_yaml(cfg)))
  assert {k: v for k, v in snippet.items() if k != "MODEL.WEIGHTS"}.items() \
      <= d2.items()


# --- mmdetection ----------------------------------------------------------


def test_mmdet_recipe(mmdet):
  assert mmdet["_base_"] == [
      "mmdet::_base_/models/mask-rcnn_r50_fpn.py",
      "mmdet::_base_/datasets/coco_instance.py",
      "mmdet::_base_/schedules/schedule_1x.py",
      "mmdet::_base_/default_runtime.py"]
  model = mmdet["model"]
  backbone = model["backbone"]
  assert (backbone["type"], backbone["depth"]) == ("ResNet", 50)
  assert backbone["norm_cfg"]["type"] == "SyncBN"
  assert backbone["norm_eval"] is False and backbone["frozen_stages"] == -1
  assert model["neck"]["norm_cfg"]["type"] == "SyncBN"
  heads = model["roi_head"]
  assert heads["bbox_head"]["type"] == "Shared4Conv1FCBBoxHead"
  for head in ("bbox_head", "mask_head"):
    assert heads[head]["norm_cfg"]["type"] in ("SyncBN", "MMSyncBN"), head
  # 1x: 12 epochs, lr / 10 after epochs 8 and 11, SGD 0.02 at 8 x 2 images.
  assert mmdet["train_cfg"]["max_epochs"] == 12
  steps = [s for s in mmdet["param_scheduler"] if s["type"] == "MultiStepLR"]
  assert steps[0]["milestones"] == [8, 11] and steps[0]["gamma"] == 0.1
  optimizer = mmdet["optim_wrapper"]["optimizer"]
  assert (optimizer["type"], optimizer["lr"], optimizer["momentum"],
          optimizer["weight_decay"]) == ("SGD", 0.02, 0.9, 0.0001)
  assert 8 * mmdet["train_dataloader"]["batch_size"] == \
      mmdet["auto_scale_lr"]["base_batch_size"] == 16


def test_mmdet_config_fits_the_torchvision_export(mmdet, exported):
  """The backbone is initialised from the export's torchvision.pth, whose
  keys are mmdet's ResNet's own (style='pytorch': torchvision names, stride
  on the 3x3), with RGB input normalised by the ImageNet statistics."""
  backbone = mmdet["model"]["backbone"]
  init = backbone["init_cfg"]
  assert init["type"] == "Pretrained"
  assert init["checkpoint"].endswith("/" + writer.FILES["torchvision"][1])
  assert backbone["style"] == "pytorch"
  pre = mmdet["model"]["data_preprocessor"]
  assert pre["mean"] == MEAN255 and pre["std"] == STD255
  assert pre["bgr_to_rgb"] is True   # mmdet decodes BGR; the export wants RGB
  state_dict, _ = exported
  assert set(state_dict) == set(_torchvision_r50())   # no 'backbone.' prefix
