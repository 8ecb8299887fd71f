"""What a records directory holds: file names, record features, bytes.

A records directory (written by `python -m odin_jax.data.precompute`, or by
Odin's mask cache, methods/odin_cache.py) holds

  records-SSSSS-of-NNNNN.array_record  ArrayRecord files (group_size 1, so any
                                       record is one seek away), each record a
                                       serialized tf.train.Example
  records-SSSSS-of-NNNNN.stats.json    per-shard counts (skips, segments, bytes)
  precompute_spec.json                 the run's settings (written first)
  metadata.json                        written last, when every shard is done;
                                       'format' = FORMAT, 'version' = VERSION

Each tf.train.Example has the features
  'id'           bytes  stable example id (relative file name, TFDS id)
  'image'        bytes  a JPEG: the original file when it was a plain RGB or
                        grayscale JPEG, else converted once to RGB JPEG
  'height','width' int64
  'label'        int64  class index, -1 when the source has none
  'masks/<key>'  bytes  16-bit grayscale PNG [H, W] of segment ids 0..n-1, one
                        per mask setting; <key> is masks.mask_config_key(...)
                        ('gt' for ground-truth instances when the source has
                        them, 'odin' for Odin's cached masks). 16 bits hold
                        n <= 65536 segments; examples with more are skipped,
                        never wrapped (the DetCon reference stored 8-bit ids
                        and merged every segment past 255).
  'hierarchy/<key>' bytes  (mask settings 'hierarchy:...' only) the region
                        tree's leaf distances d_T, float32 [L, L] little-endian
                        raw bytes (L = max_leaves); 'masks/<key>' then holds
                        the leaf ids (data/hierarchy.py).

Global example id g is record g of the concatenation of the shards in shard
order. A reader that finds another FORMAT or VERSION in metadata.json refuses
the directory (reader.py); bump VERSION when the features above change.
Nothing here imports TensorFlow: precompute workers stay light.
"""

from __future__ import annotations

import io
import json
import os
from typing import Any

import numpy as np

FORMAT = "odin_jax.records"
VERSION = 1
METADATA = "metadata.json"
SPEC = "precompute_spec.json"
MASK_PREFIX = "masks/"
HIERARCHY_PREFIX = "hierarchy/"
# One record per chunk (random access); JPEG/PNG payloads do not compress.
WRITER_OPTIONS = "group_size:1,uncompressed"
MAX_SEGMENTS = 1 << 16          # ids 0..65535 fit a 16-bit PNG


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
