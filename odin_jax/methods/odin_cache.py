"""Odin's cached masks: τ's segments of the whole dataset, written as records.

With discrete copies (odin.tau_update='copy'), τ is constant for a whole
period of odin.copy_every_epochs epochs, and so are its masks. With
odin.cached=True the step therefore does not run the discovery network and
k-means at all: at the start of every period a refresh job runs them once
over the dataset and writes the segments in the precompute record format
(data/records/format.py, mask key 'odin', written by records.writer) under

  WORKDIR/odin_masks/period_PPPPP/

Training reads images and masks from there exactly like precomputed FH masks
(records.RecordSource), so the step is DetCon-B's with the FPN backbone, and
only the refresh costs extra (one forward pass of τ per image per period).

Refresh of period p (τ = θ after p · period steps; p = 0: θ at init):
  image (whole, un-augmented) uint8 [H, W, 3]
    -> resized to the spanning-view side (odin.span_scale × image_size),
       like the continuous path's spanning view
    -> g_τ(f_τ(·)) per cell of the stride-4 grid, L2-normalised
    -> k-means, K = odin.num_clusters (odin.make_discover)
    -> segment ids on the grid, nearest-resized to [H, W], relabelled 0..n-1
    -> a 16-bit PNG in the record, next to the image (JPEG).
Refreshes are deterministic (the k-means key is a function of the run's rng,
p and the batch index) and resumable: shards are written atomically and
metadata.json last, so a run killed during a refresh redoes only the shards
that are missing, with the same bytes. Each host computes its slice of every
batch and writes its own shards (the record order does not matter: the
training stream draws example ids by permutation). Older periods are deleted
once the new one is complete.
"""

from __future__ import annotations

import math
import os
import shutil
import time

import jax
import numpy as np
from absl import logging

from odin_jax import numerics, sharding
from odin_jax.data import masks as masks_lib
from odin_jax.data import records
from odin_jax.data.records import writer as records_writer

MASK_KEY = "odin"              # records key of the discovered masks
_REFRESH_SALT = 0x4F44_494E    # 'ODIN': key stream of the refreshes
_JPEG_QUALITY = 95


def period_steps(config, num_examples: int) -> int:
  """Steps between two copies τ ← θ (and two mask refreshes)."""
  steps_per_epoch = max(1, num_examples // config.batch_size)  # as train.py
  return max(1, int(round(config.odin.copy_every_epochs * steps_per_epoch)))


def period_dir(workdir: str, period: int) -> str:
  return os.path.join(os.path.abspath(workdir), "odin_masks",
                      f"period_{period:05d}")


class MaskCache:
  """Refreshes and serves Odin's cached masks for one training run.

  source(state) -> a records.RecordSource of the period that state.step is
  in, refreshing it first (with state.method_state["tau"]) when it is missing.
  """

  def __init__(self, config, workdir: str, discover, mesh, base_source):
    """Args:
      config: an Odin config with odin.cached=True.
      workdir: the run's workdir (the records go under odin_masks/).
      discover: odin.make_discover(config, model): (τ, batch_stats, span,
        key) -> int32 [B, h, w] segments.
      mesh: the training mesh; the refresh batch is sharded over 'data'.
      base_source: the dataset the images come from (sources.make_source).
    """
    if config.odin.tau_update != "copy":
      raise ValueError("odin.cached=True needs odin.tau_update='copy': with "
                       "a continuous EMA τ changes every step, so its masks "
                       "cannot be cached.")
    self.config, self.workdir, self.mesh = config, workdir, mesh
    self.base = base_source
    self.num_examples = int(base_source.num_examples)
    self.period = period_steps(config, self.num_examples)
    self.span_size = int(round(config.odin.span_scale * config.image_size))
    self.batch_size = int(config.batch_size)
    # τ and the statistics keep the state's layout (replicated, or sharded
    # with sharding.fsdp); the images are split over 'data'.
    self._discover = jax.jit(
        discover, in_shardings=(None, None, sharding.batch_sharded(mesh),
                                None),
        out_shardings=sharding.batch_sharded(mesh))

  def period_of(self, step: int) -> int:
    return int(step) // self.period

  def refresh_due(self, step: int) -> bool:
    """True when `step` (steps done) starts a new period."""
    return int(step) > 0 and int(step) % self.period == 0

  def source(self, state, writer=None) -> records.RecordSource:
    """The records of state.step's period, refreshed first when missing."""
    p = self.period_of(jax.device_get(state.step))
    out = period_dir(self.workdir, p)
    if not os.path.exists(os.path.join(out, records.METADATA)):
      self.refresh(state, p, out, writer)
    self._remove_older(p)
    return records.RecordSource(out, [MASK_KEY], seed=self.config.seed,
                                source_hint="(refreshed by the Odin run)")

  # ---------------------------------------------------------------- refresh --
  def _images(self):
    """Numpy batches over examples 0..N-1 (padded by wrapping around):
    'span' float32 [G, s, s, 3], 'jpeg' bytes [G], 'height', 'width', 'label'
    int64 [G], 'id' bytes [G], 'valid' bool [G]."""
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
    n, g, s = self.num_examples, self.batch_size, self.span_size
    total = math.ceil(n / g) * g

    def load(position):
      example_id = position % n
      ex = self.base.lookup(example_id)
      image = ex["image"]
      span = tf.image.resize(tf.cast(image, tf.float32) / 255.0, (s, s),
                             method="bilinear", antialias=True)
      label = ex.get("label", tf.constant(-1, tf.int64))
      name = ex.get("id", tf.strings.as_string(example_id))
      return {"span": tf.clip_by_value(span, 0.0, 1.0),
              "jpeg": tf.io.encode_jpeg(image, quality=_JPEG_QUALITY),
              "height": tf.shape(image, out_type=tf.int64)[0],
              "width": tf.shape(image, out_type=tf.int64)[1],
              "label": tf.cast(label, tf.int64), "id": name,
              "valid": position < n}

    ds = tf.data.Dataset.range(total).map(
        load, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    return ds.batch(g).prefetch(2).as_numpy_iterator()

  def refresh(self, state, p: int, out: str, writer=None) -> dict:
    """Runs τ over the dataset and writes period p's records into `out`."""
    start = time.time()
    os.makedirs(out, exist_ok=True)
    g, hosts, h = self.batch_size, jax.process_count(), jax.process_index()
    local = g // hosts
    num_batches = math.ceil(self.num_examples / g)
    per_shard = max(1, records_writer.SHARD_TARGET_SIZE // local)
    num_chunks = math.ceil(num_batches / per_shard)
    num_shards = num_chunks * hosts
    run_spec = {
        "format": records.FORMAT, "version": records.VERSION,
        "source": f"odin:{os.path.abspath(self.workdir)}:period={p}",
        "num_inputs": self.num_examples, "num_shards": num_shards,
        "seed": int(self.config.seed), "mask_settings": {MASK_KEY: MASK_KEY},
        "jpeg_quality": _JPEG_QUALITY, "span_size": self.span_size,
        "num_clusters": int(self.config.odin.num_clusters),
        "step": int(jax.device_get(state.step)), "has_labels": False}
    if h == 0:
      records.write_json_atomic(os.path.join(out, records.SPEC), run_spec)
    logging.info("Odin mask refresh, period %d (step %d): %d images at %d px "
                 "into %s.", p, run_spec["step"], self.num_examples,
                 self.span_size, out)
    period_key = jax.random.fold_in(
        jax.random.fold_in(state.rng, _REFRESH_SALT), p)
    shard_writer, shard_of_chunk = None, None
    counts = []
    for b, batch in enumerate(self._images()):
      chunk = b // per_shard
      shard = chunk * hosts + h
      if records_writer.shard_done(out, shard, num_shards):
        continue       # written by an earlier, interrupted attempt
      if shard_of_chunk != shard:
        if shard_writer is not None:
          shard_writer.close()
        shard_writer, shard_of_chunk = records_writer.ShardWriter(
            out, shard, num_shards), shard
      rows = slice(h * local, (h + 1) * local)
      span = sharding.to_global(self.mesh, {"span": batch["span"][rows]})
      segments = self._discover(state.method_state["tau"], state.batch_stats,
                                span["span"], jax.random.fold_in(period_key, b))
      segments = _host_rows(segments)                       # [local, h, w]
      for i, row in enumerate(range(rows.start, rows.stop)):
        if not batch["valid"][row]:
          continue
        result = _example(batch, row, segments[i])
        counts.append(result.num_segments[0][1])
        shard_writer.add(result)
    if shard_writer is not None:
      shard_writer.close()
    _sync(f"odin_refresh_{p}")
    meta = None
    if h == 0:
      meta = records_writer.finalize(out, run_spec)
      if meta is None:
        raise RuntimeError(f"Odin mask refresh of period {p}: shards are "
                           f"missing in {out} after every host finished.")
    _sync(f"odin_refresh_{p}_done")
    if counts:
      logging.info("Odin mask refresh, period %d: %d images in %.1f s, "
                   "%.1f segments per image (min %d, max %d).", p, len(counts),
                   time.time() - start, np.mean(counts), min(counts),
                   max(counts))
    if writer is not None and counts:
      writer.write_scalars(run_spec["step"], {
          "discovery/cached_segments_per_image": float(np.mean(counts)),
          "discovery/refresh_seconds": time.time() - start})
    return meta or {}

  def _remove_older(self, p: int) -> None:
    if jax.process_index() != 0:
      return
    root = os.path.dirname(period_dir(self.workdir, p))
    for name in sorted(os.listdir(root)):
      if name.startswith("period_") and int(name[len("period_"):]) < p:
        shutil.rmtree(os.path.join(root, name), ignore_errors=True)
        logging.info("Removed Odin masks of an earlier period: %s", name)


def _example(batch: dict, row: int, grid_segments: np.ndarray):
  """One record: the image as JPEG and its segments resized to the image."""
  height, width = int(batch["height"][row]), int(batch["width"][row])
  segments = masks_lib.relabel_sequential(
      numerics.resize_nearest(np.asarray(grid_segments), (height, width)))
  png = records.encode_mask_png(segments)
  jpeg = bytes(batch["jpeg"][row])
  name = batch["id"][row]
  name = name.decode() if isinstance(name, bytes) else str(name)
  record = records.encode_example({
      "id": name, "image": jpeg, "height": height, "width": width,
      "label": int(batch["label"][row]),
      records.MASK_PREFIX + MASK_KEY: png})
  return records_writer.ExampleResult(
      name, record, num_segments=((MASK_KEY, int(segments.max()) + 1),),
      image_bytes=len(jpeg), mask_bytes=((MASK_KEY, len(png)),))


def _host_rows(array: jax.Array) -> np.ndarray:
  """This host's rows of a batch-sharded global array, in order."""
  if jax.process_count() == 1:
    return np.asarray(jax.device_get(array))
  shards = sorted(array.addressable_shards, key=lambda s: s.index[0].start)
  rows, seen = [], set()
  for s in shards:
    if s.index[0].start not in seen:      # replicas of a row block
      seen.add(s.index[0].start)
      rows.append(np.asarray(s.data))
  return np.concatenate(rows)


def _sync(name: str) -> None:
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    multihost_utils.sync_global_devices(name)
