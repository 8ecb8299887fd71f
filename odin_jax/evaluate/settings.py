"""Evaluation settings: every config.eval field, its default, its coercion.

The one home of the evaluation defaults. configs/common.py builds its
config.eval section from `config_section()` (and its presets only override
fields); the runner reads a config back with `settings_from_config`. This
module imports no JAX / TF: configs and config_check load it before JAX.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

# The evaluations `python -m odin_jax.evaluate` runs by default, in order
# (runner.REGISTRY also holds evaluations that run only when named).
EVALUATIONS = ("discovery", "instances", "video", "linear_probe", "knn",
               "pictures")
# Evaluations that run only when named (--evals=imagenet_linear).
OPT_IN_EVALUATIONS = ("imagenet_linear",)


@dataclasses.dataclass(frozen=True)
class EvalSettings:
  """Every config.eval field and its default.

  every_steps: the training loop's period for `periodic` (0: never).
  periodic: evaluations run during training (cheap by default).
  evals: evaluations run by `python -m odin_jax.evaluate` by default.
  feature: 'auto' | 'projection' | a feature map name ('stage4', 'p2', ...);
    'auto' = `features.default_feature`: 'projection' (the FPN projections
    z) with an FPN, 'tokens' for a ViT, 'embedding' for hiergroup, else
    resnet_feature (Odin App. A.4: the final hidden layer h).
  resnet_feature: what 'auto' clusters for a ResNet / Swin without FPN:
    'stage4', the final hidden layer (App. A.4); the demo preset: 'stage3'.
  image_size: network input side (images are resized to it); App. A.4:
    1024 for ResNets (stage4 32x32, FPN p2 256x256), 448 for ViTs. The demo
    / test presets evaluate at 256 (docs/evaluation.md, "Resolution").
  batch_size: images per jitted forward pass and per k-means program.
  seed: PRNG seed of k-means, spectral clustering and the probe.
  demo_seed: seed of the held-out demo scenes (training uses 0).
  num_images: scenes for discovery / instances.
  discovery_ks: k-means K's (Odin App. A.4: 255 masks); K > cells dropped.
  mask_baselines: mask sets also scored by 'discovery' ('fh','slic','grid').
  spectral_ks: spectral clustering K's (instance recall).
  spectral_max_cells: larger grids are area-pooled before the affinity.
  instance_feature: what instance recall clusters: 'auto' = a ViT's 'keys'
    (last block's attention keys, the instance-segmentation paper's §3),
    else the discovery features (`feature`); or a feature map name. It
    reports AR over IoU 0.5:0.05:0.95 (mean average recall) and R@0.5.
  video_clips, video_frames, video_objects: generated clips.
  probe_train_images, probe_test_images, probe_steps: linear probe / k-NN.
  picture_images, picture_k: scenes and K of the discovery panel.
  tfds_discovery: '' or 'coco/2017_panoptic'; tfds_video: '' or
    'davis/480p'; tfds_data_dir: TFDS data_dir (None: TFDS default);
    tfds_num_images / tfds_num_videos: how many. COCO's native central
    square crop is resized straight to image_size, the network input, and
    scored there (Odin App. A.4). Never downloaded.
  folder_discovery: '' or a folder of images + instance-id PNG masks
    (evaluate/folder.py), evaluated like COCO with prefix 'folder/';
    folder_num_images: the first N images (0: all); folder_mask_encoding:
    'ids' or 'coco_rgb' (R + 256 G + 65536 B); folder_background_ids: mask
    ids that are not objects (+255: VOC / DAVIS void borders).
  linear_*: 'imagenet_linear' (evaluate/linear.py), BYOL App. C.1's linear
    evaluation of the frozen, mean-pooled backbone output: linear_dataset
    (TFDS, read from tfds_data_dir; imagenet2012), linear_train_split,
    linear_test_split, linear_num_train / linear_num_test (0: the whole
    split), linear_feature ('auto': 'stage4', a ViT's 'tokens'; pooled),
    linear_image_size (224; train: random resized crop + flip, test:
    central linear_crop_fraction = 224 / (224 + 32) crop),
    linear_batch_size (1024), linear_epochs (80), linear_base_lr (0.2 x
    batch / 256, cosine to 0; BYOL eval.py), linear_momentum (Nesterov
    0.9), linear_weight_decay (0); top-1 / top-5.
  final_report: after training, `report.final_report` prints θ beside ξ,
    the random init and the FH masks (the demo presets turn it on);
    report_cache_dir: where the random-init / FH numbers are cached ('':
    ~/.cache/odin_jax/eval_baselines).
  """
  every_steps: int = 0
  periodic: tuple = ("discovery", "pictures")
  evals: tuple = EVALUATIONS
  feature: str = "auto"
  resnet_feature: str = "stage4"
  image_size: int = 1024
  batch_size: int = 16
  seed: int = 0
  demo_seed: int = 1
  num_images: int = 32
  discovery_ks: tuple = (1, 2, 4, 8, 16, 32, 64, 128)
  mask_baselines: tuple = ("fh", "slic", "grid")
  spectral_ks: tuple = (2, 3, 4, 5)
  spectral_max_cells: int = 1024
  instance_feature: str = "auto"
  video_clips: int = 4
  video_frames: int = 8
  video_objects: int = 2
  probe_train_images: int = 96
  probe_test_images: int = 32
  probe_steps: int = 300
  picture_images: int = 4
  picture_k: int = 8
  tfds_discovery: str = ""
  tfds_video: str = ""
  tfds_data_dir: str | None = None
  tfds_num_images: int = 500
  tfds_num_videos: int = 30
  folder_discovery: str = ""
  folder_num_images: int = 0
  folder_mask_encoding: str = "ids"
  folder_background_ids: tuple = (0,)
  linear_dataset: str = "imagenet2012"
  linear_train_split: str = "train"
  linear_test_split: str = "validation"
  linear_num_train: int = 0
  linear_num_test: int = 0
  linear_feature: str = "auto"
  linear_image_size: int = 224
  linear_crop_fraction: float = 0.875
  linear_batch_size: int = 1024
  linear_epochs: int = 80
  linear_base_lr: float = 0.2
  linear_momentum: float = 0.9
  linear_weight_decay: float = 0.0
  final_report: bool = False
  report_cache_dir: str = ""


FIELDS = {f.name: f for f in dataclasses.fields(EvalSettings)}


def config_section():
  """An ml_collections.ConfigDict with every field at its default (the
  config.eval section of configs/common.py); None-valued string fields
  are FieldReferences so a preset or flag can set a string."""
  import ml_collections
  section = ml_collections.ConfigDict()
  for name, field in FIELDS.items():
    if field.default is None:
      section[name] = ml_collections.FieldReference(None, field_type=str)
    else:
      section[name] = field.default
  return section


def coerce(name: str, value):
  """A config / command-line value as the type of EvalSettings.<name>."""
  default = FIELDS[name].default
  if isinstance(default, tuple):
    if isinstance(value, str):
      value = [v for v in value.split(",") if v]
    kind = type(default[0]) if default else str
    return tuple(kind(v) for v in value)
  if value is None or default is None:
    return value
  if isinstance(default, bool):
    return value if isinstance(value, bool) else str(value).lower() in (
        "1", "true", "yes")
  return type(default)(value)


def _check_name(name: str) -> None:
  if name not in FIELDS:
    raise ValueError(f"Unknown eval setting {name!r}; known: "
                     f"{sorted(FIELDS)}.")


def settings_from_config(config, **overrides) -> EvalSettings:
  """EvalSettings from config.eval (if any), then `overrides` (not None).

  Raises ValueError for a field EvalSettings does not know (a typo would
  otherwise be silently ignored).
  """
  section = config.get("eval") if hasattr(config, "get") else None
  items = list(section.items()) if section is not None else []
  items += [(k, v) for k, v in overrides.items() if v is not None]
  values = {}
  for name, value in items:
    _check_name(name)
    values[name] = coerce(name, value)
  return EvalSettings(**values)


def parse_overrides(pairs: Sequence[str]) -> dict:
  """['num_images=8', 'discovery_ks=1,2,4'] -> {name: value} (coerced)."""
  out = {}
  for pair in pairs or ():
    if "=" not in pair:
      raise ValueError(f"Expected key=value, got {pair!r}.")
    name, value = pair.split("=", 1)
    name = name.strip()
    _check_name(name)
    out[name] = coerce(name, None if value in ("None", "none") else value)
  return out
