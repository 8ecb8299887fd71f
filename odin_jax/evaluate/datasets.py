"""Evaluation data with exact ground truth: demo, COCO, DAVIS, a folder.

  demo    held-out demo scenes (`demo.load_demo` with eval.demo_seed, 1 by
          default, while training draws seed 0), only scenes with ground
          truth, at config.dataset.demo_image_size, with their mask sets
          (FH / SLIC / grid / gt / hierarchy) for the mask sources.
  COCO    eval.tfds_discovery = 'coco/2017_panoptic': val2017 thing
          instances (crowd regions dropped). Odin App. A.4: the native
          central square crop resized straight to eval.image_size (1024 for
          ResNets), image bilinear, maps nearest, scored there.
  folder  eval.folder_discovery = PATH: your images with instance-id PNG
          masks (evaluate/folder.py), by COCO's protocol, one class.
  DAVIS   eval.tfds_video = 'davis/480p': DAVIS 2017 val clips (frames,
          masks) at native resolution, for label propagation.
TFDS datasets are never downloaded: one that is not prepared in
eval.tfds_data_dir is skipped with a message saying how to prepare it.
COCO and folder scenes come in chunks (`Scenes` of at most CHUNK images:
at 1024 px an image holds 3 MB of pixels and 8 MB of maps).
"""

from __future__ import annotations

import dataclasses
import functools
import os
from typing import Callable, Iterator

import numpy as np

MASK_METHODS = ("fh", "slic", "grid", "gt", "hierarchy")
COCO_THINGS = 80  # TFDS coco/2017_panoptic labels 0..79 are things.
CHUNK = 32        # COCO / folder images held in memory at once


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

  def __len__(self) -> int:
    return len(self.images)

  def head(self, n: int) -> "Scenes":
    """The first n scenes."""
    return Scenes(self.images[:n], self.instances[:n], self.classes[:n],
                  self.class_names, lambda m: self.segments(m)[:n])

  def gt(self, i: int):
    """(instance masks bool [G, S, S], classes int [G]) of scene i."""
    from odin_jax.evaluate import abo as discovery
    return discovery.instance_masks_from_maps(self.instances[i],
                                              self.classes[i])


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


def concatenate(chunks) -> Scenes | None:
  """One Scenes of all `chunks` (None if there are none)."""
  chunks = list(chunks)
  if not chunks:
    return None
  return Scenes(*(np.concatenate([getattr(c, f) for c in chunks])
                  for f in ("images", "instances", "classes")),
                chunks[0].class_names, chunks[0].segments)


# --- TFDS (only when prepared; never downloaded) --------------------------


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


def tfds_examples(name: str, split: str, data_dir, count: int):
  """numpy examples of a prepared TFDS split (the first `count`, or all of
  a smaller split: TFDS rejects a slice past the split's end)."""
  import tensorflow_datasets as tfds
  from odin_jax.data import pipeline
  pipeline.hide_accelerators_from_tf()
  builder = tfds.builder(name, data_dir=data_dir)
  count = min(int(count), builder.info.splits[split].num_examples)
  return tfds.as_numpy(builder.as_dataset(split=f"{split}[:{count}]",
                                          shuffle_files=False))


def center_square(array, size: int, order: int):
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
    if crowd or int(label) >= COCO_THINGS:
      continue
    mask = ids == int(seg_id)
    if mask.any():
      g += 1
      inst[mask] = g
      cls[mask] = int(label) + 1
  return inst, cls


def _no_segments(method):
  raise ValueError(f"mask set {method!r}: mask sets are computed for the "
                   "demo scenes only")


def square_scene_chunks(examples, size: int, class_names: tuple,
                        chunk: int = CHUNK) -> Iterator[Scenes]:
  """(image uint8 [H, W, 3], instances int [H, W], classes int [H, W]) at
  native size -> Scenes of `chunk` central square crops resized to size
  (Odin App. A.4: image bilinear, maps nearest). Crops without an instance
  are skipped."""
  images, insts, classes = [], [], []

  def scenes():
    return Scenes(np.stack(images), np.stack(insts), np.stack(classes),
                  class_names, _no_segments)

  for image, inst, cls in examples:
    inst = center_square(inst, size, 0)
    if inst.max() == 0:
      continue
    images.append(center_square(image, size, 1))
    insts.append(inst)
    classes.append(center_square(cls, size, 0))
    if len(images) == chunk:
      yield scenes()
      images, insts, classes = [], [], []
  if images:
    yield scenes()


def coco_scene_chunks(settings, chunk: int = CHUNK) -> Iterator[Scenes]:
  """COCO val2017 thing instances (eval.tfds_discovery) as Scenes at
  eval.image_size, `chunk` images at a time; images without a thing
  instance in the crop are skipped. Yields nothing (after a warning) when
  the dataset is not prepared or not coco/2017_panoptic."""
  from absl import logging
  s = settings
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
              for ex in tfds_examples(s.tfds_discovery, "validation",
                                      s.tfds_data_dir, s.tfds_num_images))
  yield from square_scene_chunks(
      examples, int(s.image_size),
      tuple(str(i) for i in range(1, COCO_THINGS + 1)), chunk)


def coco_scenes(settings) -> Scenes | None:
  """All COCO scenes of `coco_scene_chunks` in one Scenes (None if none)."""
  return concatenate(coco_scene_chunks(settings))


def folder_scene_chunks(settings, chunk: int = CHUNK) -> Iterator[Scenes]:
  """eval.folder_discovery's images and instance masks (evaluate/folder.py)
  as Scenes, by COCO's protocol (`square_scene_chunks`)."""
  from odin_jax.evaluate import folder
  s = settings
  examples = ((image, inst, (inst > 0).astype(np.int32))
              for _, image, inst in folder.folder_examples(
                  s.folder_discovery, s.folder_num_images,
                  s.folder_mask_encoding, s.folder_background_ids))
  yield from square_scene_chunks(examples, int(s.image_size), ("object",),
                                 chunk)


def davis_clips(settings):
  """DAVIS 2017 val (eval.tfds_video) clips: yields (frames uint8 [T, H, W,
  3], masks int32 [T, H, W]) at native resolution; nothing (after a
  warning) when the dataset is not prepared."""
  from absl import logging
  s = settings
  ok, message = tfds_prepared(s.tfds_video, s.tfds_data_dir)
  if not ok:
    logging.warning(message)
    return
  for ex in tfds_examples(s.tfds_video, "validation", s.tfds_data_dir,
                          s.tfds_num_videos):
    frames = np.asarray(ex["video"]["frames"])
    masks = np.asarray(ex["video"]["segmentations"])[..., 0].astype(np.int32)
    yield frames, masks
