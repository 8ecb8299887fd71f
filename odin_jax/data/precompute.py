r"""Precompute masks once: images + FH / SLIC / grid masks -> sharded records.

  python -m odin_jax.data.precompute --source=folder:/data/photos \
      --output_dir=/data/photos_records \
      --masks=fh:scale=1000,sigma=0.8,min_size=1000 \
      --masks=slic:n_segments=100,compactness=10
  python -m odin_jax.data.precompute --source=tfds:imagenet2012:train \
      --tfds_data_dir=$HOME/tensorflow_datasets --output_dir=/data/in1k_fh1000
  # ImageNet extracted to class folders (n01440764/*.JPEG), labels from them:
  python -m odin_jax.data.precompute --source=folder:/data/ILSVRC2012/train \
      --folder_labels --output_dir=/data/in1k_fh1000
  # COCO (DetCon: three FH scales, min_size = scale):
  python -m odin_jax.data.precompute --source=tfds:coco/2017:train \
      --output_dir=/data/coco_fh --masks=fh:scale=500,min_size=500 \
      --masks=fh:scale=1000,min_size=1000 --masks=fh:scale=1500,min_size=1500
  # Region trees for hierarchical grouping (leaf ids + leaf distances):
  python -m odin_jax.data.precompute --source=folder:/data/voc_coco \
      --output_dir=/data/voc_coco_hier --masks=hierarchy:max_leaves=40
Several machines can share one run: the same command with --num_tasks=M
--task_index=m on each (shard s belongs to task s % M; the last one to finish
writes metadata.json). Beyond that, beam_precompute.py.

How: list the inputs (sorted relative paths / TFDS indices) -> order them by
sha256(seed, input) (a seeded shuffle that does not depend on numpy's RNG) ->
cut that order into num_shards contiguous shards -> run every input through
`process_example` (a pure function: input bytes -> record bytes or a skip
reason) in a pool of processes (FH holds the GIL, threads would not scale) ->
the parent writes each shard in order to a temporary file and renames it when
complete -> metadata.json once every shard exists. Output is a pure function
of the inputs and the settings: a rerun skips finished shards and an
interrupted + rerun job is byte-identical to an uninterrupted one, for any
--num_workers. Bad inputs are converted or skipped and counted (records.py
and `normalize_image` say how); one example never stops the run.
The same `process_example` and `ShardWriter` run on Apache Beam in
beam_precompute.py. Format and reader: records.py.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import functools
import hashlib
import io
import math
import multiprocessing
import os
import time
from typing import Sequence

from absl import app
from absl import flags
from absl import logging
import numpy as np

from odin_jax.data import hierarchy as hierarchy_lib
from odin_jax.data import masks as masks_lib
from odin_jax.data import records

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".bmp", ".gif",
                    ".webp", ".tif", ".tiff", ".ppm", ".pgm", ".pnm")
DEFAULT_MASKS = ("fh:scale=1000,sigma=0.8,min_size=1000",)
SHARD_TARGET_SIZE = 1024        # examples per shard when --num_shards=0


@dataclasses.dataclass(frozen=True)
class RawExample:
  """One input as read from its source (before any decoding)."""
  id: str                          # stable id: relative path / TFDS id
  data: bytes | None               # the encoded image file
  label: int = -1
  gt: np.ndarray | None = None     # int [H, W] instance ids (0 = background)
  error: str | None = None         # why data could not be read


@dataclasses.dataclass(frozen=True)
class ExampleSpec:
  """Everything process_example's output depends on besides the input."""
  mask_settings: tuple[str, ...]   # canonical records.mask_setting_string()s
  min_side: int = 32               # skip images whose shorter side is smaller
  max_side: int = 0                # >0: downscale longer sides above this
  jpeg_quality: int = 95           # for converted images only
  skip_one_segment: bool = False   # else kept (a global mask) and counted


@dataclasses.dataclass(frozen=True)
class ExampleResult:
  id: str
  record: bytes | None = None      # serialized tf.train.Example; None: skip
  skip_reason: str | None = None
  notes: tuple[str, ...] = ()      # conversions applied, e.g. ('cmyk',)
  num_segments: tuple[tuple[str, int], ...] = ()   # (mask key, n) pairs
  image_bytes: int = 0
  mask_bytes: tuple[tuple[str, int], ...] = ()


class _Skip(Exception):
  pass


# ----------------------------------------------------- the per-example part --
def _to_uint8(array: np.ndarray, mode: str) -> np.ndarray:
  """High-bit-depth or float [H, W] pixels -> uint8 (full range kept)."""
  a = np.nan_to_num(array.astype(np.float64))
  lo, hi = float(a.min()), float(a.max())
  if mode.startswith("I;16") or (mode == "I" and lo >= 0 and 255 < hi < 65536):
    a = a / 257.0
  elif not (lo >= 0 and hi <= 255) or mode == "F":
    a = (a - lo) * (255.0 / max(hi - lo, 1e-12))
  return np.clip(np.round(a), 0, 255).astype(np.uint8)


def normalize_image(data: bytes, spec: ExampleSpec):
  """Image file -> (stored JPEG bytes, uint8 [H, W, 3], notes, (H0, W0)).

  A plain 8-bit RGB or grayscale JPEG is stored as is. Everything else is
  converted once to a JPEG (grayscale stays one channel): CMYK and other
  colour modes -> RGB; alpha -> composited on black; 16-bit / float ->
  8 bit over the full range; palette -> RGB; animations -> first frame.
  The returned pixels are the decoded *stored* JPEG, so masks are computed on
  what training reads. Raises _Skip('corrupt' | 'too_large' | 'too_small').
  """
  from PIL import Image  # pylint: disable=g-import-not-at-top
  try:
    im = Image.open(io.BytesIO(data))
    fmt = (im.format or "unknown").lower()
    im.load()                       # decodes fully: truncation raises here
  except Image.DecompressionBombError:
    raise _Skip("too_large") from None
  except Exception:  # pylint: disable=broad-except
    raise _Skip("corrupt") from None
  mode, notes = im.mode, []
  if getattr(im, "n_frames", 1) > 1:
    notes.append("multi_frame")
  if mode.startswith("I;16") or (fmt == "png" and data[24:25] == b"\x10"):
    notes.append("high_bit_depth")          # byte 24 = PNG IHDR bit depth
  gray = mode in ("1", "L", "LA", "La", "I", "F") or mode.startswith("I;16")
  if gray:
    notes.append("grayscale")
  # MPO: a camera JPEG with extra frames; decoders read its first one.
  keep = fmt in ("jpeg", "mpo") and mode in ("RGB", "L")
  if mode in ("I", "F") or mode.startswith("I;16"):
    pixels = _to_uint8(np.asarray(im), mode)
  elif "A" in mode or "a" in mode or "transparency" in im.info:
    notes.append("alpha")
    rgba = np.asarray(im.convert("LA" if gray else "RGBA")).astype(np.uint32)
    alpha = rgba[..., -1:]
    pixels = ((rgba[..., :-1] * alpha + 127) // 255).astype(np.uint8)
    pixels = pixels[..., 0] if gray else pixels
  elif mode in ("1", "L"):
    pixels = np.asarray(im.convert("L"))
  elif mode == "RGB":
    pixels = np.asarray(im)
  else:                                     # P, CMYK, YCbCr, LAB, HSV, ...
    notes.append({"P": "palette", "CMYK": "cmyk"}.get(mode, f"mode_{mode}"))
    pixels = np.asarray(im.convert("RGB"))
  original_hw = pixels.shape[:2]
  if min(original_hw) < spec.min_side:
    raise _Skip("too_small")
  if spec.max_side and max(original_hw) > spec.max_side:
    f = spec.max_side / max(original_hw)
    size = (max(1, round(original_hw[1] * f)),
            max(1, round(original_hw[0] * f)))
    pixels = np.asarray(Image.fromarray(pixels).resize(size, Image.BICUBIC))
    notes.append("resized")
    keep = False
  if keep:
    stored = data
  else:
    notes.append(f"converted_{fmt}")
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "JPEG", quality=spec.jpeg_quality,
                                 subsampling=0)   # 4:4:4, no timestamps
    stored = buf.getvalue()
    with Image.open(io.BytesIO(stored)) as decoded:
      pixels = np.array(decoded)
  if pixels.ndim == 2:
    pixels = np.repeat(pixels[..., None], 3, axis=-1)
  return stored, np.ascontiguousarray(pixels[..., :3]), notes, original_hw


@functools.lru_cache(maxsize=16)
def _mask_configs(settings: tuple[str, ...]):
  return tuple(records.parse_mask_setting(s) for s in settings)


def _gt_segments(gt, original_hw, hw) -> np.ndarray:
  gt = np.asarray(gt)
  if gt.shape[:2] != tuple(original_hw):
    raise _Skip("gt_shape_mismatch")
  if tuple(hw) != tuple(original_hw):       # image was resized: nearest
    rows = np.arange(hw[0]) * original_hw[0] // hw[0]
    cols = np.arange(hw[1]) * original_hw[1] // hw[1]
    gt = gt[np.ix_(rows, cols)]
  return masks_lib.relabel_sequential(gt)


def process_example(raw: RawExample, spec: ExampleSpec) -> ExampleResult:
  """One input -> its record, or a skip reason. Pure; never raises.

  Skip reasons: the read error, 'corrupt', 'too_large', 'too_small',
  'one_segment:<key>' (FH/SLIC gave one segment, with spec.skip_one_segment;
  else kept and noted), 'too_many_segments:<key>'
  (> 65536, would not fit 16 bits), 'mask_error:<key>', 'no_gt',
  'gt_shape_mismatch', 'error:<ExceptionType>'.
  """
  try:
    if raw.error or raw.data is None:
      raise _Skip(raw.error or "unreadable")
    stored, rgb, notes, original_hw = normalize_image(raw.data, spec)
    h, w = rgb.shape[:2]
    features = {"id": raw.id, "image": stored, "height": h, "width": w,
                "label": int(raw.label)}
    counts, sizes = [], []
    for cfg in _mask_configs(spec.mask_settings):
      key = masks_lib.mask_config_key(cfg)
      if cfg.method == "gt":
        if raw.gt is None:
          raise _Skip("no_gt")
        seg = _gt_segments(raw.gt, original_hw, (h, w))
      else:
        try:
          if cfg.method == "hierarchy":   # leaf ids + the tree's distances
            tree = hierarchy_lib.hierarchy_from_config(rgb, cfg)
            seg = tree.leaves
            features[records.HIERARCHY_PREFIX + key] = (
                records.encode_distances(tree.distances))
          else:
            seg = masks_lib.compute_segments(rgb, cfg)
        except Exception:  # pylint: disable=broad-except
          raise _Skip(f"mask_error:{key}") from None
      n = int(seg.max()) + 1
      if n > records.MAX_SEGMENTS:
        raise _Skip(f"too_many_segments:{key}")
      if n == 1 and cfg.method in ("fh", "fh_opencv", "slic"):
        if spec.skip_one_segment:
          raise _Skip(f"one_segment:{key}")
        notes.append(f"one_segment:{key}")
      png = records.encode_mask_png(seg)
      features[records.MASK_PREFIX + key] = png
      counts.append((key, n))
      sizes.append((key, len(png)))
    return ExampleResult(raw.id, records.encode_example(features), None,
                         tuple(notes), tuple(counts), len(stored), tuple(sizes))
  except _Skip as skip:
    return ExampleResult(raw.id, skip_reason=str(skip))
  except Exception as e:  # pylint: disable=broad-except
    logging.warning("precompute: %s failed: %s: %s", raw.id,
                    type(e).__name__, e)
    return ExampleResult(raw.id, skip_reason=f"error:{type(e).__name__}")


# ------------------------------------------------------------------ inputs --
class FolderLoader:
  """Reads one image file of a folder; label = index of its top directory."""

  def __init__(self, root: str, classes: dict[str, int] | None):
    self.root, self.classes = root, classes

  def load(self, rel: str) -> RawExample:
    label = self.classes.get(rel.split("/")[0], -1) if self.classes else -1
    try:
      with open(os.path.join(self.root, *rel.split("/")), "rb") as f:
        return RawExample(rel, f.read(), label)
    except OSError as e:
      logging.warning("precompute: cannot read %s: %s", rel, e)
      return RawExample(rel, None, label, error="unreadable")


class FolderInputs:
  """Every image file under a folder (recursive), as sorted relative paths."""

  def __init__(self, root: str, labels: bool = False):
    if not root or not os.path.isdir(root):
      raise FileNotFoundError(f"Image folder {root!r} does not exist.")
    self.root = os.path.abspath(root)
    rels = []
    for top, dirs, files in os.walk(self.root, followlinks=True):
      dirs.sort()
      rel_top = os.path.relpath(top, self.root).replace(os.sep, "/")
      rels.extend(f if rel_top == "." else f"{rel_top}/{f}" for f in files
                  if f.lower().endswith(IMAGE_EXTENSIONS))
    if not rels:
      raise FileNotFoundError(f"No image files ({', '.join(IMAGE_EXTENSIONS)})"
                              f" under {root!r}.")
    self.locators = sorted(rels)
    self.classes = None
    if labels:   # ImageNet-style class_dir/image.jpg
      self.classes = {c: i for i, c in enumerate(sorted(
          {r.split("/")[0] for r in self.locators if "/" in r}))}
    self.source = f"folder:{self.root}"
    self.has_gt = False

  def loader(self) -> FolderLoader:
    return FolderLoader(self.root, self.classes)


class TfdsLoader:
  """Reads one example of a TFDS split (ArrayRecord data source, lazily)."""

  def __init__(self, name, split, data_dir, keys: dict[str, str | None]):
    self.name, self.split, self.data_dir = name, split, data_dir
    self.keys = keys
    self._source = None

  def __getstate__(self):             # ship the settings, not the open files
    return {**self.__dict__, "_source": None}

  def load(self, index: int) -> RawExample:
    from PIL import Image  # pylint: disable=g-import-not-at-top
    if self._source is None:
      import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
      skip = {k: tfds.decode.SkipDecoding() for k in
              (self.keys["image"], self.keys["gt"]) if k}
      self._source = tfds.builder(self.name, data_dir=self.data_dir
                                  ).as_data_source(self.split, decoders=skip)
    k = self.keys
    ex = self._source[int(index)]
    ident = ex[k["id"]] if k["id"] else f"{self.name}/{self.split}/{index}"
    ident = ident.decode() if isinstance(ident, bytes) else str(ident)
    gt = None
    if k["gt"]:   # COCO panoptic PNG: id = R + 256 G + 256^2 B
      rgb = np.asarray(Image.open(io.BytesIO(ex[k["gt"]])).convert("RGB"),
                       np.int64)
      gt = rgb[..., 0] + 256 * rgb[..., 1] + 65536 * rgb[..., 2]
    label = int(ex[k["label"]]) if k["label"] else -1
    return RawExample(ident, bytes(ex[k["image"]]), label, gt)


class TfdsInputs:
  """A prepared TFDS split (ArrayRecord format) addressed by example index."""

  def __init__(self, name: str, split: str, data_dir: str | None):
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
    from odin_jax.data import sources  # pylint: disable=g-import-not-at-top
    builder = tfds.builder(name, data_dir=data_dir)
    if not builder.is_prepared():
      raise RuntimeError(
          sources._prepare_instructions(name, data_dir))  # pylint: disable=protected-access
    feats = builder.info.features
    keys = dict(sources.tfds_keys(feats),
                gt="panoptic_image" if "panoptic_image" in feats else None)
    self._loader = TfdsLoader(name, split, data_dir, keys)
    n = builder.info.splits[split].num_examples
    self.locators = list(range(n))
    self.classes = None
    self.source = f"tfds:{name}:{split}"
    self.has_gt = keys["gt"] is not None
    self.version = str(builder.info.version)

  def loader(self) -> TfdsLoader:
    return self._loader


def make_inputs(source: str, folder_labels=False, tfds_data_dir=None):
  """'folder:/path' or 'tfds:name[:split]' -> FolderInputs / TfdsInputs."""
  kind, _, rest = source.partition(":")
  if kind == "folder" and rest:
    return FolderInputs(rest, labels=folder_labels)
  if kind == "tfds" and rest:
    name, _, split = rest.partition(":")
    return TfdsInputs(name, split or "train", tfds_data_dir)
  raise ValueError(f"--source={source!r}: use folder:/path/to/images or "
                   "tfds:NAME[:SPLIT] (e.g. tfds:imagenet2012:train).")


# --------------------------------------------------------------- shards ----
def plan_shards(locators: Sequence, num_shards: int,
                seed: int) -> list[list[int]]:
  """Input indices of each shard: a seeded shuffle cut into equal parts."""
  keys = [hashlib.sha256(f"{seed}/{loc}".encode()).digest() for loc in locators]
  order = sorted(range(len(locators)), key=keys.__getitem__)
  bounds = [s * len(order) // num_shards for s in range(num_shards + 1)]
  return [order[bounds[s]:bounds[s + 1]] for s in range(num_shards)]


def shard_done(output_dir: str, shard: int, num_shards: int) -> bool:
  return all(os.path.exists(os.path.join(output_dir, f(shard, num_shards)))
             for f in (records.shard_name, records.stats_name))


class ShardWriter:
  """Writes one shard to a temporary file; close() renames it into place.

  The stats file is renamed before the records file, so a shard counts as
  done (both exist) only when both are complete.
  """

  def __init__(self, output_dir: str, shard: int, num_shards: int):
    from array_record.python import array_record_module  # pylint: disable=g-import-not-at-top
    self.path = os.path.join(output_dir, records.shard_name(shard, num_shards))
    self.stats_path = os.path.join(output_dir,
                                   records.stats_name(shard, num_shards))
    self._tmp = self.path + ".tmp"
    if os.path.exists(self._tmp):           # left by an interrupted run
      os.remove(self._tmp)
    self._writer = array_record_module.ArrayRecordWriter(
        self._tmp, records.WRITER_OPTIONS)
    self.stats = {"shard": shard, "num_inputs": 0, "num_examples": 0,
                  "skipped": {}, "skipped_ids": [], "notes": {},
                  "num_segments": {}, "image_bytes": 0, "mask_bytes": {},
                  "record_bytes": 0}

  def add(self, r: ExampleResult) -> None:
    s = self.stats
    s["num_inputs"] += 1
    if r.record is None:
      s["skipped"][r.skip_reason] = s["skipped"].get(r.skip_reason, 0) + 1
      s["skipped_ids"].append([r.id, r.skip_reason])
      return
    self._writer.write(r.record)
    s["num_examples"] += 1
    for note in r.notes:
      s["notes"][note] = s["notes"].get(note, 0) + 1
    for key, n in r.num_segments:
      s["num_segments"].setdefault(key, []).append(n)
    for key, n in r.mask_bytes:
      s["mask_bytes"][key] = s["mask_bytes"].get(key, 0) + n
    s["image_bytes"] += r.image_bytes
    s["record_bytes"] += len(r.record)

  def close(self) -> dict:
    self._writer.close()
    records.write_json_atomic(self.stats_path, self.stats)
    os.replace(self._tmp, self.path)
    return self.stats


def finalize(output_dir: str, run_spec: dict) -> dict | None:
  """metadata.json from every shard's stats; None while shards are missing."""
  n = run_spec["num_shards"]
  if not all(shard_done(output_dir, s, n) for s in range(n)):
    return None
  stats = [records.read_json(os.path.join(output_dir, records.stats_name(s, n)))
           for s in range(n)]
  skipped, notes, mask_bytes = (collections.Counter() for _ in range(3))
  segments = collections.defaultdict(list)
  for st in stats:
    skipped.update(st["skipped"])
    notes.update(st["notes"])
    mask_bytes.update(st["mask_bytes"])
    for key, counts in st["num_segments"].items():
      segments[key].extend(counts)
  total = sum(st["num_examples"] for st in stats)
  per = lambda b: round(b / max(total, 1), 1)  # noqa: E731
  dist = {}
  for key, counts in sorted(segments.items()):
    q = np.percentile(counts, [0, 5, 50, 95, 100])
    dist[key] = {"min": int(q[0]), "p5": float(q[1]), "median": float(q[2]),
                 "p95": float(q[3]), "max": int(q[4]),
                 "mean": round(float(np.mean(counts)), 2),
                 "over_256": int(np.sum(np.asarray(counts) > 256))}
  meta = {k: v for k, v in run_spec.items() if k != "command"}
  meta.update({
      "num_examples": total,
      "shards": [{"file": records.shard_name(s, n),
                  "num_examples": st["num_examples"]}
                 for s, st in enumerate(stats)],
      "skipped": dict(sorted(skipped.items())),
      "notes": dict(sorted(notes.items())),
      "segments_per_image": dist,
      "bytes_per_example": {
          "image": per(sum(st["image_bytes"] for st in stats)),
          "masks": {k: per(v) for k, v in sorted(mask_bytes.items())},
          "record": per(sum(st["record_bytes"] for st in stats))}})
  records.write_json_atomic(os.path.join(output_dir, records.METADATA), meta)
  return meta


def format_summary(meta: dict) -> str:
  """Human-readable end-of-run summary of a metadata dict."""
  skipped = sum(meta["skipped"].values())
  lines = [f"{meta['num_examples']} examples in {meta['num_shards']} shards "
           f"({meta['num_inputs']} inputs, {skipped} skipped)."]
  def fmt(counts):
    return ", ".join(f"{k} {v}" for k, v in counts.items()) or "none"
  lines.append(f"  skipped:   {fmt(meta['skipped'])}")
  lines.append(f"  converted: {fmt(meta['notes'])}")
  for key, d in meta["segments_per_image"].items():
    lines.append(f"  segments/image {key}: min {d['min']}, p5 {d['p5']:g}, "
                 f"median {d['median']:g}, p95 {d['p95']:g}, max {d['max']}, "
                 f"mean {d['mean']:g}; {d['over_256']} images > 256")
  b = meta["bytes_per_example"]
  masks_kb = ", ".join(f"{k} {v / 1e3:.1f}" for k, v in b["masks"].items())
  lines.append(f"  bytes/example: image {b['image'] / 1e3:.1f} kB, masks "
               f"[{masks_kb}] kB, record {b['record'] / 1e3:.1f} kB")
  return "\n".join(lines)


# ------------------------------------------------------------------ driver --
@dataclasses.dataclass
class Options:
  source: str                       # folder:/path | tfds:name[:split]
  output_dir: str
  masks: Sequence[str] = DEFAULT_MASKS
  num_shards: int = 0               # 0: ceil(num_inputs / 1024)
  num_workers: int = 0              # 0: every available core
  seed: int = 0
  min_side: int = 32
  max_side: int = 0
  jpeg_quality: int = 95
  skip_one_segment: bool = False
  folder_labels: bool = False
  tfds_data_dir: str | None = None
  num_tasks: int = 1                # split shards over several machines
  task_index: int = 0
  log_every_s: float = 10.0


@dataclasses.dataclass
class Plan:
  inputs: FolderInputs | TfdsInputs
  spec: ExampleSpec
  run_spec: dict
  shards: list[list[int]]           # input indices of every shard
  pending: list[int]                # this task's shards still to write


def _command(o: Options, settings: Sequence[str], num_shards: int) -> str:
  return records.precompute_command(
      o.source, o.output_dir, settings, num_shards=num_shards,
      **{k: getattr(o, k) for k in records.RUN_FLAGS},
      tfds_data_dir=o.tfds_data_dir)


def prepare(o: Options) -> Plan:
  """Lists inputs, checks the output dir against earlier runs, plans shards."""
  inputs = make_inputs(o.source, o.folder_labels, o.tfds_data_dir)
  by_key = {}
  for text in o.masks:
    cfg = records.parse_mask_setting(text)
    if cfg.method == "fh_opencv":
      # Fail here, not as one 'mask_error' skip per image in the workers.
      masks_lib.compute_segments(np.zeros((8, 8, 3), np.uint8), cfg)
    by_key.setdefault(masks_lib.mask_config_key(cfg),
                      records.mask_setting_string(cfg))
  if inputs.has_gt:
    by_key.setdefault("gt", "gt")
  if not by_key:
    raise ValueError("Give at least one --masks setting.")
  n = len(inputs.locators)
  num_shards = o.num_shards or max(1, math.ceil(n / SHARD_TARGET_SIZE))
  if not 0 <= o.task_index < o.num_tasks:
    raise ValueError(f"task_index {o.task_index} not in [0, {o.num_tasks}).")
  spec = ExampleSpec(tuple(by_key.values()), o.min_side, o.max_side,
                     o.jpeg_quality, o.skip_one_segment)
  digest = hashlib.sha256("\n".join(map(str, inputs.locators)).encode())
  if inputs.classes:
    digest.update(repr(sorted(inputs.classes.items())).encode())
  run_spec = {
      "format": records.FORMAT, "version": records.VERSION,
      "source": inputs.source, "inputs_sha256": digest.hexdigest(),
      "num_inputs": n, "num_shards": num_shards, "seed": o.seed,
      "mask_settings": by_key, "min_side": o.min_side,
      "max_side": o.max_side, "jpeg_quality": o.jpeg_quality,
      "folder_labels": o.folder_labels,
      "skip_one_segment": o.skip_one_segment,
      "has_labels": bool(inputs.classes) or isinstance(inputs, TfdsInputs),
      "command": _command(o, list(by_key.values()), num_shards)}
  os.makedirs(o.output_dir, exist_ok=True)
  spec_path = os.path.join(o.output_dir, records.SPEC)
  if os.path.exists(spec_path):
    old = records.read_json(spec_path)
    diff = sorted(k for k in set(old) | set(run_spec) if k != "command"
                  and old.get(k) != run_spec.get(k))
    if diff:
      raise ValueError(
          f"{o.output_dir} holds records of another precompute run (differs "
          f"in {diff}); use a new --output_dir or rerun the original command:"
          f"\n  {old.get('command')}")
  else:
    records.write_json_atomic(spec_path, run_spec)
  shards = plan_shards(inputs.locators, num_shards, o.seed)
  pending = [s for s in range(o.task_index, num_shards, o.num_tasks)
             if not shard_done(o.output_dir, s, num_shards)]
  return Plan(inputs, spec, run_spec, shards, pending)


_WORKER = {}


def _init_worker(loader, spec: ExampleSpec) -> None:
  _WORKER["loader"], _WORKER["spec"] = loader, spec


def _work(locator) -> ExampleResult:
  return process_example(_WORKER["loader"].load(locator), _WORKER["spec"])


def _ordered_map(pool, fn, items, window: int):
  """pool.map with at most `window` tasks in flight (bounded memory)."""
  pending = collections.deque()
  for item in items:
    pending.append(pool.submit(fn, item))
    if len(pending) >= window:
      yield pending.popleft().result()
  while pending:
    yield pending.popleft().result()


class _Progress:
  """Logs 'done/total, rate, ETA' at most every `every_s` seconds."""

  def __init__(self, total: int, every_s: float):
    self.total, self.every_s, self.done, self.skipped = total, every_s, 0, 0
    self.start = self._last = time.perf_counter()

  def update(self, result: ExampleResult, force: bool = False) -> None:
    self.done += 1
    self.skipped += result.record is None
    now = time.perf_counter()
    if force or now - self._last >= self.every_s or self.done == self.total:
      self._last = now
      rate = self.done / max(now - self.start, 1e-9)
      eta = (self.total - self.done) / max(rate, 1e-9)
      logging.info("precompute: %d/%d images (%.1f%%), %.2f images/s, ETA "
                   "%s, %d skipped", self.done, self.total,
                   100 * self.done / max(self.total, 1), rate,
                   time.strftime("%H:%M:%S", time.gmtime(eta)) if eta < 86400
                   else f"{eta / 3600:.0f}h", self.skipped)


def run(o: Options) -> dict | None:
  """Runs (or resumes) a precompute; metadata dict, None if shards remain."""
  plan = prepare(o)
  p, num_shards = plan.inputs, plan.run_spec["num_shards"]
  total = sum(len(plan.shards[s]) for s in plan.pending)
  logging.info("precompute: %d inputs from %s, %d shards (%d to write, %d "
               "images), masks %s -> %s", len(p.locators), p.source,
               num_shards, len(plan.pending), total,
               list(plan.run_spec["mask_settings"]), o.output_dir)
  tasks = (p.locators[i] for s in plan.pending for i in plan.shards[s])
  workers = o.num_workers or len(os.sched_getaffinity(0))
  progress = _Progress(total, o.log_every_s)
  start = time.perf_counter()
  if workers == 1 or total == 0:
    _init_worker(p.loader(), plan.spec)
    results, pool = map(_work, tasks), None
  else:
    # spawn, not fork: the parent may hold TensorFlow / JAX threads. A worker
    # that dies raises BrokenProcessPool here (multiprocessing.Pool would
    # respawn it forever and hang).
    pool = concurrent.futures.ProcessPoolExecutor(
        workers, mp_context=multiprocessing.get_context("spawn"),
        initializer=_init_worker, initargs=(p.loader(), plan.spec))
    results = _ordered_map(pool, _work, tasks, window=8 * workers)
  ok = False
  try:
    for s in plan.pending:
      writer = ShardWriter(o.output_dir, s, num_shards)
      for _ in plan.shards[s]:
        result = next(results)
        writer.add(result)
        progress.update(result)
      writer.close()
    ok = True
  except concurrent.futures.process.BrokenProcessPool as e:
    raise RuntimeError(
        "A precompute worker process died (out of memory? killed?). Finished "
        "shards are kept: rerun the same command to resume. --num_workers=1 "
        "runs in-process (also needed where 'spawn' cannot re-import the main "
        "module, e.g. code piped to python on stdin).") from e
  finally:
    if pool is not None:
      pool.shutdown(wait=ok, cancel_futures=not ok)
  elapsed = time.perf_counter() - start
  meta = finalize(o.output_dir, plan.run_spec)
  logging.info("precompute: wrote %d shards (%d images) in %.1f s with %d "
               "worker(s): %.2f images/s.", len(plan.pending), total, elapsed,
               workers, total / max(elapsed, 1e-9))
  if meta is None:
    logging.info("precompute: task %d/%d done; other tasks' shards are still "
                 "missing, metadata.json is written by the last one.",
                 o.task_index, o.num_tasks)
  else:
    logging.info("precompute summary (%s):\n%s", o.output_dir,
                 format_summary(meta))
  return meta


# --------------------------------------------------------------------- CLI --
def define_flags() -> None:
  """The command-line flags (also used by beam_precompute)."""
  flags.DEFINE_string("source", None, "folder:/path/to/images (recursive) or "
                      "tfds:NAME[:SPLIT], e.g. tfds:imagenet2012:train.")
  flags.DEFINE_string("output_dir", None, "Directory of the records.")
  flags.DEFINE_multi_string("masks", list(DEFAULT_MASKS),
                            "Mask settings, repeatable: fh:scale=..,sigma=..,"
                            "min_size=.. | slic:n_segments=..,compactness=.. "
                            "| grid:size=.. | gt | hierarchy:max_leaves=..,"
                            "superpixels=..,compactness=..,sigma=..,"
                            "min_leaf_area=...")
  flags.DEFINE_integer("num_shards", 0, "0: one shard per 1024 inputs.")
  flags.DEFINE_integer("num_workers", 0, "Processes; 0: all cores.")
  flags.DEFINE_integer("seed", 0, "Seed of the order of examples in shards.")
  flags.DEFINE_integer("min_side", 32, "Skip images with a shorter side.")
  flags.DEFINE_integer("max_side", 0, "Downscale longer sides to this; 0: no.")
  flags.DEFINE_integer("jpeg_quality", 95, "JPEG quality of converted images.")
  flags.DEFINE_bool("skip_one_segment", False, "Skip images where FH / SLIC "
                    "finds one segment (default: keep them, counted).")
  flags.DEFINE_bool("folder_labels", False, "label = index of the top-level "
                    "directory of each image (ImageNet layout).")
  flags.DEFINE_string("tfds_data_dir", None, "TFDS data_dir.")
  flags.DEFINE_integer("num_tasks", 1, "Machines sharing this run.")
  flags.DEFINE_integer("task_index", 0, "This machine's index.")
  flags.mark_flags_as_required(["source", "output_dir"])


def options_from_flags() -> Options:
  f = flags.FLAGS
  names = [x.name for x in dataclasses.fields(Options)
           if x.name not in ("masks", "log_every_s")]
  return Options(masks=tuple(f.masks), **{k: f[k].value for k in names})


def main(argv) -> None:
  del argv
  run(options_from_flags())


if __name__ == "__main__":
  # Run through the importable module, so pool workers unpickle
  # odin_jax.data.precompute._work rather than a second copy from __main__.
  from odin_jax.data import precompute as _module  # pylint: disable=g-import-not-at-top,import-self
  _module.define_flags()
  app.run(_module.main)
