"""Evaluation runner: a checkpoint (or random init, or a mask set) -> metrics.

`evaluate(config, workdir, ...)` runs the evaluations named in `which` on one
*source* of proposals / features and writes
  workdir/eval/results_<tag>.json    metrics, info, timings, picture paths
  workdir/eval/<tag>/<picture>.png   e.g. discovery.png
(tag = 'step_<n>' for a checkpoint or in-memory parameters, 'random' for the
random-init network, 'masks_<m>' for a mask set), logs a table, and writes
scalars 'eval/<metric>' and images 'eval/<picture>' to a CLU writer if one
is given (prefix 'eval_<tag>/' for random / mask sources, so baselines never
mix with the run's curve). It is the body of `python -m odin_jax.evaluate`
and what the training loop calls with its in-memory parameters.

Sources
  'checkpoint'  the online network θ of the latest (or a chosen) checkpoint
                in workdir/checkpoints (`load_params`; `params_key` picks ξ
                'target_params' or Odin's τ 'discovery_params' instead).
  'random'      the same network at initialisation (`init_params`: exactly
                the state a training run with config.seed starts from).
  'masks:fh' | 'masks:slic' | 'masks:grid'  a mask set used as proposals
                (one segmentation per image; the features-only evaluations,
                video / probes, are skipped for them).
  'masks:gt'    the ground-truth instance maps themselves (background is one
                more segment): perfect proposals, ABO^i = OR = 1. A sanity
                check of the whole pipeline.

Features (`FeatureSource`): images uint8 are scaled to [0, 1], resized
(bilinear, antialiased) to eval.image_size and run through
`ObjectNetwork.feature_maps` (feature 'stem', 'stage1'..'stage4', 'p2'..'p5'
with an FPN) or `dense_projection` (feature 'projection': the projector g
applied to every cell of the model's own hidden map, config.model
.feature_stage). eval.feature='auto' (`default_feature`) follows Odin App.
A.4: the projections z ('projection') when the model has an FPN, else the
final hidden layer h: 'stage4' (stride 32) of a ResNet (or a Swin, same
strides), 'tokens' of a ViT (App. A.4: ViTs at 448 px, B/8 -> 56x56;
docs/transformers.md); hiergroup's 'embedding'. See "Resolution" below.
Compiled once: the feature extractor is cached per (model, feature, input
size) and k-means is one jitted program per (batch, cells, K_max), so only
the first of the training loop's periodic evaluations compiles (what an
Odin demo call still costs, ~1 min on 2 CPU cores, is computation: its
64x64 grid's k-means).

Evaluations (`EVALUATIONS`; each returns metrics, info and pictures):
  discovery     Odin App. A.4: L2-normalised features, k-means for K in
                eval.discovery_ks (powers of two; K larger than the number of
                cells is dropped, so the largest K makes every cell its own
                cluster), every cluster of every K a proposal, upsampled
                (nearest) to the ground truth's resolution; ABO^i, ABO^c,
                OR^i, OR^c averaged per image then over images. The mask sets
                of eval.mask_baselines (FH / SLIC / grid, parameters from
                config.masks; a 1x1 grid becomes 5x5) are scored as proposals
                too: 'discovery/<m>/...' (DetCon Fig. 7's axis).
  instances     Instance recall (instance-segmentation analysis paper, §3):
                spectral clustering of the cosine affinity of
                eval.instance_feature ('auto': a ViT's last-block attention
                keys 'keys', as the paper; else the discovery features) for
                K in eval.spectral_ks, non-connected components split; by
                same-class co-occurrence (1, 2, ..., 6+): 'ar_*' = mean over
                IoU 0.50:0.05:0.95 of recall (the paper's mean average
                recall, the headline) and 'recall_*' = recall at IoU >= 0.5.
                Grids with more than eval.spectral_max_cells cells are
                area-pooled first (the dense affinity is (h w)^2).
  video         DINO's label propagation (video.py) on generated clips
                (`video.make_clip`: eval.video_clips clips of
                eval.video_frames frames, eval.video_objects textured shapes
                moving over a photo, at the demo resolution); J, F, J&F, F
                with the DAVIS 2017 toolkit's boundary rule.
  linear_probe  Per-pixel linear classifier on frozen features, demo classes
                (background + 5 shapes); trained on eval.probe_train_images
                scenes, mIoU on eval.probe_test_images other scenes. On the
                demo it cannot rank networks: classes are shapes with random
                photo textures and the background is another random photo,
                so neither the class nor even object-vs-background is a
                property of a cell's feature; the probe predicts background
                (mIoU ~0.13 = background IoU / 6 for trained and random
                networks alike). It is meant for datasets whose classes have
                an appearance (VOC-like).
  knn           Weighted k-NN (k=20, T=0.07) of mean-pooled features. Demo
                scenes carry no image label, so the label is the class of
                the object covering the most pixels (a weak, imbalanced
                proxy: compare with info 'knn/majority_accuracy').
  pictures      `pictures.discovery_panel` (image | instances | k-means
                segments at K = eval.picture_k | feature PCA) for the first
                eval.picture_images scenes, stacked into one PNG.

Data: held-out demo scenes (`demo.load_demo` with eval.demo_seed, 1 by
default, while training draws seed 0), only scenes with ground truth, at
config.dataset.demo_image_size (128 px in the demo / test presets).

Resolution. App. A.4 resizes central crops to 1024 px for ResNets (stage4:
a 32x32 grid; an FPN's p2: 256x256) and to 448 px for ViTs: config.eval
.image_size is 1024 by default and 448 in the ViT presets. The demo / test
presets evaluate the 128-px demo scenes at 256 px (x2, as App. A.4 scales
COCO's ~480-px crops x2.1; x2 is inside the scale range of the demo's
training views, crops of 8-100% of a scene resized to 96 px: x0.75-x2.7).
There stage4 gives 8x8 cells of 16 px of the ground truth (a demo object,
30-65 px, spans 2-4; K > 64 is dropped) and an FPN's p2 64x64. Measured on
the 32 held-out scenes (ABO^i, random init -> DetCon-B demo, 200 steps,
seed 0): stage4 at 256 px 0.319 -> 0.296, at 512 px (16x16) 0.280 ->
0.267, at 1024 px (32x32) 0.319 -> 0.258; stage3 at 256 px 0.265 -> 0.270.
No size made the demo-trained plain ResNet beat its random init, and 512 /
1024 px cost 4x / 16x on CPU (an FPN's 128x128 / 256x256 k-means most), so
the demo keeps 256. Single runs say little: the stage3 gain of the same
200-step recipe is +0.4 / +8.7 / +3.6 ABO points for seeds 0 / 1 / 2
(`bench/discovery_gain.py`); 1000 steps (seed 0) give -2.4, 160-px views
+4.5, 224-px views (stage4 7x7, the paper's map) +5.6 (EMA target +7.6),
pooling stage3 instead of stage4 +12.3 (seed 0) and +2.2 (seed 1),
model.output_stride=16 (stage4 6x6 at 96 px) -3.0 on stage4. The EMA
target network ξ (--params=target_params) gains more: +7.1 on average over
seeds 0-2 here, and +16.7 for DetCon-B with the FPN (README). On an 8x8
grid no cluster can match a demo object at IoU > 0.5 (OR^i 1-2 %,
instance recall 5 %, for trained and random networks
alike), so the demo preset sets eval.resnet_feature='stage3' (stride 16:
16x16 cells of 8 px, 4-8 across an object, the regime App. A.4's 32x32
grid is in on COCO); the paper presets keep 'stage4'. Other grids:
--config.eval.feature=stage4 or --config.eval.image_size=512.
Evaluations discovery / instances / pictures use scenes 0..num_images-1;
the probes test on scenes 0..probe_test-1 and train on the next
probe_train scenes.

TFDS (never downloaded): eval.tfds_discovery = 'coco/2017_panoptic' adds
discovery / instances on COCO val2017 (thing instances, crowd regions
dropped; Odin App. A.4: the native central square crop resized straight to
eval.image_size, 1024 for ResNets, and scored there) and
eval.tfds_video = 'davis/480p' adds DAVIS 2017 val to 'video'; metrics are
prefixed 'coco/' and 'davis/'. A dataset that is not prepared in
eval.tfds_data_dir is skipped with a message saying how to prepare it.
eval.folder_discovery = PATH adds discovery / instances / pictures on your
own images with instance-id PNG masks (evaluate/datasets.py; COCO's
protocol; prefix 'folder/'); a bad mask stops the run naming the file. TFDS
has no PASCAL VOC segmentation masks ('voc' holds boxes only), so the
linear probe runs on the demo classes only.

Settings come from config.eval (`EvalSettings` lists every field and its
default); fields missing from the config take the defaults below.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import json
import math
import os
import time
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from etils import epath

from odin_jax import checkpoint
from odin_jax.evaluate import discovery
from odin_jax.evaluate import instances
from odin_jax.evaluate import pictures
from odin_jax.evaluate import probes
from odin_jax.evaluate import video

EVALUATIONS = ("discovery", "instances", "video", "linear_probe", "knn",
               "pictures")
MASK_METHODS = ("fh", "slic", "grid", "gt", "hierarchy")
SOURCES = ("checkpoint", "random") + tuple(f"masks:{m}" for m in MASK_METHODS)
PARAM_KEYS = ("params", "target_params", "discovery_params")
# Fixed per-evaluation PRNG streams: results do not depend on `which`.
_STREAMS = {name: i + 1 for i, name in enumerate(EVALUATIONS)}
_COCO_THINGS = 80  # TFDS coco/2017_panoptic labels 0..79 are things.


@dataclasses.dataclass(frozen=True)
class EvalSettings:
  """Every config.eval field and its default (see the module docstring).

  every_steps: the training loop's period for `periodic` (0: never).
  periodic: evaluations run during training (cheap by default).
  evals: evaluations run by `python -m odin_jax.evaluate` by default.
  feature: 'auto' | 'projection' | a feature map name ('stage4', 'p2', ...);
    'auto' = `default_feature`: 'projection' with an FPN, 'tokens' for a
    ViT, 'embedding' for hiergroup, else resnet_feature.
  resnet_feature: what 'auto' clusters for a ResNet / Swin without FPN:
    'stage4', the final hidden layer (App. A.4); the demo preset: 'stage3'.
  image_size: network input side (images are resized to it); App. A.4:
    1024 for ResNets (stage4: 32x32, FPN p2: 256x256), 448 for ViTs.
  batch_size: images per jitted forward pass.
  seed: PRNG seed of k-means, spectral clustering and the probe.
  demo_seed: seed of the held-out demo scenes (training uses 0).
  num_images: scenes for discovery / instances.
  discovery_ks: k-means K's (Odin App. A.4); K > cells are dropped.
  mask_baselines: mask sets also scored by 'discovery' ('fh','slic','grid').
  spectral_ks: spectral clustering K's (instance recall).
  spectral_max_cells: larger grids are area-pooled before the affinity.
  instance_feature: what instance recall clusters: 'auto' = a ViT's 'keys'
    (last block's attention keys, the instance-segmentation paper's §3),
    else the discovery features (`feature`); or a feature map name.
  video_clips, video_frames, video_objects: generated clips.
  probe_train_images, probe_test_images, probe_steps: linear probe / k-NN.
  picture_images, picture_k: scenes and K of the discovery panel.
  tfds_discovery: '' or 'coco/2017_panoptic'; tfds_video: '' or
    'davis/480p'; tfds_data_dir: TFDS data_dir (None: TFDS default);
    tfds_num_images / tfds_num_videos: how many. COCO's native central
    square crop is resized straight to image_size, the network input, and
    scored there (Odin App. A.4).
  folder_discovery: '' or a folder of images + instance-id PNG masks
    (evaluate/datasets.py), evaluated like COCO with prefix 'folder/';
    folder_num_images: the first N images (0: all); folder_mask_encoding:
    'ids' or 'coco_rgb'; folder_background_ids: mask ids that are not
    objects.
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
  spectral_ks: tuple = instances.DEFAULT_KS
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
  final_report: bool = False
  report_cache_dir: str = ""


_FIELDS = {f.name: f for f in dataclasses.fields(EvalSettings)}


def _coerce(name: str, value):
  """A config / command-line value as the type of EvalSettings.<name>."""
  default = _FIELDS[name].default
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


def settings_from_config(config, **overrides) -> EvalSettings:
  """EvalSettings from config.eval (if any), then `overrides` (not None).

  Raises ValueError for a field EvalSettings does not know (a typo would
  otherwise be silently ignored).
  """
  values = {}
  section = config.get("eval") if hasattr(config, "get") else None
  items = list(section.items()) if section is not None else []
  items += [(k, v) for k, v in overrides.items() if v is not None]
  for name, value in items:
    if name not in _FIELDS:
      raise ValueError(f"Unknown eval setting {name!r}; known: "
                       f"{sorted(_FIELDS)}.")
    values[name] = _coerce(name, value)
  return EvalSettings(**values)


def parse_overrides(pairs: Sequence[str]) -> dict:
  """['num_images=8', 'discovery_ks=1,2,4'] -> {name: value} (coerced)."""
  out = {}
  for pair in pairs or ():
    if "=" not in pair:
      raise ValueError(f"Expected key=value, got {pair!r}.")
    name, value = pair.split("=", 1)
    name = name.strip()
    if name not in _FIELDS:
      raise ValueError(f"Unknown eval setting {name!r}; known: "
                       f"{sorted(_FIELDS)}.")
    out[name] = _coerce(name, None if value in ("None", "none") else value)
  return out


# --- Parameters -----------------------------------------------------------


def _abstract_variables(config):
  """Shapes of {'params', 'batch_stats'} of config's network (no compute)."""
  from odin_jax import step as step_lib
  from odin_jax.models import heads
  import optax
  model = heads.from_config(config)
  state = jax.eval_shape(
      lambda: step_lib.create_train_state(config, model, optax.identity(),
                                          jax.random.PRNGKey(0)))
  return {"params": state.params, "batch_stats": state.batch_stats}


# XLA:CPU spends ~60 s optimising a ResNet's init (threefry for every
# kernel) on 2 loaded cores and ~10 s without backend optimisations; init
# runs once, so it is compiled at optimisation level 0.
_INIT_COMPILER_OPTIONS = {"xla_backend_optimization_level": 0}


def init_params(config, seed: int | None = None):
  """The network at initialisation: (params, batch_stats) as host arrays.

  Uses `step.create_train_state` with the PRNG key of config.seed (default),
  i.e. the initialisation a training run with this config starts from.
  """
  from odin_jax import step as step_lib
  from odin_jax.models import heads
  import optax
  model = heads.from_config(config)
  seed = config.seed if seed is None else seed
  init = jax.jit(lambda rng: step_lib.create_train_state(
      config, model, optax.identity(), rng))
  rng = jax.random.PRNGKey(seed)
  try:
    compiled = init.lower(rng).compile(compiler_options=_INIT_COMPILER_OPTIONS)
  except Exception:  # pylint: disable=broad-except
    # A backend without this option (GPU/TPU compile fast anyway).
    compiled = init
  state = compiled(rng)
  return jax.device_get(state.params), jax.device_get(state.batch_stats)


def _check_same_structure(restored, expected, what: str, directory) -> None:
  """Raises ValueError naming the first differing path or shape."""
  flat_r = {jax.tree_util.keystr(p): np.shape(v) for p, v in
            jax.tree_util.tree_flatten_with_path(restored)[0]}
  flat_e = {jax.tree_util.keystr(p): tuple(v.shape) for p, v in
            jax.tree_util.tree_flatten_with_path(expected)[0]}
  missing = sorted(set(flat_e) - set(flat_r))
  extra = sorted(set(flat_r) - set(flat_e))
  shapes = sorted(k for k in set(flat_e) & set(flat_r)
                  if tuple(flat_e[k]) != tuple(flat_r[k]))
  if missing or extra or shapes:
    detail = "; ".join(
        f"{name}: {items[:3]}{' ...' if len(items) > 3 else ''}"
        for name, items in (("missing", missing), ("unexpected", extra),
                            ("shape differs", shapes)) if items)
    raise ValueError(
        f"The {what} in {directory} do not fit the network of this config "
        f"({detail}). Evaluate with the config the run was trained with "
        "(same model.* fields).")


def restore_checkpoint(workdir: str, step: int | None = None, *,
                       with_state: bool = True):
  """(state, meta, step) of a checkpoint as host numpy arrays: see
  `odin_jax.checkpoint.read`, the one reader shared with training and
  export (URL-aware; falls back past an unreadable newest step)."""
  return checkpoint.read(workdir, step, with_state=with_state)


def load_params(config, workdir: str, step: int | None = None,
                params_key: str = "params"):
  """Network parameters of a checkpoint: (params, batch_stats, step).

  Restores workdir/checkpoints/<step> (the newest readable if None; see
  `checkpoint.read`) as host numpy arrays whatever devices wrote it,
  without needing the TrainState structure of the code that wrote it (only params_key and batch_stats are kept, and
  checked against the network `config` describes).

  Args:
    config: the run's config (its model.* fields define the network).
    workdir: the training workdir (a local path or a URL, gs://...).
    step: checkpoint step; None = the newest readable.
    params_key: 'params' (online θ), 'target_params' (EMA ξ) or
      'discovery_params' (Odin's τ).
  Raises:
    FileNotFoundError: no checkpoint; ValueError: unknown step, a missing or
    empty params_key, or parameters that do not fit the network.
  """
  if params_key not in PARAM_KEYS:
    raise ValueError(f"params_key must be one of {PARAM_KEYS}, got "
                     f"{params_key!r}.")
  directory = checkpoint.checkpoint_dir(workdir)
  try:
    state, meta, step = checkpoint.read(workdir, step)
  except FileNotFoundError as e:
    raise FileNotFoundError(f"{e} Or evaluate --source=random.") from None
  _warn_config_differences(meta, config, directory)
  params = state.get(params_key)
  if not params:
    raise ValueError(f"The checkpoint at step {step} in {directory} has no "
                     f"{params_key!r} (keys: {sorted(state)}).")
  batch_stats = state.get("batch_stats", {})
  expected = _abstract_variables(config)
  _check_same_structure(params, expected["params"], params_key, directory)
  _check_same_structure(batch_stats, expected["batch_stats"], "batch_stats",
                        directory)
  logging.info("Loaded %s of step %d from %s.", params_key, step, directory)
  return params, batch_stats, step


def _warn_config_differences(meta: dict, config, directory) -> None:
  """Logs model.* fields that differ from the checkpoint's own config."""
  try:
    saved = json.loads(meta["config"]).get("model", {})
  except (KeyError, TypeError, ValueError):
    return
  now = json.loads(config.to_json()).get("model", {})
  diffs = sorted(k for k in set(saved) & set(now) if saved[k] != now[k])
  if diffs:
    logging.warning("model.%s differ from the config saved in %s: %s vs %s.",
                    diffs, directory, [now[k] for k in diffs],
                    [saved[k] for k in diffs])


# --- Features -------------------------------------------------------------


def default_feature(config, resnet_feature: str | None = None) -> str:
  """The features eval.feature='auto' clusters (Odin App. A.4).

  'projection' (the FPN projections z) with an FPN; else the final hidden
  layer h: 'tokens' for a ViT, eval.resnet_feature ('stage4', stride 32)
  for a ResNet or a Swin (same strides); 'embedding' (its 32-d per-pixel
  embedding, stride 4) for hiergroup. resnet_feature, when given, replaces
  config.eval.resnet_feature (an `EvalSettings` override).
  """
  if config.model.get("backbone", "resnet") == "vit":
    return "tokens"
  if config.loss.name == "hiergroup":   # the learnt per-pixel embedding F
    return "embedding"
  if config.model.get("fpn_channels", 0):
    return "projection"
  if resnet_feature is None:
    resnet_feature = settings_from_config(config).resnet_feature
  return resnet_feature


_FEATURE_FNS: dict = {}


def _feature_fn(config, model_json: str, feature: str, image_hw):
  """jit(variables, uint8 images [B, H, W, 3]) -> float32 [B, h, w, D].

  Cached per (model config, feature, input size): periodic evaluations
  during training reuse one traced function.
  """
  key = (model_json, feature, image_hw)
  if key in _FEATURE_FNS:
    return _FEATURE_FNS[key]
  from odin_jax.models import heads
  model = heads.from_config(config)

  def apply(variables, images):
    x = images.astype(jnp.float32) / 255.0
    if image_hw is not None and tuple(x.shape[1:3]) != tuple(image_hw):
      x = jax.image.resize(x, (x.shape[0], *image_hw, 3), "bilinear",
                           antialias=True)
    if feature == "projection":
      out = model.apply(variables, x, train=False,
                        method=model.dense_projection)
    else:
      maps = model.apply(variables, x, train=False, method=model.feature_maps)
      if feature not in maps:
        raise ValueError(f"Feature {feature!r} is not a map of this network "
                         f"(maps: {sorted(maps)}, or 'projection').")
      out = maps[feature]
    return out.astype(jnp.float32)

  _FEATURE_FNS[key] = jax.jit(apply)
  return _FEATURE_FNS[key]


class FeatureSource:
  """Frozen features of a network: uint8 images -> float32 [N, h, w, D].

  Images [N, H, W, 3] uint8 are scaled to [0, 1], resized bilinearly to
  image_size x image_size (None: kept), and run in batches of batch_size
  (the last batch padded, so one compilation serves every call).
  """

  def __init__(self, config, params, batch_stats, feature: str = "auto",
               image_size: int | None = None, batch_size: int = 16,
               resnet_feature: str | None = None):
    self.feature = (default_feature(config, resnet_feature)
                    if feature == "auto" else feature)
    self.image_size = image_size
    self.batch_size = int(batch_size)
    self._config = config
    # What heads.from_config builds from: model.*, and the hiergroup head.
    self._model_json = json.dumps(
        {k: v for k, v in json.loads(config.to_json()).items()
         if k in ("model", "hiergroup")} | {"loss": config.loss.name},
        sort_keys=True)
    # Host copies: the evaluation runs on one device whatever the mesh.
    self._variables = jax.device_get({"params": params,
                                      "batch_stats": batch_stats})

  def __call__(self, images, image_size: int | Sequence[int] | None = -1
               ) -> np.ndarray:
    """images uint8 [N, H, W, 3] -> float32 [N, h, w, D].

    image_size: network input side or (H, W); -1 = self.image_size;
    None = the images' own size.
    """
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[-1] != 3:
      raise ValueError(f"images must be [N, H, W, 3], got {images.shape}")
    size = self.image_size if image_size == -1 else image_size
    if size is not None and np.ndim(size) == 0:
      size = (int(size), int(size))
    fn = _feature_fn(self._config, self._model_json, self.feature,
                     None if size is None else tuple(int(s) for s in size))
    out = []
    for start in range(0, len(images), self.batch_size):
      batch = images[start:start + self.batch_size]
      n = len(batch)
      if n < self.batch_size:
        batch = np.concatenate(
            [batch, np.repeat(batch[-1:], self.batch_size - n, axis=0)])
      out.append(np.asarray(fn(self._variables, jnp.asarray(batch)))[:n])
    if not out:
      raise ValueError("no images")
    return np.concatenate(out)


# --- Data -----------------------------------------------------------------


@dataclasses.dataclass(frozen=True, eq=False)
class Scenes:
  """Evaluation images with exact ground truth.

  images uint8 [N, S, S, 3]; instances int32 [N, S, S] (0 = background);
  classes int32 [N, S, S] (0 = background, 1..C); class_names (C names);
  segments(method) -> int32 [N, S, S] mask set of the same images.
  """
  images: np.ndarray
  instances: np.ndarray
  classes: np.ndarray
  class_names: tuple
  segments: Callable[[str], np.ndarray]


def _baseline_mask_config(config, method: str):
  """config.masks with `method`; a 1x1 grid (global mask) becomes 5x5."""
  import ml_collections
  mask_config = ml_collections.ConfigDict(config.masks.to_dict())
  mask_config.method = method
  if method == "grid" and int(mask_config.grid_size) < 2:
    mask_config.grid_size = 5
  return mask_config


def demo_scenes(config, num_scenes: int, seed: int) -> Scenes:
  """The first num_scenes held-out demo scenes (all with ground truth)."""
  from odin_jax.data import demo
  d = config.dataset
  data = demo.load_demo(num_scenes=int(num_scenes),
                        image_size=int(d.demo_image_size), seed=int(seed),
                        cache_dir=d.cache_dir)
  keep = np.flatnonzero(data.has_gt)[:num_scenes]

  @functools.lru_cache(maxsize=None)
  def segments(method: str) -> np.ndarray:
    if method not in MASK_METHODS:
      raise ValueError(f"mask method must be one of {MASK_METHODS}, got "
                       f"{method!r}")
    maps = demo.demo_segments(data, _baseline_mask_config(config, method),
                              cache_dir=d.cache_dir)
    return maps[keep]

  return Scenes(data.images[keep], data.instances[keep], data.classes[keep],
                tuple(data.class_names), segments)


# --- Evaluations ----------------------------------------------------------


@dataclasses.dataclass
class Output:
  """What one evaluation returns.

  metrics: {name: float} (TensorBoard and the table); info: JSON-able
  details (counts, per-class values); pictures: {name: uint8 [H, W, 3]}.
  """
  metrics: dict = dataclasses.field(default_factory=dict)
  info: dict = dataclasses.field(default_factory=dict)
  pictures: dict = dataclasses.field(default_factory=dict)


class _Context:
  """Shared state of one `evaluate` call: settings, source, cached data."""

  def __init__(self, config, settings: EvalSettings,
               features: FeatureSource | None, mask_method: str | None):
    self.config = config
    self.settings = settings
    self.features = features
    self.mask_method = mask_method
    self.key = jax.random.PRNGKey(settings.seed)
    self._scenes = None
    self._scene_features = None

  def stream(self, name: str):
    return jax.random.fold_in(self.key, _STREAMS[name])

  def scenes(self, n: int) -> Scenes:
    """The first n evaluation scenes (one pool, loaded once per call)."""
    s = self.settings
    pool = max(n, s.num_images, s.picture_images,
               s.probe_train_images + s.probe_test_images
               if {"linear_probe", "knn"} & set(s.evals) else 0)
    if self._scenes is None or len(self._scenes.images) < n:
      self._scenes = demo_scenes(self.config, max(pool, n), s.demo_seed)
    sc = self._scenes
    return Scenes(sc.images[:n], sc.instances[:n], sc.classes[:n],
                  sc.class_names, lambda m: sc.segments(m)[:n])

  def scene_features(self, n: int) -> np.ndarray:
    """Features [n, h, w, D] of the first n scenes (computed once)."""
    cached = self._scene_features
    if cached is None or len(cached) < n:
      images = self.scenes(n).images
      start = 0 if cached is None else len(cached)
      new = self.features(images[start:n])
      self._scene_features = new if cached is None else np.concatenate(
          [cached, new])
    return self._scene_features[:n]

  def ks(self, grid_hw) -> tuple:
    cells = int(grid_hw[0]) * int(grid_hw[1])
    ks = tuple(sorted({int(k) for k in self.settings.discovery_ks
                       if 1 <= int(k) <= cells}))
    return ks or (min(cells, 1),)


def _gt(scenes: Scenes, i: int):
  return discovery.instance_masks_from_maps(scenes.instances[i],
                                            scenes.classes[i])


def _score_discovery(scenes: Scenes, maps, acc=None) -> dict:
  """maps int [N, S', H, W] (S' segmentations per image) -> mean metrics
  (over these images, or everything `acc` has seen when one is passed)."""
  acc = acc if acc is not None else discovery.DiscoveryAccumulator()
  for i in range(len(maps)):
    masks, classes = _gt(scenes, i)
    acc.update(masks, classes, segment_maps=maps[i])
  return acc.result()


def _discovery_metrics(prefix: str, result: dict) -> tuple[dict, dict]:
  metrics = {f"{prefix}/{k}": float(result[k]) for k in discovery.METRIC_KEYS}
  return metrics, {f"{prefix}/num_images": int(result["num_images"])}


def _l2_rows(x: np.ndarray) -> np.ndarray:
  return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def _batched_kmeans(points, ks: Sequence[int], key, batch_size: int,
                    k_max: int | None = None,
                    num_iters: int = 20) -> np.ndarray:
  """k-means of every image for every K with one compiled program.

  points float [N, P, D]; K number i uses fold_in(key, i) (as
  `discovery.kmeans_segmentations`), batch b of it fold_in(., b's first
  image index). The program is compiled for k_max (default max(ks)) and a
  batch of batch_size images; smaller K run as `num_active` (traced), the
  last batch is padded. Deterministic given (points, ks, key, batch_size).
  Returns int32 [N, len(ks), P] with labels of map i in [0, ks[i]).
  """
  from odin_jax.discovery.kmeans import kmeans
  points = np.asarray(points, np.float32)
  n = len(points)
  k_max = max(int(k) for k in ks) if k_max is None else int(k_max)
  out = np.zeros((n, len(ks), points.shape[1]), np.int32)
  for i, k in enumerate(ks):
    key_i = jax.random.fold_in(key, i)
    for start in range(0, n, batch_size):
      batch = points[start:start + batch_size]
      m = len(batch)
      if m < batch_size:
        batch = np.concatenate([batch, np.repeat(batch[-1:], batch_size - m,
                                                 axis=0)])
      assign, _ = kmeans(batch, k_max, jax.random.fold_in(key_i, start),
                         num_iters=num_iters, num_active=int(k))
      out[start:start + m, i] = np.asarray(assign)[:m]
  return out


def _kmeans_maps(ctx: _Context, features, ks: Sequence[int], key,
                 image_hw) -> np.ndarray:
  """Odin App. A.4 segmentations: k-means of L2-normalised features.

  features float [N, h, w, D] -> int32 [N, len(ks), H, W] (nearest
  upsampling to image_hw). Compiled once per grid size (K_max = the
  largest usable discovery K).
  """
  features = np.asarray(features, np.float32)
  n, h, w, d = features.shape
  points = _l2_rows(features.reshape(n, h * w, d))
  k_max = max(ctx.ks((h, w)))
  ks = tuple(ks)
  if max(ks) > k_max:
    raise ValueError(f"K {max(ks)} > {k_max}")
  maps = _batched_kmeans(points, ks, key, ctx.settings.batch_size, k_max)
  maps = maps.reshape(n, len(ks), h, w)
  return discovery.resize_nearest(maps, image_hw)


def _spectral_maps(ctx: _Context, features, key, image_hw) -> np.ndarray:
  """Spectral clusterings, components split (instance-recall protocol).

  The protocol of `instances.instance_segmentations` (NJW embedding of the
  cosine affinity, rows normalised, k-means for each K, 8-connected
  components split, nearest upsampling), with every image and K clustered
  by one compiled k-means: the K-column embedding is zero-padded to K_max
  columns (zero columns change no distance) and K runs as num_active.

  features float [N, h, w, D] (already pooled) -> int32 [N, len(ks), H, W].
  """
  s = ctx.settings
  features = np.asarray(features, np.float32)
  n, h, w, _ = features.shape
  ks = [min(int(k), h * w) for k in s.spectral_ks]
  k_max = max(ks)
  rows = np.zeros((n, len(ks), h * w, k_max), np.float32)
  for b in range(n):
    emb = instances.spectral_embedding(
        instances.cosine_affinity(features[b]), k_max)
    for i, k in enumerate(ks):
      rows[b, i, :, :k] = _l2_rows(emb[:, :k])
  maps = np.zeros((n, len(ks), h, w), np.int32)
  for i, k in enumerate(ks):
    # One k-means call per K over all images (padding K to K_max).
    assign = _batched_kmeans(rows[:, i], (k,), jax.random.fold_in(key, i),
                             s.batch_size, k_max, num_iters=30)
    maps[:, i] = assign[:, 0].reshape(n, h, w)
  maps = np.stack([np.stack([instances.split_components(m) for m in per])
                   for per in maps])
  return discovery.resize_nearest(maps, image_hw)


def eval_discovery(ctx: _Context) -> Output:
  """Object discovery (Odin App. A.4) on the demo scenes (+ mask sets)."""
  s = ctx.settings
  scenes = ctx.scenes(s.num_images)
  hw = scenes.instances.shape[1:]
  out = Output()
  if ctx.features is not None:
    feats = ctx.scene_features(s.num_images)
    ks = ctx.ks(feats.shape[1:3])
    maps = _kmeans_maps(ctx, feats, ks, ctx.stream("discovery"), hw)
    out.info.update({"discovery/ks": list(ks),
                     "discovery/grid": list(feats.shape[1:3]),
                     "discovery/num_proposals": int(sum(ks)),
                     "discovery/feature": ctx.features.feature})
    baselines = tuple(s.mask_baselines)
  else:
    maps = scenes.segments(ctx.mask_method)[:, None]
    baselines = ()
  metrics, info = _discovery_metrics("discovery", _score_discovery(scenes,
                                                                   maps))
  out.metrics.update(metrics)
  out.info.update(info)
  for method in baselines:
    result = _score_discovery(scenes, scenes.segments(method)[:, None])
    metrics, info = _discovery_metrics(f"discovery/{method}", result)
    out.metrics.update(metrics)
    out.info.update(info)
  return out


def _pool_cells(features, max_cells: int) -> np.ndarray:
  """Area-pools [h, w, D] by the smallest integer factor that leaves at most
  max_cells cells (unchanged if already small enough)."""
  h, w = features.shape[:2]
  factor = 1
  while math.ceil(h / factor) * math.ceil(w / factor) > max_cells:
    factor += 1
  if factor == 1:
    return features
  oh, ow = math.ceil(h / factor), math.ceil(w / factor)
  rows = discovery.area_matrix(oh, h)
  cols = discovery.area_matrix(ow, w)
  return np.einsum("iy,yxd,jx->ijd", rows, features, cols).astype(np.float32)


def _score_instances(prefix: str, scenes: Scenes, maps_fn,
                     acc=None) -> Output:
  """Adds scenes' instances (proposals maps_fn(i) int [S', H, W]) to acc
  (default: a new one) and returns the metrics of everything acc holds:
  '<prefix>/ar_<col>' (AR over IoU 0.5:0.95, the headline) and
  '<prefix>/recall_<col>' (R@0.5), col in 1..5, 6+, all."""
  acc = acc if acc is not None else instances.InstanceRecallAccumulator()
  for i in range(len(scenes.images)):
    masks, classes = _gt(scenes, i)
    acc.update(masks, classes, segment_maps=maps_fn(i))
  result = acc.result()
  out = Output()
  # Columns without any instance (NaN) go to info only, not to the curves.
  for kind in ("ar", "recall"):
    for name in instances.CO_OCCURRENCE_BINS + ("all",):
      value = float(result[f"{kind}_{name}"])
      if math.isfinite(value):
        out.metrics[f"{prefix}/{kind}_{name}"] = value
  for name in instances.CO_OCCURRENCE_BINS:
    out.info[f"{prefix}/count_{name}"] = int(result[f"count_{name}"])
  return out


def instance_feature(ctx: _Context) -> str:
  """The feature instance recall clusters (eval.instance_feature): 'auto' =
  a ViT's last-block attention keys ('keys', the paper's §3), else the
  discovery features."""
  name = ctx.settings.instance_feature
  if name != "auto":
    return name
  if ctx.config.model.get("backbone", "resnet") == "vit":
    return "keys"
  return ctx.features.feature


def _instance_features(ctx: _Context, images, discovery_feats=None):
  """Features [N, h, w, D] for instance recall: discovery_feats (or the
  scenes' cached ones) when the feature is the same, else another pass of
  the same network (a copy of ctx.features naming the other map)."""
  feature = instance_feature(ctx)
  if feature == ctx.features.feature:
    if discovery_feats is not None:
      return discovery_feats
    return ctx.features(images)
  source = copy.copy(ctx.features)
  source.feature = feature
  return source(images)


def _instance_maps(ctx: _Context, feats, key, image_hw):
  """Pooled spectral proposals int32 [N, len(spectral_ks), H, W] of feats
  [N, h, w, D], and the pooled grid (h', w')."""
  s = ctx.settings
  pooled = np.stack([_pool_cells(f, s.spectral_max_cells) for f in feats])
  return _spectral_maps(ctx, pooled, key, image_hw), pooled.shape[1:3]


def eval_instances(ctx: _Context) -> Output:
  """Instance recall by same-class co-occurrence (spectral clustering)."""
  s = ctx.settings
  scenes = ctx.scenes(s.num_images)
  hw = scenes.instances.shape[1:]
  if ctx.features is not None:
    same = instance_feature(ctx) == ctx.features.feature
    feats = _instance_features(
        ctx, scenes.images,
        ctx.scene_features(s.num_images) if same else None)
    maps, grid = _instance_maps(ctx, feats, ctx.stream("instances"), hw)
    out = _score_instances("instances", scenes, lambda i: maps[i])
    out.info["instances/grid"] = list(grid)
    out.info["instances/ks"] = list(s.spectral_ks)
    out.info["instances/feature"] = instance_feature(ctx)
    return out
  segs = scenes.segments(ctx.mask_method)
  return _score_instances(
      "instances", scenes,
      lambda i: instances.split_components(segs[i])[None])


def _skip(ctx: _Context, name: str) -> Output | None:
  if ctx.features is None:
    logging.info("Skipping %s for masks:%s: a mask set has no features.",
                 name, ctx.mask_method)
    return None
  return Output()


def eval_video(ctx: _Context) -> Output | None:
  """Label propagation J / F / J&F on generated clips (+ DAVIS if set)."""
  out = _skip(ctx, "video")
  if out is None:
    return None
  s = ctx.settings
  size = int(ctx.config.dataset.demo_image_size)
  if s.video_clips < 1:
    raise ValueError("video_clips must be >= 1")
  acc = video.VideoAccumulator()
  for c in range(s.video_clips):
    clip = video.make_clip(seed=1000 * s.demo_seed + c,
                           num_frames=s.video_frames, image_size=size,
                           num_objects=s.video_objects,
                           max_speed=size / 32)
    feats = ctx.features(clip.frames)
    pred = video.propagate_video(feats, clip.masks[0],
                                 num_labels=s.video_objects + 1,
                                 image_hw=(size, size))
    acc.add(video.evaluate_video(pred, clip.masks))
  result = acc.result()
  out.metrics.update({f"video/{k}": float(result[k])
                      for k in ("J_mean", "F_mean", "JF_mean")})
  out.info["video/num_objects"] = int(result["num_objects"])
  out.info["video/grid"] = list(feats.shape[1:3])
  if s.tfds_video:
    davis = _davis_video(ctx)
    if davis is not None:
      out.metrics.update(davis.metrics)
      out.info.update(davis.info)
  return out


def _probe_split(ctx: _Context):
  s = ctx.settings
  n_test, n_train = s.probe_test_images, s.probe_train_images
  if n_test < 1 or n_train < 1:
    raise ValueError("probe_train_images and probe_test_images must be >= 1")
  scenes = ctx.scenes(n_test + n_train)
  feats = ctx.scene_features(n_test + n_train)
  test, train = slice(0, n_test), slice(n_test, n_test + n_train)
  return scenes, feats, train, test


def eval_linear_probe(ctx: _Context) -> Output | None:
  """Linear per-pixel probe mIoU on the demo classes."""
  out = _skip(ctx, "linear_probe")
  if out is None:
    return None
  scenes, feats, train, test = _probe_split(ctx)
  num_classes = len(scenes.class_names) + 1
  result = probes.linear_probe_miou(
      feats[train], scenes.classes[train], feats[test], scenes.classes[test],
      num_classes, key=ctx.stream("linear_probe"),
      num_steps=ctx.settings.probe_steps)
  out.metrics["linear_probe/miou"] = float(result["miou"])
  out.metrics["linear_probe/pixel_accuracy"] = float(
      result["pixel_accuracy"])
  out.info["linear_probe/per_class_iou"] = dict(zip(
      ("background",) + tuple(scenes.class_names),
      [_json_float(v) for v in result["per_class_iou"]]))
  out.info["linear_probe/final_loss"] = float(result["final_loss"])
  return out


def dominant_class(class_maps) -> np.ndarray:
  """Image label of each scene: the object class covering most pixels.

  class_maps: int [N, H, W] (0 = background). Returns int [N] in 1..C (0 for
  a scene without objects); ties go to the smaller class id.
  """
  class_maps = np.asarray(class_maps)
  num = int(class_maps.max(initial=0)) + 1
  counts = np.stack([np.bincount(c.reshape(-1), minlength=num)
                     for c in class_maps])
  counts[:, 0] = 0
  labels = counts.argmax(axis=1)
  return np.where(counts.max(axis=1) > 0, labels, 0)


def eval_knn(ctx: _Context) -> Output | None:
  """k-NN accuracy of pooled features on each scene's dominant class."""
  out = _skip(ctx, "knn")
  if out is None:
    return None
  scenes, feats, train, test = _probe_split(ctx)
  labels = dominant_class(scenes.classes)
  num_classes = len(scenes.class_names) + 1
  pooled = probes.pool_features(feats)
  out.metrics["knn/accuracy"] = probes.knn_accuracy(
      pooled[train], labels[train], pooled[test], labels[test], num_classes)
  majority = np.bincount(labels[train], minlength=num_classes).argmax()
  out.info["knn/majority_accuracy"] = float((labels[test] == majority).mean())
  return out


def _onehot_features(segments) -> np.ndarray:
  """int [H, W] -> float32 [H, W, L] (so a mask set has a 'feature' PCA)."""
  segments = np.asarray(segments)
  labels = np.unique(segments)
  return (segments[..., None] == labels).astype(np.float32)


def eval_pictures(ctx: _Context) -> Output:
  """image | instances | segments | feature PCA for the first scenes."""
  s = ctx.settings
  n = s.picture_images
  scenes = ctx.scenes(n)
  hw = scenes.instances.shape[1:]
  if ctx.features is not None:
    feats = ctx.scene_features(n)
    k = min(int(s.picture_k), max(ctx.ks(feats.shape[1:3])))
    segs = _kmeans_maps(ctx, feats, (k,), ctx.stream("pictures"), hw)[:, 0]
  else:
    segs = scenes.segments(ctx.mask_method)
    feats = [_onehot_features(m) for m in segs]
  panels = [pictures.discovery_panel(scenes.images[i], scenes.instances[i],
                                     segs[i], feats[i]) for i in range(n)]
  return Output(pictures={"discovery": pictures.stack_rows(panels)})


_EVAL_FNS = {"discovery": eval_discovery, "instances": eval_instances,
             "video": eval_video, "linear_probe": eval_linear_probe,
             "knn": eval_knn, "pictures": eval_pictures}


# --- TFDS datasets (only when prepared; never downloaded) -----------------


def tfds_prepared(name: str, data_dir) -> tuple[bool, str]:
  """(prepared?, message) for a TFDS dataset, without downloading.

  TFDS keeps a prepared dataset under <data_dir>/<name>/<version>; when that
  directory is absent the answer is no without importing TFDS (whose first
  `builder` call imports every dataset module: ~20 s on 2 cores).
  """
  root = data_dir or os.environ.get("TFDS_DATA_DIR") or os.path.join(
      os.path.expanduser("~"), "tensorflow_datasets")
  where = data_dir or f"the default TFDS data_dir ({root})"
  message = (f"TFDS {name!r} is not prepared in {where}; skipping it. "
             f"Prepare it with `tfds build {name} --data_dir=<dir>` and set "
             "--config.eval.tfds_data_dir=<dir>.")
  if not os.path.isdir(os.path.join(root, *name.split("/"))):
    return False, message
  try:
    import tensorflow_datasets as tfds
    builder = tfds.builder(name, data_dir=data_dir)
  except Exception as e:  # pylint: disable=broad-except
    first_line = str(e).splitlines()[0] if str(e) else ""
    return False, f"TFDS {name!r}: {type(e).__name__}: {first_line}"
  if builder.is_prepared():
    return True, ""
  return False, message


def _tfds_examples(name: str, split: str, data_dir, count: int):
  """numpy examples of a prepared TFDS split (the first `count`, or all of
  a smaller split: TFDS rejects a slice past the split's end)."""
  import tensorflow_datasets as tfds
  from odin_jax.data import pipeline
  pipeline.hide_accelerators_from_tf()
  builder = tfds.builder(name, data_dir=data_dir)
  count = min(int(count), builder.info.splits[split].num_examples)
  return tfds.as_numpy(builder.as_dataset(split=f"{split}[:{count}]",
                                          shuffle_files=False))


def _center_square(array, size: int, order: int):
  """Central square crop resized to size x size (order 0: labels)."""
  from skimage import transform
  h, w = array.shape[:2]
  side = min(h, w)
  top, left = (h - side) // 2, (w - side) // 2
  crop = array[top:top + side, left:left + side]
  if order == 0:
    idx = np.minimum(((np.arange(size) + 0.5) * side / size).astype(int),
                     side - 1)
    return crop[idx[:, None], idx[None, :]]
  out = transform.resize(crop, (size, size), order=order, anti_aliasing=True,
                         preserve_range=True)
  return np.clip(out + 0.5, 0, 255).astype(np.uint8)


def coco_panoptic_instances(example: dict):
  """Thing instances of a TFDS coco/2017_panoptic example.

  Returns (instance map int32 [H, W], 0 = none, 1..G; class map int32
  [H, W], 0 = none, 1 + thing label). Crowd regions are dropped.
  """
  pan = example["panoptic_image"].astype(np.int64)
  ids = pan[..., 0] + 256 * pan[..., 1] + 65536 * pan[..., 2]
  objects = example["panoptic_objects"]
  inst = np.zeros(ids.shape, np.int32)
  cls = np.zeros(ids.shape, np.int32)
  g = 0
  for seg_id, label, crowd in zip(objects["id"], objects["label"],
                                  objects["is_crowd"]):
    if crowd or int(label) >= _COCO_THINGS:
      continue
    mask = ids == int(seg_id)
    if mask.any():
      g += 1
      inst[mask] = g
      cls[mask] = int(label) + 1
  return inst, cls


# COCO images held in memory at once (at 1024 px: 3 MB of pixels and 8 MB of
# instance / class maps per image, plus its features).
_COCO_CHUNK = 32


def _coco_scene_chunks(ctx: _Context, chunk: int = _COCO_CHUNK):
  """COCO val2017 thing instances as Scenes, `chunk` images at a time.

  Odin App. A.4: the native central square crop of each image is resized
  straight to eval.image_size (the network input: 1024 for ResNets, 448
  for ViTs), image bilinear and instance / class maps nearest, and the
  masks are scored at that size. Images without a thing instance in the
  crop are skipped. Yields nothing (after a warning) when the dataset is
  not prepared or not coco/2017_panoptic.
  """
  s = ctx.settings
  ok, message = tfds_prepared(s.tfds_discovery, s.tfds_data_dir)
  if not ok:
    logging.warning(message)
    return
  if not s.tfds_discovery.startswith("coco/") or "panoptic" not in \
      s.tfds_discovery:
    logging.warning("tfds_discovery=%r: only coco/2017_panoptic (instance "
                    "masks) is supported; skipping.", s.tfds_discovery)
    return
  examples = ((ex["image"], *coco_panoptic_instances(ex))
              for ex in _tfds_examples(s.tfds_discovery, "validation",
                                       s.tfds_data_dir, s.tfds_num_images))
  yield from _square_scene_chunks(
      examples, int(s.image_size), chunk,
      tuple(str(i) for i in range(1, _COCO_THINGS + 1)))


def _no_segments(method):
  raise ValueError(f"mask set {method!r}: mask sets are computed for the "
                   "demo scenes only")


def _square_scene_chunks(examples, size: int, chunk: int,
                         class_names: tuple):
  """(image uint8 [H, W, 3], instances int [H, W], classes int [H, W]) at
  native size -> Scenes of `chunk` central square crops resized to size
  (Odin App. A.4: image bilinear, maps nearest). Crops without an instance
  are skipped."""
  images, insts, classes = [], [], []

  def scenes():
    return Scenes(np.stack(images), np.stack(insts), np.stack(classes),
                  class_names, _no_segments)

  for image, inst, cls in examples:
    inst = _center_square(inst, size, 0)
    if inst.max() == 0:
      continue
    images.append(_center_square(image, size, 1))
    insts.append(inst)
    classes.append(_center_square(cls, size, 0))
    if len(images) == chunk:
      yield scenes()
      images, insts, classes = [], [], []
  if images:
    yield scenes()


def _coco_scenes(ctx: _Context) -> Scenes | None:
  """All COCO scenes of `_coco_scene_chunks` in one Scenes (None if none)."""
  chunks = list(_coco_scene_chunks(ctx))
  if not chunks:
    return None
  return Scenes(*(np.concatenate([getattr(c, f) for c in chunks])
                  for f in ("images", "instances", "classes")),
                chunks[0].class_names, chunks[0].segments)


def eval_coco(ctx: _Context, which: Sequence[str]) -> Output | None:
  """discovery / instances on COCO val2017 (coco/ prefix), if prepared."""
  if ctx.features is None:
    return None
  which = [w for w in which if w != "pictures"]  # COCO: metrics only
  out = _eval_scene_chunks(ctx, which, "coco", _coco_scene_chunks(ctx))
  if out is None:
    logging.warning("No COCO image with a thing instance; skipping.")
  return out


def _folder_scene_chunks(ctx: _Context, chunk: int = _COCO_CHUNK):
  """eval.folder_discovery's images and instance masks (evaluate/
  datasets.py) as Scenes, by COCO's protocol (`_square_scene_chunks`)."""
  from odin_jax.evaluate import datasets
  s = ctx.settings
  examples = ((image, inst, (inst > 0).astype(np.int32))
              for _, image, inst in datasets.folder_examples(
                  s.folder_discovery, s.folder_num_images,
                  s.folder_mask_encoding, s.folder_background_ids))
  yield from _square_scene_chunks(examples, int(s.image_size), chunk,
                                  ("object",))


def eval_folder(ctx: _Context, which: Sequence[str]) -> Output | None:
  """discovery / instances / pictures on eval.folder_discovery (folder/
  prefix): your own images with instance-id PNG masks."""
  if ctx.features is None:
    logging.warning("eval.folder_discovery needs a network (--source="
                    "checkpoint or random); skipped for masks:%s.",
                    ctx.mask_method)
    return None
  out = _eval_scene_chunks(ctx, which, "folder", _folder_scene_chunks(ctx))
  if out is None:
    raise ValueError(f"eval.folder_discovery={ctx.settings.folder_discovery}"
                     ": no image has an instance (a mask id outside "
                     f"eval.folder_background_ids="
                     f"{ctx.settings.folder_background_ids}) in its central "
                     "square crop.")
  return out


def _eval_scene_chunks(ctx: _Context, which: Sequence[str], prefix: str,
                       chunks) -> Output | None:
  """discovery / instances (and 'pictures': the first chunk's first
  picture_images panels) of Scenes `chunks`, metrics '<prefix>/...'.

  Scored at eval.image_size chunk by chunk: chunk c clusters with
  fold_in(stream, c). None when `chunks` is empty.
  """
  disc_acc = discovery.DiscoveryAccumulator()
  inst_acc = instances.InstanceRecallAccumulator()
  out = Output()
  num_chunks = 0
  for c, scenes in enumerate(chunks):
    num_chunks += 1
    hw = scenes.instances.shape[1:]
    feats = ctx.features(scenes.images)
    if "discovery" in which:
      ks = ctx.ks(feats.shape[1:3])
      maps = _kmeans_maps(ctx, feats, ks,
                          jax.random.fold_in(ctx.stream("discovery"), c), hw)
      metrics, info = _discovery_metrics(
          f"{prefix}/discovery", _score_discovery(scenes, maps, disc_acc))
      out.metrics.update(metrics)
      out.info.update(info)
    if "instances" in which:
      inst_feats = _instance_features(ctx, scenes.images, feats)
      maps, grid = _instance_maps(
          ctx, inst_feats, jax.random.fold_in(ctx.stream("instances"), c), hw)
      sub = _score_instances(f"{prefix}/instances", scenes, lambda i: maps[i],
                             inst_acc)
      out.metrics.update(sub.metrics)
      out.info.update(sub.info)
      out.info[f"{prefix}/instances/grid"] = list(grid)
      out.info[f"{prefix}/instances/feature"] = instance_feature(ctx)
    if "pictures" in which and c == 0:
      n = min(int(ctx.settings.picture_images), len(scenes.images))
      k = min(int(ctx.settings.picture_k), max(ctx.ks(feats.shape[1:3])))
      segs = _kmeans_maps(ctx, feats[:n], (k,), ctx.stream("pictures"),
                          hw)[:, 0]
      panels = [pictures.discovery_panel(scenes.images[i],
                                         scenes.instances[i], segs[i],
                                         feats[i]) for i in range(n)]
      out.pictures[f"{prefix}/discovery"] = pictures.stack_rows(panels)
  if num_chunks == 0:
    return None
  out.info[f"{prefix}/image_size"] = int(ctx.settings.image_size)
  return out


def _davis_video(ctx: _Context) -> Output | None:
  """DAVIS 2017 val label propagation (davis/ prefix), if prepared."""
  s = ctx.settings
  ok, message = tfds_prepared(s.tfds_video, s.tfds_data_dir)
  if not ok:
    logging.warning(message)
    return None
  acc = video.VideoAccumulator()
  for ex in _tfds_examples(s.tfds_video, "validation", s.tfds_data_dir,
                           s.tfds_num_videos):
    frames = np.asarray(ex["video"]["frames"])
    masks = np.asarray(ex["video"]["segmentations"])[..., 0].astype(np.int32)
    feats = ctx.features(frames, image_size=None)  # native resolution
    pred = video.propagate_video(feats, masks[0], image_hw=masks.shape[1:])
    acc.add(video.evaluate_video(pred, masks))
  result = acc.result()
  out = Output()
  out.metrics.update({f"davis/{k}": float(result[k])
                      for k in ("J_mean", "F_mean", "JF_mean")})
  out.info["davis/num_objects"] = int(result["num_objects"])
  return out


# --- The runner -----------------------------------------------------------


def _json_float(value):
  value = float(value)
  return value if math.isfinite(value) else None


def _tag(source: str, step: int | None) -> str:
  if source == "checkpoint":
    return f"step_{int(step or 0)}"
  return source.replace(":", "_")


def format_table(metrics: dict, title: str = "") -> str:
  """Metrics as an aligned two-column text table."""
  width = max([len(k) for k in metrics] + [6])
  lines = [title] if title else []
  lines.append(f"  {'metric':<{width}}  value")
  lines.append(f"  {'-' * width}  ------")
  for name in metrics:
    value = metrics[name]
    lines.append(f"  {name:<{width}}  {value:.4f}"
                 if isinstance(value, float) else f"  {name:<{width}}  "
                 f"{value}")
  return "\n".join(lines)


def _resolve_which(which, settings: EvalSettings) -> tuple:
  if which is None:
    which = settings.evals
  elif isinstance(which, str):
    which = settings.periodic if which == "periodic" else which.split(",")
  which = tuple(w.strip() for w in which if w.strip())
  unknown = [w for w in which if w not in _EVAL_FNS]
  if unknown:
    raise ValueError(f"Unknown evaluations {unknown}; choose from "
                     f"{EVALUATIONS} (or 'periodic').")
  return which


def evaluate(config, workdir: str, *, params=None, batch_stats=None,
             step: int | None = None, which=None, source: str = "checkpoint",
             params_key: str = "params", writer=None,
             settings: EvalSettings | None = None,
             overrides: dict | None = None, log_table: bool = True) -> dict:
  """Runs evaluations and writes their results (see the module docstring).

  Args:
    config: the run's config (network in config.model, settings in
      config.eval).
    workdir: the run's workdir; results go to workdir/eval.
    params, batch_stats: in-memory network variables (the training loop's
      state.params / state.batch_stats); then `source` must be
      'checkpoint' and `step` names the results.
    step: checkpoint step to load (None = latest), or the step of `params`.
    which: evaluation names, a comma-separated string, 'periodic'
      (settings.periodic) or None (settings.evals).
    source: one of SOURCES.
    params_key: which parameters of the checkpoint ('params' = θ).
    writer: optional CLU MetricWriter (scalars and images).
    settings: EvalSettings (default: from config.eval and `overrides`).
    overrides: {field: value} applied over config.eval.
    log_table: log the metrics table (the command line prints it instead).
  Returns:
    {metric name: float} of every evaluation that ran (NaN where a metric
    has no data).
  """
  settings = settings or settings_from_config(config, **(overrides or {}))
  which = _resolve_which(which, settings)
  settings = dataclasses.replace(settings, evals=which)
  if source not in SOURCES:
    raise ValueError(f"source must be one of {SOURCES}, got {source!r}")
  mask_method = source.split(":", 1)[1] if source.startswith("masks:") \
      else None
  if settings.folder_discovery:  # a bad mask stops before any compute
    from odin_jax.evaluate import datasets
    datasets.check_folder(settings.folder_discovery,
                          settings.folder_num_images,
                          settings.folder_mask_encoding)
  features = None
  if params is not None:
    if source != "checkpoint":
      raise ValueError("in-memory params are evaluated as source="
                       "'checkpoint' (their step names the results)")
    if batch_stats is None:
      raise ValueError("pass batch_stats with params")
    step = int(step or 0)
  elif source == "checkpoint":
    params, batch_stats, step = load_params(config, workdir, step, params_key)
  elif source == "random":
    params, batch_stats = init_params(config)
    step = 0
  else:
    step = 0
  if params is not None:
    features = FeatureSource(config, params, batch_stats, settings.feature,
                             settings.image_size, settings.batch_size,
                             settings.resnet_feature)
  tag = _tag(source, step)
  if source == "checkpoint" and params_key != "params":
    tag += f"_{params_key}"
  ctx = _Context(config, settings, features, mask_method)

  metrics, info, images, timings = {}, {}, {}, {}
  for name in which:
    start = time.time()
    out = _EVAL_FNS[name](ctx)
    timings[name] = round(time.time() - start, 3)
    if out is None:
      info[f"{name}/skipped"] = f"source {source} has no features"
      continue
    metrics.update(out.metrics)
    info.update(out.info)
    images.update(out.pictures)
    logging.info("Evaluation %s (%s) took %.1fs.", name, tag, timings[name])
  # Scene datasets beyond the demo: (name, enabled, evaluations it serves,
  # driver). COCO gives no pictures; its driver returns none.
  scene_sets = (
      ("coco", settings.tfds_discovery, {"discovery", "instances"},
       eval_coco),
      ("folder", settings.folder_discovery,
       {"discovery", "instances", "pictures"}, eval_folder))
  for name, enabled, serves, driver in scene_sets:
    if not enabled or not serves & set(which):
      continue
    start = time.time()
    out = driver(ctx, which)
    timings[name] = round(time.time() - start, 3)
    if out is not None:
      metrics.update(out.metrics)
      info.update(out.info)
      images.update(out.pictures)

  title = (f"Evaluation of {source}"
           f"{' (' + params_key + ')' if params_key != 'params' else ''} "
           f"at step {step} ({workdir})")
  if log_table:
    logging.info("\n%s", format_table(metrics, title))
  paths = _write_outputs(workdir, tag, source, step, params_key, settings,
                         metrics, info, images, timings)
  if writer is not None:
    prefix = "eval" if source == "checkpoint" else f"eval_{tag}"
    writer.write_scalars(step, {f"{prefix}/{k}": v
                                for k, v in metrics.items()})
    if images:
      writer.write_images(step, {f"{prefix}/{k}": v[None]
                                 for k, v in images.items()})
    writer.flush()
  logging.info("Wrote %s.", ", ".join(paths))
  return metrics


def results_path(workdir: str, tag: str) -> str:
  """workdir/eval/results_<tag>.json (workdir a local path or a URL)."""
  return str(checkpoint.as_path(workdir) / "eval" / f"results_{tag}.json")


def _write_outputs(workdir, tag, source, step, params_key, settings, metrics,
                   info, images, timings) -> list:
  """Writes the PNGs and (merged with an earlier file) the JSON."""
  if jax.process_index() != 0:
    return []
  # epath, not os: a gs:// workdir is written where its checkpoints are.
  out_dir = checkpoint.as_path(workdir) / "eval" / tag
  paths = {}
  for name, image in images.items():
    path = str(out_dir / f"{name}.png")
    pictures.save_png(path, image)
    paths[name] = path
  json_path = epath.Path(results_path(workdir, tag))
  record = {"metrics": {}, "info": {}, "pictures": {}, "seconds": {}}
  if json_path.exists():
    try:
      record.update(json.loads(json_path.read_text(encoding="utf-8")))
    except (OSError, ValueError):
      logging.warning("Overwriting unreadable %s.", json_path)
  record.update({"source": source, "step": int(step), "params": params_key,
                 "settings": dataclasses.asdict(settings)})
  record["metrics"].update({k: _json_float(v) for k, v in metrics.items()})
  record["info"].update(info)
  record["pictures"].update(paths)
  record["seconds"].update(timings)
  json_path.parent.mkdir(parents=True, exist_ok=True)
  tmp = json_path.with_name(json_path.name + ".tmp")
  tmp.write_text(json.dumps(record, indent=1, sort_keys=True,
                            default=_to_json), encoding="utf-8")
  tmp.replace(json_path)
  return [str(json_path)] + list(paths.values())


def _to_json(value: Any):
  if isinstance(value, np.generic):
    return value.item()
  if isinstance(value, np.ndarray):
    return value.tolist()
  return str(value)
