"""On-disk format of precomputed images + masks, and its random-access reader.

A records directory (written by `python -m odin_jax.data.precompute`) holds

  records-SSSSS-of-NNNNN.array_record  ArrayRecord files (group_size 1, so any
                                       record is one seek away), each record a
                                       serialized tf.train.Example
  records-SSSSS-of-NNNNN.stats.json    per-shard counts (skips, segments, bytes)
  precompute_spec.json                 the run's settings (written first)
  metadata.json                        written last, when every shard is done

Each tf.train.Example has the features
  'id'           bytes  stable example id (relative file name, TFDS id)
  'image'        bytes  a JPEG: the original file when it was a plain RGB or
                        grayscale JPEG, else converted once to RGB JPEG
  'height','width' int64
  'label'        int64  class index, -1 when the source has none
  'masks/<key>'  bytes  16-bit grayscale PNG [H, W] of segment ids 0..n-1, one
                        per mask setting; <key> is masks.mask_config_key(...)
                        ('gt' for ground-truth instances when the source has
                        them). 16 bits hold n <= 65536 segments; examples with
                        more are skipped, never wrapped (the DetCon reference
                        stored 8-bit ids and merged every segment past 255).
  'hierarchy/<key>' bytes  (mask settings 'hierarchy:...' only) the region
                        tree's leaf distances d_T, float32 [L, L] little-endian
                        raw bytes (L = max_leaves); 'masks/<key>' then holds
                        the leaf ids (data/hierarchy.py).

Global example id g is record g of the concatenation of the shards in shard
order. `RecordSource` serves them to the training pipeline (sources.Source);
its `shard_sizes` let dataset.host_split='shards' give each host its own
shard files (pipeline.py). Readers open a shard file on its first read, so a
host that reads only its shards opens only those files.

Mask settings are written `method:field=value,...` on the command line, with
the field names of config.masks minus their method prefix:
  fh:scale=1000,sigma=0.8,min_size=1000   slic:n_segments=100,compactness=10
  grid:size=5                             gt
  hierarchy:max_leaves=40,superpixels=400,compactness=0,sigma=1,min_leaf_area=0.005
TensorFlow is imported only by the reader, so precompute workers stay light.
"""

from __future__ import annotations

import json
import os
from typing import Any, Sequence

from absl import logging
import ml_collections
import numpy as np

from odin_jax.data import masks as masks_lib

FORMAT = "odin_jax.records"
VERSION = 1
METADATA = "metadata.json"
SPEC = "precompute_spec.json"
MASK_PREFIX = "masks/"
HIERARCHY_PREFIX = "hierarchy/"
# One record per chunk (random access); JPEG/PNG payloads do not compress.
WRITER_OPTIONS = "group_size:1,uncompressed"
MAX_SEGMENTS = 1 << 16          # ids 0..65535 fit a 16-bit PNG
_CHOICE_SALT = 0x4D41_534B      # 'MASK': stream of the per-example mask choice

# method -> {setting field: (config.masks field, type, default)}.
_FIELDS = {
    "fh": {"scale": ("fh_scale", float, 1000.0),
           "sigma": ("fh_sigma", float, 0.8),
           "min_size": ("fh_min_size", int, 1000)},
    "fh_opencv": {"scale": ("fh_scale", float, 1000.0),      # same fields
                  "sigma": ("fh_sigma", float, 0.8),
                  "min_size": ("fh_min_size", int, 1000)},
    "slic": {"n_segments": ("slic_n_segments", int, 64),
             "compactness": ("slic_compactness", float, 10.0)},
    "grid": {"size": ("grid_size", int, 5)},
    "gt": {},
    "hierarchy": {"max_leaves": ("hier_max_leaves", int, 40),
                  "superpixels": ("hier_superpixels", int, 400),
                  "compactness": ("hier_compactness", float, 0.0),
                  "sigma": ("hier_sigma", float, 1.0),
                  "min_leaf_area": ("hier_min_leaf_area", float, 0.005)},
}


# ----------------------------------------------------------- mask settings --
def parse_mask_setting(text: str) -> ml_collections.ConfigDict:
  """'fh:scale=500,min_size=500' -> mask config (method + config.masks fields).

  Missing fields take the defaults above; unknown ones raise ValueError.
  """
  method, _, rest = text.strip().partition(":")
  if method not in _FIELDS:
    raise ValueError(f"Mask setting {text!r}: method must be one of "
                     f"{tuple(_FIELDS)} (e.g. 'fh:scale=1000,sigma=0.8,"
                     "min_size=1000', 'slic:n_segments=100', 'grid:size=5').")
  fields = _FIELDS[method]
  cfg = ml_collections.ConfigDict({"method": method})
  for name, (field, kind, default) in fields.items():
    cfg[field] = kind(default)
  for item in filter(None, (s.strip() for s in rest.split(","))):
    name, eq, value = item.partition("=")
    if not eq or name.strip() not in fields:
      takes = ", ".join(f"{k}=..." for k in fields) or "no fields"
      raise ValueError(f"Mask setting {text!r}: bad item {item!r}; {method} "
                       f"takes {takes}.")
    field, kind, _ = fields[name.strip()]
    try:
      cfg[field] = kind(float(value)) if kind is int else kind(value)
    except ValueError:
      raise ValueError(f"Mask setting {text!r}: {name}={value!r} is not a "
                       f"{kind.__name__}.") from None
  return cfg


def mask_setting_string(mask_config) -> str:
  """Canonical 'method:field=value,...' of a mask config (inverse of parse)."""
  method = mask_config.method
  if method not in _FIELDS:
    raise ValueError(f"Unknown mask method {method!r}.")
  items = [f"{name}={getattr(mask_config, field):g}"
           for name, (field, _, _) in _FIELDS[method].items()]
  return method + (":" + ",".join(items) if items else "")


def as_mask_config(setting) -> ml_collections.ConfigDict:
  """A mask config from a config (has .method) or a setting string."""
  if hasattr(setting, "method"):
    return parse_mask_setting(mask_setting_string(setting))
  return parse_mask_setting(str(setting))


def precompute_command(source: str, output_dir: str, settings: Sequence[str],
                       **extra) -> str:
  """The shell command that writes records for `settings` (setting strings).

  extra: further flags (num_shards=16, ...); None / False values are left out.
  """
  flags = [f"--masks={s}" for s in settings] + [
      f"--{k}={v}" for k, v in extra.items()
      if v is not None and v is not False]
  return (f"python -m odin_jax.data.precompute --source={source} "
          f"--output_dir={output_dir} " + " ".join(flags))


RUN_FLAGS = ("seed", "min_side", "max_side", "jpeg_quality", "skip_one_segment",
             "folder_labels")


# ---------------------------------------------------- tf.train.Example bytes --
# Written by hand (wire format of tensorflow/core/example/example.proto) so
# that precompute workers never import TensorFlow and the bytes do not depend
# on the protobuf version: map entries in sorted key order, int64s packed,
# which is exactly what SerializeToString(deterministic=True) produces.
def _varint(n: int) -> bytes:
  out = bytearray()
  while n > 0x7F:
    out.append((n & 0x7F) | 0x80)
    n >>= 7
  out.append(n)
  return bytes(out)


def _field(number: int, payload: bytes) -> bytes:  # length-delimited field
  return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def encode_example(features: dict[str, Any]) -> bytes:
  """{name: bytes | str | int} -> serialized tf.train.Example, deterministic."""
  entries = []
  for name in sorted(features):
    value = features[name]
    if isinstance(value, str):
      value = value.encode("utf-8")
    if isinstance(value, bytes):
      feature = _field(1, _field(1, value))                  # bytes_list
    elif isinstance(value, (int, np.integer)):
      packed = _varint(int(value) & 0xFFFF_FFFF_FFFF_FFFF)
      feature = _field(3, _field(1, packed))                 # int64_list
    else:
      raise TypeError(f"Feature {name!r}: unsupported {type(value).__name__}.")
    entry = _field(1, name.encode("utf-8")) + _field(2, feature)
    entries.append(_field(1, entry))
  return _field(1, b"".join(entries))


def encode_mask_png(segments: np.ndarray) -> bytes:
  """int [H, W] ids in [0, 65535] -> 16-bit grayscale PNG bytes (lossless)."""
  import io  # pylint: disable=g-import-not-at-top
  from PIL import Image  # pylint: disable=g-import-not-at-top
  segments = np.asarray(segments)
  if segments.ndim != 2 or segments.size == 0:
    raise ValueError(f"segments must be a non-empty [H, W] map, got "
                     f"{segments.shape}.")
  if segments.min() < 0 or segments.max() >= MAX_SEGMENTS:
    raise ValueError(f"segment ids must be in [0, {MAX_SEGMENTS - 1}] for a "
                     f"16-bit PNG, got [{segments.min()}, {segments.max()}].")
  buf = io.BytesIO()
  Image.fromarray(segments.astype(np.uint16)).save(buf, "PNG")  # mode I;16
  return buf.getvalue()


def encode_distances(distances: np.ndarray) -> bytes:
  """float [L, L] tree distances -> float32 little-endian bytes (lossless)."""
  distances = np.asarray(distances)
  if distances.ndim != 2 or distances.shape[0] != distances.shape[1]:
    raise ValueError(f"distances must be [L, L], got {distances.shape}.")
  return distances.astype("<f4").tobytes()


# --------------------------------------------------------- files / metadata --
def shard_name(shard: int, num_shards: int) -> str:
  return f"records-{shard:05d}-of-{num_shards:05d}.array_record"


def stats_name(shard: int, num_shards: int) -> str:
  return f"records-{shard:05d}-of-{num_shards:05d}.stats.json"


def write_json_atomic(path: str, obj) -> None:
  """Deterministic JSON (sorted keys) written to path.tmp, then renamed."""
  tmp = path + ".tmp"
  with open(tmp, "w", encoding="utf-8") as f:
    f.write(json.dumps(obj, indent=1, sort_keys=True) + "\n")
  os.replace(tmp, path)


def read_json(path: str):
  with open(path, encoding="utf-8") as f:
    return json.load(f)


def _missing_records_message(records_dir: str, source: str,
                             settings: Sequence[str]) -> str:
  cmd = precompute_command(source, records_dir, settings)
  spec_path = os.path.join(records_dir or "", SPEC)
  if records_dir and os.path.exists(spec_path):
    spec = read_json(spec_path)
    return (f"Records in {records_dir!r} are incomplete: {METADATA} is "
            "written when every shard is done and it is missing (precompute "
            "was interrupted or is still running). Rerun the same command; it "
            "resumes, skipping finished shards:\n  " + spec.get("command", cmd))
  return (f"No precomputed records in {records_dir!r} (no {METADATA}). Make "
          f"them with:\n  {cmd}\nthen set --config.dataset.records_dir="
          f"{records_dir}.")


# ------------------------------------------------------------------ reader --
class RecordSource:
  """Images + precomputed masks from a records directory (sources.Source).

  lookup(example_id int64 []) -> {'image': uint8 [H, W, 3], 'segments': int32
  [H, W], 'label': int64 [], 'id': string []} in graph mode, plus
  'hierarchy': float32 [L, L] (the leaf distances) for 'hierarchy' mask
  settings. With several mask
  settings, each example uses one of them chosen by a stateless draw from
  (seed, example_id): fixed per example and seed (DetCon's random FH scale on
  COCO), identical on every host and after a restart. A record whose bytes,
  JPEG or mask PNG are damaged fails in lookup; the training pipeline skips
  it and names it by `describe` (pipeline.py, "Bad examples").
  """

  def __init__(self, records_dir: str, masks, *, seed: int = 0,
               source_hint: str = "folder:/path/to/images"):
    """Args:
      records_dir: directory written by odin_jax.data.precompute.
      masks: one mask setting or a list of them; each a mask config (has
        .method), a setting string ('fh:scale=1000') or a key
        ('fh_s1000_sig0.8_min1000').
      seed: seed of the per-example choice among several settings.
      source_hint: --source of the precompute command shown when the records
        are missing.
    """
    wanted = list(masks) if isinstance(masks, (list, tuple)) else [masks]
    if not wanted:
      raise ValueError("RecordSource needs at least one mask setting.")
    self.records_dir = records_dir
    meta_path = os.path.join(records_dir or "", METADATA)
    if not records_dir or not os.path.exists(meta_path):
      settings = [self._setting_string(m) for m in wanted]
      raise FileNotFoundError(_missing_records_message(
          records_dir, source_hint, settings))
    self.metadata = meta = read_json(meta_path)
    if meta.get("format") != FORMAT or meta.get("version") != VERSION:
      raise ValueError(f"{meta_path} is not {FORMAT} version {VERSION} "
                       f"(format {meta.get('format')!r}, version "
                       f"{meta.get('version')!r}); precompute it again.")
    available = meta["mask_settings"]            # key -> setting string
    self.mask_keys = [self._key(m) for m in wanted]
    missing = [k for k in self.mask_keys if k not in available]
    if missing:
      settings = list(available.values()) + [
          self._setting_string(m) for m, k in zip(wanted, self.mask_keys)
          if k in missing]
      new_dir = records_dir.rstrip("/") + "-" + "-".join(missing)
      cmd = precompute_command(meta["source"], new_dir, settings,
                               **{k: meta.get(k) for k in RUN_FLAGS})
      raise ValueError(
          f"Records in {records_dir!r} hold mask settings {sorted(available)}"
          f", not {missing}. Precompute them (all settings into a new "
          f"directory) with:\n  {cmd}\n"
          f"then set --config.dataset.records_dir={new_dir}.")
    # Region trees carry their leaf distances too (one size for all).
    trees = [parse_mask_setting(available[k]) for k in self.mask_keys
             if available[k].startswith("hierarchy")]
    sizes = {int(t.hier_max_leaves) for t in trees}
    if trees and (len(trees) != len(self.mask_keys) or len(sizes) != 1):
      raise ValueError(f"Mask settings {self.mask_keys}: 'hierarchy' settings "
                       "cannot be mixed with other methods or other "
                       "max_leaves (every example needs the same distances).")
    self.hierarchy_size = sizes.pop() if trees else 0
    self.num_examples = int(meta["num_examples"])
    # Examples per shard file, in shard order (global ids run through them).
    self.shard_sizes = tuple(int(s["num_examples"]) for s in meta["shards"])
    if self.num_examples <= 0:
      raise ValueError(f"Records in {records_dir!r} hold no examples (every "
                       f"input was skipped: {meta.get('skipped')}).")
    paths = []
    for shard in meta["shards"]:
      path = os.path.join(records_dir, shard["file"])
      if not os.path.exists(path):
        raise FileNotFoundError(f"Shard {path} listed in {meta_path} is "
                                f"missing; rerun: {meta.get('command')}")
      if shard["num_examples"]:
        # 'path[a:b]' tells the data source the count without opening files.
        paths.append(f"{path}[0:{shard['num_examples']}]")
    from array_record.python import array_record_data_source  # pylint: disable=g-import-not-at-top
    self._records = array_record_data_source.ArrayRecordDataSource(paths)
    if len(self._records) != self.num_examples:
      raise ValueError(f"{records_dir}: shards hold {len(self._records)} "
                       f"records, metadata says {self.num_examples}.")
    self.seed = int(seed)
    logging.info("RecordSource: %d examples in %s, masks %s.",
                 self.num_examples, records_dir, self.mask_keys)

  @classmethod
  def from_config(cls, config) -> "RecordSource":
    """config.dataset.records_dir + config.masks (+ masks.fh_scales, if set:
    one FH setting per scale with min_size = scale, chosen per example)."""
    d = config.dataset
    if d.name == "folder":
      hint = f"folder:{d.folder or '/path/to/images'}"
    elif d.name in ("demo", "records", "", None):
      hint = "folder:/path/to/images"
    else:
      hint = f"tfds:{d.name}:{d.get('split', 'train')}"
    scales = config.masks.get("fh_scales", None)
    method = config.masks.method
    if method in ("fh", "fh_opencv") and scales:
      settings = [f"{method}:scale={s:g},sigma={config.masks.fh_sigma:g},"
                  f"min_size={s:g}" for s in scales]
    else:
      settings = [config.masks]
    return cls(d.records_dir, settings, seed=config.seed, source_hint=hint)

  def reshard_command(self, num_shards: int) -> str:
    """The precompute command writing these records again in num_shards."""
    meta = self.metadata
    new_dir = f"{self.records_dir.rstrip('/')}-{num_shards}shards"
    return precompute_command(
        meta["source"], new_dir, list(meta["mask_settings"].values()),
        num_shards=num_shards, **{k: meta.get(k) for k in RUN_FLAGS}) + (
            f"\nthen set --config.dataset.records_dir={new_dir}")

  @staticmethod
  def _setting_string(m) -> str:
    if hasattr(m, "method") or ":" in str(m) or str(m) in _FIELDS:
      return mask_setting_string(as_mask_config(m))
    return f"<setting with key {m}>"

  @staticmethod
  def _key(m) -> str:
    if hasattr(m, "method") or ":" in str(m) or str(m) in _FIELDS:
      return masks_lib.mask_config_key(as_mask_config(m))
    return str(m)   # already a key such as 'fh_s1000_sig0.8_min1000'

  def read_serialized(self, example_id: int) -> bytes:
    """The serialized tf.train.Example of global example id (numpy side)."""
    return self._records[int(example_id)]

  def describe(self, example_id: int) -> str:
    """Record example_id's 'id' feature (its file or TFDS id), or its place
    when the record does not parse."""
    where = f"record {int(example_id)} in {self.records_dir}"
    try:
      import tensorflow as tf  # pylint: disable=g-import-not-at-top
      example = tf.train.Example.FromString(self.read_serialized(example_id))
      ident = example.features.feature["id"].bytes_list.value[0]
      return f"{ident.decode('utf-8', 'replace')} ({where})"
    except Exception:  # pylint: disable=broad-except
      return where

  def _features(self):
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
    spec = {"image": tf.io.FixedLenFeature([], tf.string),
            "label": tf.io.FixedLenFeature([], tf.int64),
            "id": tf.io.FixedLenFeature([], tf.string)}
    for key in self.mask_keys:
      spec[MASK_PREFIX + key] = tf.io.FixedLenFeature([], tf.string)
      if self.hierarchy_size:
        spec[HIERARCHY_PREFIX + key] = tf.io.FixedLenFeature([], tf.string)
    return spec

  def lookup(self, example_id):
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
    serialized = tf.numpy_function(
        lambda i: np.array(self._records[int(i)], dtype=object),
        [example_id], tf.string, stateful=False)
    serialized.set_shape([])
    ex = tf.io.parse_single_example(serialized, self._features())
    image = tf.io.decode_jpeg(ex["image"], channels=3,
                              dct_method="INTEGER_ACCURATE")
    encoded = [ex[MASK_PREFIX + k] for k in self.mask_keys]
    trees = ([ex[HIERARCHY_PREFIX + k] for k in self.mask_keys]
             if self.hierarchy_size else [])
    tree = trees[0] if trees else None
    if len(encoded) == 1:
      mask_png = encoded[0]
    else:
      seed = tf.random.experimental.stateless_fold_in(
          tf.constant([self.seed, _CHOICE_SALT], tf.int64),
          tf.cast(example_id, tf.int64))
      choice = tf.random.stateless_uniform([], seed, maxval=len(encoded),
                                           dtype=tf.int64)
      mask_png = tf.gather(tf.stack(encoded), choice)
      if trees:
        tree = tf.gather(tf.stack(trees), choice)
    segments = tf.cast(tf.io.decode_png(mask_png, channels=1,
                                        dtype=tf.uint16)[..., 0], tf.int32)
    with tf.control_dependencies([tf.debugging.assert_equal(
        tf.shape(segments), tf.shape(image)[:2],
        message="mask and image sizes differ in a record")]):
      segments = tf.identity(segments)
    out = {"image": image, "segments": segments, "label": ex["label"],
           "id": ex["id"]}
    if tree is not None:
      n = self.hierarchy_size
      out["hierarchy"] = tf.reshape(
          tf.io.decode_raw(tree, tf.float32, little_endian=True), [n, n])
    return out
