"""Random-access example sources for the training pipeline.

A Source maps an example id (int64 scalar tensor, 0 <= id < num_examples) to
one example, in TF graph mode (it is called inside Dataset.map):

  source.num_examples: int
  source.lookup(example_id) -> {'image': uint8 [H, W, 3],
                                'segments': int32 [H, W]}   # ids >= 0
  (+ 'hierarchy': float32 [L, L] leaf distances with masks.method
  'hierarchy': the demo and precomputed records provide it)

H and W may differ between examples. lookup may fail (raise inside the
graph) on a damaged example; the pipeline then skips it (pipeline.py, "Bad
examples"), and names it with `describe(example_id) -> str` where a source
has one (a file path or record id). Sources stored in shard files also
have `shard_sizes` (examples per shard; shard s holds the ids that follow
those of shards < s), which dataset.host_split='shards' splits over hosts
(pipeline.py), and `reshard_command(num_shards)`, the precompute command
that writes them with more shards. Sources:
  ArraySource   in-memory arrays (tf constants), lookup = tf.gather;
  DemoSource    the embedded demo scenes (demo.load_demo + demo_segments);
  FolderSource  every image file under a folder, segments computed on the fly;
  TfdsSource    (tfds_source.py) a prepared TFDS dataset in ArrayRecord
                format (random access), segments computed on the fly; lookup
                also gives 'label' (int64, -1 without a ClassLabel 'label')
                and 'id' (string);
  RecordSource  (records/reader.py) images and masks written once by
                `python -m odin_jax.data.precompute` (dataset.records_dir).
`make_source(config)` picks one from config.dataset.name.

This module is also the one home of listing a folder's image files
(`list_images`, `IMAGE_EXTENSIONS`; opening a TFDS split is
tfds_source.py's) and of the on-the-fly segmentation of a source without
precomputed masks (`segments_fn`); the precompute's inputs
(records/inputs.py) and the evaluation's folder datasets use them.
TensorFlow is imported only where a source builds graph ops, so the
precompute's worker processes use this module without it.
"""

from __future__ import annotations

import concurrent.futures
import os
from typing import Protocol, TYPE_CHECKING

from absl import logging
import numpy as np

from odin_jax.data import demo
from odin_jax.data import masks

if TYPE_CHECKING:
  import tensorflow as tf

# Image files a folder source lists: every kind PIL decodes (the precompute
# reads files with PIL). FolderSource decodes _TF_EXTENSIONS with
# TensorFlow (which sniffs the content) and the rest (TIFF, PNM) with PIL.
_TF_EXTENSIONS = (".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".bmp", ".gif",
                  ".webp")
IMAGE_EXTENSIONS = _TF_EXTENSIONS + (".tif", ".tiff", ".ppm", ".pgm", ".pnm")
BUILTIN_NAMES = ("demo", "folder")


class Source(Protocol):
  num_examples: int

  def lookup(self, example_id: tf.Tensor) -> dict:
    ...


def segments_fn(mask_config):
  """numpy uint8 [H, W, 3] -> int32 [H, W] segments (for tf.numpy_function).

  Raises ValueError for the mask methods that cannot run on the fly.
  """
  if mask_config.method == "gt":
    raise ValueError("masks.method='gt' needs ground-truth instance maps, which "
                     "only the 'demo' dataset provides; use 'fh', 'slic' or "
                     "'grid' for this dataset.")
  if mask_config.method == "hierarchy":
    from odin_jax.data import records  # pylint: disable=g-import-not-at-top
    raise ValueError(
        "masks.method='hierarchy' (region trees) is computed once, not on the "
        "fly (about 0.1-1 s per image): precompute the records with\n  " +
        records.precompute_command("tfds:NAME:train or folder:/path",
                                   "/path/to/records",
                                   [records.mask_setting_string(mask_config)])
        + "\nthen set --config.dataset.records_dir=/path/to/records.")

  def fn(image):
    return masks.compute_segments(image, mask_config).astype(np.int32)
  return fn


def _segments_on_the_fly(image, fn):
  """uint8 [H, W, 3] tensor -> int32 [H, W] via tf.numpy_function(fn)."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  seg = tf.numpy_function(fn, [image], tf.int32,
                          stateful=False)
  seg.set_shape([None, None])
  return seg


class ArraySource:
  """In-memory images uint8 [N, S, S, 3] and segments int32 [N, S, S]
  (+ optional region-tree distances float32 [N, L, L]; optional shard_sizes
  int [K] summing to N: the ids 0..N-1 cut into K consecutive shards)."""

  def __init__(self, images: np.ndarray, segments: np.ndarray,
               hierarchy: np.ndarray | None = None, shard_sizes=None):
    images, segments = np.asarray(images), np.asarray(segments)
    if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
      raise ValueError(f"images must be uint8 [N, H, W, 3], got "
                       f"{images.dtype} {images.shape}.")
    if segments.shape != images.shape[:3]:
      raise ValueError(f"segments {segments.shape} must be [N, H, W] = "
                       f"{images.shape[:3]}.")
    if len(images) == 0:
      raise ValueError("ArraySource needs at least one example.")
    if segments.min() < 0:
      raise ValueError("Segment ids must be >= 0.")
    self.num_examples = int(len(images))
    if shard_sizes is not None:
      self.shard_sizes = tuple(int(k) for k in shard_sizes)
      if sum(self.shard_sizes) != self.num_examples or min(
          self.shard_sizes) < 0:
        raise ValueError(f"shard_sizes {self.shard_sizes} must be >= 0 and "
                         f"sum to {self.num_examples}.")
    if hierarchy is not None and len(hierarchy) != len(images):
      raise ValueError(f"hierarchy {np.shape(hierarchy)} must have one [L, L] "
                       f"matrix per image ({len(images)}).")
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
    with tf.device("/cpu:0"):
      self._images = tf.constant(images)
      self._segments = tf.constant(segments.astype(np.int32))
      self._hierarchy = (None if hierarchy is None else
                         tf.constant(np.asarray(hierarchy, np.float32)))

  def lookup(self, example_id):
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
    out = {"image": tf.gather(self._images, example_id),
           "segments": tf.gather(self._segments, example_id)}
    if self._hierarchy is not None:
      out["hierarchy"] = tf.gather(self._hierarchy, example_id)
    return out


class DemoSource(ArraySource):
  """The embedded demo scenes + photos with config.masks segments."""

  def __init__(self, config):
    d = config.dataset
    self.data = demo.load_demo(num_scenes=d.demo_num_scenes,
                               image_size=d.demo_image_size,
                               seed=d.get("demo_seed", 0), cache_dir=d.cache_dir)
    trees = None
    if config.masks.method == "hierarchy":   # leaves + their distances
      segments, trees = demo.demo_hierarchies(self.data, config.masks,
                                              cache_dir=d.cache_dir)
    else:
      segments = demo.demo_segments(self.data, config.masks,
                                    cache_dir=d.cache_dir)
    super().__init__(self.data.images, segments, trees)


def list_images(folder: str, relative: bool = False) -> list[str]:
  """Sorted paths of all image files under folder (recursive, any case).

  Files whose name ends in one of IMAGE_EXTENSIONS (any case) count; links
  are followed. relative=True: paths relative to folder, '/'-separated
  (the precompute's stable example ids); else folder joined with them.
  Raises FileNotFoundError when folder does not exist.
  """
  if not folder or not os.path.isdir(folder):
    raise FileNotFoundError(f"Image folder {folder!r} does not exist (set "
                            "--config.dataset.folder=/path/to/images, or "
                            "the precompute's --source=folder:/path).")
  paths = []
  for root, dirs, files in os.walk(folder, followlinks=True):
    dirs.sort()
    rel = os.path.relpath(root, folder).replace(os.sep, "/")
    for f in files:
      if not f.lower().endswith(IMAGE_EXTENSIONS):
        continue
      if not relative:
        paths.append(os.path.join(root, f))
      else:
        paths.append(f if rel == "." else f"{rel}/{f}")
  return sorted(paths)


def _read_with_pil(path) -> np.ndarray:
  """Image file (bytes path, as tf.numpy_function passes it) -> uint8
  [H, W, 3], converted as records.examples.decode_pixels converts."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  from odin_jax.data.records import examples  # pylint: disable=g-import-not-at-top
  with Image.open(os.fsdecode(np.asarray(path).item())) as im:
    im.load()
    return examples.as_rgb(examples.decode_pixels(im)[0])


def _is_valid_image(path: str) -> str | None:
  """None if PIL can identify and verify the file, else the reason."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  try:
    with Image.open(path) as im:
      im.verify()
    return None
  except Exception as e:  # pylint: disable=broad-except
    return f"{type(e).__name__}: {e}"


def _drop_unreadable(paths: list[str], folder: str, num_threads: int):
  """(readable paths, [(path, reason)] of the others), PIL-verified in
  threads; raises ValueError when no file is readable."""
  with concurrent.futures.ThreadPoolExecutor(num_threads) as pool:
    reasons = list(pool.map(_is_valid_image, paths))
  bad = [(p, r) for p, r in zip(paths, reasons) if r]
  good = [p for p, r in zip(paths, reasons) if not r]
  if bad:
    logging.warning("Skipping %d unreadable image file(s) under %s:\n%s",
                    len(bad), folder,
                    "\n".join(f"  {p} ({r})" for p, r in bad[:50]))
  if not good:
    raise ValueError(f"None of the image files under {folder!r} could be "
                     f"read ({len(bad)} bad).")
  return good, bad


class FolderSource:
  """All images under a folder, in sorted path order; segments on the fly.

  A validation pass at construction (PIL open + verify, threaded: reads
  headers, not pixels) drops and reports files that are not images. A file
  whose header is fine but whose data is damaged (a truncated JPEG) fails in
  lookup; the pipeline skips it then (pipeline.py). Grayscale / RGBA /
  palette files are decoded to 3 channels; animated GIFs give their first
  frame. TIFF and PNM files, which TensorFlow cannot decode, are decoded
  with PIL (in tf.numpy_function; converted as the precompute converts).
  """

  def __init__(self, folder: str, mask_config, validate: bool = True,
               num_threads: int = 16):
    paths = list_images(folder)
    if not paths:
      raise FileNotFoundError(f"No image files ({', '.join(IMAGE_EXTENSIONS)})"
                              f" found under {folder!r}.")
    self.bad_files: list[tuple[str, str]] = []
    if validate:
      paths, self.bad_files = _drop_unreadable(paths, folder, num_threads)
    self.paths = paths
    self.num_examples = len(paths)
    self.precompute_spec = f"folder:{folder}"   # precompute's --source
    self._segments = segments_fn(mask_config)
    by_tf = [p.lower().endswith(_TF_EXTENSIONS) for p in paths]
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
    with tf.device("/cpu:0"):
      self._paths = tf.constant(paths)
      self._by_tf = None if all(by_tf) else tf.constant(by_tf)
    logging.info("FolderSource: %d images under %s.", len(paths), folder)

  def describe(self, example_id: int) -> str:
    """The file of example_id."""
    return self.paths[int(example_id)]

  def lookup(self, example_id):
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
    path = tf.gather(self._paths, example_id)

    def by_tf():
      return tf.io.decode_image(tf.io.read_file(path), channels=3,
                                expand_animations=False, dtype=tf.uint8)

    def by_pil():
      image = tf.numpy_function(_read_with_pil, [path], tf.uint8,
                                stateful=False)
      return tf.ensure_shape(image, [None, None, 3])

    if self._by_tf is None:
      image = by_tf()
    else:
      image = tf.cond(tf.gather(self._by_tf, example_id), by_tf, by_pil)
    image.set_shape([None, None, 3])
    return {"image": image,
            "segments": _segments_on_the_fly(image, self._segments)}


def make_source(config) -> Source:
  """The source named by config.dataset.name ('demo', 'folder', TFDS name)."""
  from odin_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  pipeline.hide_accelerators_from_tf()
  d = config.dataset
  if d.get("records_dir"):   # precomputed images + masks (data/precompute.py)
    from odin_jax.data import records  # pylint: disable=g-import-not-at-top
    return records.RecordSource.from_config(config)
  name = d.name
  if not name:
    raise ValueError(f"config.dataset.name is empty: choose one of "
                     f"{BUILTIN_NAMES} or a TFDS dataset name such as "
                     "'imagenet2012'.")
  if name == "demo":
    return DemoSource(config)
  segments_fn(config.masks)   # 'gt' / 'hierarchy' fail here, before any I/O
  if name == "folder":
    return FolderSource(d.folder, config.masks)
  from odin_jax.data import tfds_source  # pylint: disable=g-import-not-at-top
  return tfds_source.TfdsSource(name, d.split, d.data_dir, config.masks,
                                image_key=d.get("image_key", "image"))
