"""Writes a records directory (format.py): shards, their stats, metadata.

One shard is written by one `ShardWriter` (a temporary file, renamed into
place when complete); `finalize` writes metadata.json once every shard
exists. Everything that writes records uses these: the precompute
(precompute.py, its CLI data/precompute.py and the Beam pipeline
data/beam_precompute.py) and Odin's mask cache (methods/odin_cache.py). A shard
is done when its records file and its stats file both exist, so a rerun
skips finished shards and an interrupted run leaves no half shard behind.
"""

from __future__ import annotations

import collections
import dataclasses
import os

import numpy as np

from odin_jax.data.records import format as fmt

SHARD_TARGET_SIZE = 1024        # examples per shard when not told otherwise


@dataclasses.dataclass(frozen=True)
class ExampleResult:
  """One input's outcome: its record bytes, or why it was skipped, and the
  counts its shard's stats (and metadata.json) sum up."""
  id: str
  record: bytes | None = None      # serialized tf.train.Example; None: skip
  skip_reason: str | None = None
  notes: tuple[str, ...] = ()      # conversions applied, e.g. ('cmyk',)
  num_segments: tuple[tuple[str, int], ...] = ()   # (mask key, n) pairs
  image_bytes: int = 0
  mask_bytes: tuple[tuple[str, int], ...] = ()


def shard_done(output_dir: str, shard: int, num_shards: int) -> bool:
  """True when shard's records and stats files both exist (it is complete)."""
  return all(os.path.exists(os.path.join(output_dir, f(shard, num_shards)))
             for f in (fmt.shard_name, fmt.stats_name))


class ShardWriter:
  """Writes one shard to a temporary file; close() renames it into place.

  The stats file is renamed before the records file, so a shard counts as
  done (both exist) only when both are complete.
  """

  def __init__(self, output_dir: str, shard: int, num_shards: int):
    from array_record.python import array_record_module  # pylint: disable=g-import-not-at-top
    self.path = os.path.join(output_dir, fmt.shard_name(shard, num_shards))
    self.stats_path = os.path.join(output_dir,
                                   fmt.stats_name(shard, num_shards))
    self._tmp = self.path + ".tmp"
    if os.path.exists(self._tmp):           # left by an interrupted run
      os.remove(self._tmp)
    self._writer = array_record_module.ArrayRecordWriter(
        self._tmp, fmt.WRITER_OPTIONS)
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
    fmt.write_json_atomic(self.stats_path, self.stats)
    os.replace(self._tmp, self.path)
    return self.stats


def finalize(output_dir: str, run_spec: dict) -> dict | None:
  """metadata.json from every shard's stats; None while shards are missing."""
  n = run_spec["num_shards"]
  if not all(shard_done(output_dir, s, n) for s in range(n)):
    return None
  stats = [fmt.read_json(os.path.join(output_dir, fmt.stats_name(s, n)))
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
      "shards": [{"file": fmt.shard_name(s, n),
                  "num_examples": st["num_examples"]}
                 for s, st in enumerate(stats)],
      "skipped": dict(sorted(skipped.items())),
      "notes": dict(sorted(notes.items())),
      "segments_per_image": dist,
      "bytes_per_example": {
          "image": per(sum(st["image_bytes"] for st in stats)),
          "masks": {k: per(v) for k, v in sorted(mask_bytes.items())},
          "record": per(sum(st["record_bytes"] for st in stats))}})
  fmt.write_json_atomic(os.path.join(output_dir, fmt.METADATA), meta)
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
