"""Embedded demo dataset: procedural multi-object scenes made of real photos.

No download: everything comes from the photos bundled inside the
scikit-image wheel. Each scene is a background cut from one photo with 2-5
shapes (a few shape classes) pasted on it, each shape textured with a crop of
a *different* photo with its own colour shift, so objects are discoverable
from pixels alone. Later shapes occlude earlier ones; the instance and class
maps are exact and describe visible pixels only. The bundled photos
themselves (center-cropped, resized) follow the scenes as extra, unlabelled
examples.

Generation is pure numpy (np.random.default_rng(seed)), hence deterministic,
and takes about 2 s for 256 scenes at 128 px (2 CPU cores).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import os
import tempfile
import time

from absl import logging
import numpy as np
from skimage import data as skdata
from skimage import draw, transform

from odin_jax.data import masks

# Bumped whenever generation changes, so stale caches are never reused.
_VERSION = 1

CLASS_NAMES = ("ellipse", "rectangle", "triangle", "star", "ring")

# Photos shipped inside the scikit-image wheel (skimage/data/*.png|jpg): they
# load offline. Other skimage.data images go through pooch and need network.
PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "immunohistochemistry",
          "motorcycle", "camera", "coins", "moon", "brick", "grass", "gravel")


@dataclasses.dataclass(frozen=True, eq=False)  # eq on arrays is ambiguous
class DemoData:
  images: np.ndarray      # uint8 [N, S, S, 3]  scenes first, then the photos
  instances: np.ndarray   # int32 [N, S, S]  0 = background, 1..k = objects
  classes: np.ndarray     # int32 [N, S, S]  0 = background, 1..C = class
  has_gt: np.ndarray      # bool [N]  True for scenes, False for photos
  class_names: tuple[str, ...]  # names of classes 1..C


def _load_photo(name: str) -> np.ndarray:
  """One bundled photo as uint8 RGB [H, W, 3] (gray -> 3 equal channels)."""
  if name == "motorcycle":
    image = skdata.stereo_motorcycle()[0]
  else:
    image = getattr(skdata, name)()
  image = np.asarray(image)
  if image.ndim == 2:
    image = np.repeat(image[..., None], 3, axis=-1)
  return image[..., :3].astype(np.uint8)


@functools.lru_cache(maxsize=4)
def _sources(image_size: int) -> tuple[np.ndarray, ...]:
  """Every photo resized once so its shorter side is 2*image_size.

  Crops of side S..2S are then resampled to S by index arithmetic, which is
  cheap per scene; the one anti-aliased resize here prevents aliasing.
  """
  out = []
  for name in PHOTOS:
    photo = _load_photo(name)
    h, w = photo.shape[:2]
    f = 2 * image_size / min(h, w)
    shape = (max(2 * image_size, round(h * f)), max(2 * image_size, round(w * f)))
    out.append((transform.resize(photo, shape, anti_aliasing=True,
                                 preserve_range=True) + 0.5).astype(np.uint8))
  return tuple(out)


def _photo_view(photo: np.ndarray, size: int) -> np.ndarray:
  """Center crop of a bundled photo resized to uint8 [size, size, 3]."""
  h, w = photo.shape[:2]
  side = min(h, w)
  top, left = (h - side) // 2, (w - side) // 2
  crop = photo[top:top + side, left:left + side]
  return (transform.resize(crop, (size, size), anti_aliasing=True,
                           preserve_range=True) + 0.5).astype(np.uint8)


def _texture(rng, source: np.ndarray, size: int) -> np.ndarray:
  """A random crop (zoom 1-2x, random flip, colour shift) -> float [S, S, 3]."""
  h, w = source.shape[:2]
  side = rng.uniform(size, min(h, w))
  top, left = rng.uniform(0, h - side), rng.uniform(0, w - side)
  idx = np.arange(size) * (side / size)
  rows = np.minimum((top + idx).astype(int), h - 1)
  cols = np.minimum((left + idx).astype(int), w - 1)
  if rng.random() < 0.5:
    cols = cols[::-1]
  tex = source[np.ix_(rows, cols)].astype(np.float32)
  # Per-channel gain + offset: tints gray photos and separates similar crops.
  gain = rng.uniform(0.6, 1.3, size=3).astype(np.float32)
  offset = rng.uniform(-30, 30, size=3).astype(np.float32)
  return tex * gain + offset


def _shape_mask(rng, cls: int, size: int, yy, xx) -> np.ndarray:
  """bool [S, S] of one random shape of class index cls (0-based)."""
  r = rng.uniform(0.12, 0.26) * size
  cy, cx = rng.uniform(0.6 * r, size - 0.6 * r, size=2)
  theta = rng.uniform(0, 2 * np.pi)
  aspect = rng.uniform(0.6, 1.0)
  u = (xx - cx) * np.cos(theta) + (yy - cy) * np.sin(theta)
  v = (yy - cy) * np.cos(theta) - (xx - cx) * np.sin(theta)
  ell = (u / r) ** 2 + (v / (aspect * r)) ** 2
  name = CLASS_NAMES[cls]
  if name == "ellipse":
    return ell <= 1.0
  if name == "rectangle":
    return (np.abs(u) <= 0.85 * r) & (np.abs(v) <= 0.85 * aspect * r)
  if name == "ring":
    return (ell <= 1.0) & (ell >= 0.3)
  if name == "triangle":
    angles = theta + np.arange(3) * 2 * np.pi / 3 + rng.uniform(-0.3, 0.3, 3)
    radii = r * np.ones(3) * 1.15
  else:  # star: 5 points, alternating outer/inner radius
    angles = theta + np.arange(10) * np.pi / 5
    radii = r * np.where(np.arange(10) % 2 == 0, 1.1, 0.45)
  mask = np.zeros((size, size), bool)
  rr, cc = draw.polygon(cy + radii * np.sin(angles), cx + radii * np.cos(angles),
                        shape=(size, size))
  mask[rr, cc] = True
  return mask


def _scene(rng, sources, size: int, yy, xx):
  """One scene: uint8 image [S,S,3], int32 instances and classes [S,S]."""
  min_area = max(16, int(0.01 * size * size))
  while True:  # resample until >= 2 objects stay visible (rarely loops)
    order = rng.permutation(len(sources))
    n_obj = int(rng.integers(2, 6))
    bg, obj_src = order[0], order[1:1 + n_obj]   # all different photos
    cls = rng.integers(0, len(CLASS_NAMES), size=n_obj)
    shapes = [_shape_mask(rng, c, size, yy, xx) for c in cls]
    textures = [_texture(rng, sources[s], size) for s in obj_src]
    background = _texture(rng, sources[bg], size)
    # Paint in order (later occludes earlier) and drop objects whose visible
    # area is tiny; dropping only uncovers pixels, so survivors only grow.
    def paint(keep):  # int32 [S, S]: 0 = background, j+1 = object keep[j]
      label = np.zeros((size, size), np.int32)
      for j, k in enumerate(keep):
        label[shapes[k]] = j + 1
      return label
    areas = np.bincount(paint(range(n_obj)).ravel(), minlength=n_obj + 1)[1:]
    keep = [k for k in range(n_obj) if areas[k] >= min_area]
    if len(keep) >= 2:
      label = paint(keep)
      break
  image = background
  classes = np.zeros((size, size), np.int32)
  for j, k in enumerate(keep):
    visible = label == j + 1
    image[visible] = textures[k][visible]
    classes[visible] = cls[k] + 1
  image = np.clip(image + 0.5, 0, 255).astype(np.uint8)
  return image, label, classes


def generate_demo(num_scenes: int = 256, image_size: int = 128,
                  seed: int = 0) -> DemoData:
  """Pure, deterministic demo dataset: num_scenes scenes + len(PHOTOS) photos.

  Returns DemoData with N = num_scenes + len(PHOTOS) images of size S =
  image_size; photos have has_gt False and all-zero instance/class maps.
  """
  start = time.time()
  size = int(image_size)
  sources = _sources(size)
  rng = np.random.default_rng(seed)
  yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5  # pixel centres
  n = num_scenes + len(PHOTOS)
  images = np.zeros((n, size, size, 3), np.uint8)
  instances = np.zeros((n, size, size), np.int32)
  classes = np.zeros((n, size, size), np.int32)
  for i in range(num_scenes):
    images[i], instances[i], classes[i] = _scene(rng, sources, size, yy, xx)
    if (i + 1) % 256 == 0:
      logging.info("Demo scenes: %d/%d", i + 1, num_scenes)
  for j, name in enumerate(PHOTOS):
    images[num_scenes + j] = _photo_view(_load_photo(name), size)
  has_gt = np.arange(n) < num_scenes
  logging.info("Generated demo data (%d scenes + %d photos, %dpx) in %.1fs.",
               num_scenes, len(PHOTOS), size, time.time() - start)
  return DemoData(images, instances, classes, has_gt, CLASS_NAMES)


def default_cache_dir() -> str:
  """$ODIN_JAX_CACHE, else ~/.cache/odin_jax."""
  return os.environ.get("ODIN_JAX_CACHE") or os.path.join(
      os.path.expanduser("~"), ".cache", "odin_jax")


def _demo_dir(cache_dir) -> str:
  path = os.path.join(cache_dir or default_cache_dir(), "demo")
  os.makedirs(path, exist_ok=True)
  return path


def _save_atomic(path: str, **arrays) -> None:
  """np.savez_compressed to a temp file in the same dir, then os.replace.

  Concurrent readers (or a crash mid-write) never see a partial file.
  """
  fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), suffix=".tmp")
  try:
    with os.fdopen(fd, "wb") as f:
      np.savez_compressed(f, **arrays)
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise


def _load_npz(path: str, keys) -> dict | None:
  """Arrays of a cache file, or None (with a warning) if missing/corrupt."""
  if not os.path.exists(path):
    return None
  try:
    with np.load(path, allow_pickle=False) as f:
      return {k: f[k] for k in keys}
  except Exception as e:  # pylint: disable=broad-except
    logging.warning("Corrupt cache file %s (%s: %s); regenerating.", path,
                    type(e).__name__, e)
    return None


def load_demo(num_scenes: int = 256, image_size: int = 128, seed: int = 0,
              cache_dir: str | None = None) -> DemoData:
  """generate_demo(...), cached as <cache_dir>/demo/<key>.npz."""
  key = f"demo_v{_VERSION}_n{num_scenes}_s{image_size}_seed{seed}"
  path = os.path.join(_demo_dir(cache_dir), key + ".npz")
  fields = ("images", "instances", "classes", "has_gt", "class_names")
  cached = _load_npz(path, fields)
  n = num_scenes + len(PHOTOS)
  if cached is not None and cached["images"].shape == (n, image_size,
                                                       image_size, 3):
    logging.info("Loaded demo data from %s.", path)
    return DemoData(cached["images"], cached["instances"], cached["classes"],
                    cached["has_gt"], tuple(str(c) for c in
                                            cached["class_names"]))
  data = generate_demo(num_scenes, image_size, seed)
  _save_atomic(path, images=data.images, instances=data.instances,
               classes=data.classes, has_gt=data.has_gt,
               class_names=np.array(data.class_names))
  logging.info("Cached demo data at %s.", path)
  return data


def demo_segments(data: DemoData, mask_config,
                  cache_dir: str | None = None) -> np.ndarray:
  """int32 [N, S, S] segment maps of every image, cached on disk.

  masks.compute_segments per image; method 'gt' uses data.instances, so a
  photo (no ground truth) is a single background segment. The cache key
  hashes the data's content, so it can never match other images.
  """
  digest = hashlib.blake2b(digest_size=8)
  digest.update(np.ascontiguousarray(data.images).tobytes())
  digest.update(np.ascontiguousarray(data.instances).tobytes())
  key = f"segments_v{_VERSION}_{digest.hexdigest()}_"
  path = os.path.join(_demo_dir(cache_dir),
                      key + masks.mask_config_key(mask_config) + ".npz")
  cached = _load_npz(path, ("segments",))
  if cached is not None and cached["segments"].shape == data.instances.shape:
    return cached["segments"]
  start = time.time()
  segments = np.stack([
      masks.compute_segments(image, mask_config, gt_instances=inst)
      for image, inst in zip(data.images, data.instances)])
  logging.info("Computed %d %s segment maps in %.1fs.", len(segments),
               masks.mask_config_key(mask_config), time.time() - start)
  _save_atomic(path, segments=segments)
  return segments


def demo_hierarchies(data: DemoData, mask_config,
                     cache_dir: str | None = None):
  """Region trees of every image (masks.method 'hierarchy'), cached on disk.

  Returns (leaves int32 [N, S, S], distances float32 [N, L, L]) with L =
  mask_config.hier_max_leaves (data/hierarchy.py). Same cache rules as
  demo_segments.
  """
  from odin_jax.data import hierarchy  # pylint: disable=g-import-not-at-top
  digest = hashlib.blake2b(digest_size=8)
  digest.update(np.ascontiguousarray(data.images).tobytes())
  path = os.path.join(_demo_dir(cache_dir),
                      f"trees_v{_VERSION}_{digest.hexdigest()}_"
                      f"{masks.mask_config_key(mask_config)}.npz")
  cached = _load_npz(path, ("leaves", "distances"))
  if cached is not None and cached["leaves"].shape == data.images.shape[:3]:
    return cached["leaves"], cached["distances"]
  start = time.time()
  trees = [hierarchy.hierarchy_from_config(image, mask_config)
           for image in data.images]
  leaves = np.stack([t.leaves for t in trees])
  distances = np.stack([t.distances for t in trees])
  logging.info("Computed %d region trees in %.1fs.", len(trees),
               time.time() - start)
  _save_atomic(path, leaves=leaves, distances=distances)
  return leaves, distances
