"""Reads a records directory (format.py): `RecordSource`, a sources.Source.

`RecordSource` serves the records to the training pipeline (data/pipeline.py)
and to Odin's mask cache (methods/odin_cache.py); its `shard_sizes` let
dataset.host_split='shards' give each host its own shard files
(pipeline.py). Readers open a shard file on its first read, so a host that
reads only its shards opens only those files. TensorFlow is imported here
(lazily), never by the writer.
"""

from __future__ import annotations

import os
from typing import Sequence

from absl import logging
import numpy as np

from odin_jax.data import masks as masks_lib
from odin_jax.data.records import format as fmt
from odin_jax.data.records.settings import RUN_FLAGS
from odin_jax.data.records.settings import as_mask_config
from odin_jax.data.records.settings import is_setting
from odin_jax.data.records.settings import mask_setting_string
from odin_jax.data.records.settings import parse_mask_setting
from odin_jax.data.records.settings import precompute_command

_CHOICE_SALT = 0x4D41_534B      # 'MASK': stream of the per-example mask choice


def _missing_records_message(records_dir: str, source: str,
                             settings: Sequence[str]) -> str:
  cmd = precompute_command(source, records_dir, settings)
  spec_path = os.path.join(records_dir or "", fmt.SPEC)
  if records_dir and os.path.exists(spec_path):
    spec = fmt.read_json(spec_path)
    return (f"Records in {records_dir!r} are incomplete: {fmt.METADATA} is "
            "written when every shard is done and it is missing (precompute "
            "was interrupted or is still running). Rerun the same command; it "
            "resumes, skipping finished shards:\n  " + spec.get("command", cmd))
  return (f"No precomputed records in {records_dir!r} (no {fmt.METADATA}). "
          f"Make them with:\n  {cmd}\nthen set --config.dataset.records_dir="
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
    meta_path = os.path.join(records_dir or "", fmt.METADATA)
    if not records_dir or not os.path.exists(meta_path):
      settings = [self._setting_string(m) for m in wanted]
      raise FileNotFoundError(_missing_records_message(
          records_dir, source_hint, settings))
    self.metadata = meta = fmt.read_json(meta_path)
    if (meta.get("format"), meta.get("version")) != (fmt.FORMAT, fmt.VERSION):
      raise ValueError(f"{meta_path} is not {fmt.FORMAT} version "
                       f"{fmt.VERSION} "
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
    if is_setting(m):
      return mask_setting_string(as_mask_config(m))
    return f"<setting with key {m}>"

  @staticmethod
  def _key(m) -> str:
    if is_setting(m):
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
      spec[fmt.MASK_PREFIX + key] = tf.io.FixedLenFeature([], tf.string)
      if self.hierarchy_size:
        spec[fmt.HIERARCHY_PREFIX + key] = tf.io.FixedLenFeature([], tf.string)
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
    encoded = [ex[fmt.MASK_PREFIX + k] for k in self.mask_keys]
    trees = ([ex[fmt.HIERARCHY_PREFIX + k] for k in self.mask_keys]
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
