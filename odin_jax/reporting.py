"""Metric writers (CLU -> TensorBoard, console, JSON lines) and progress.

Only process 0 writes files; other processes log to the console only.
`workdir/metrics.jsonl` holds one JSON object per written step, which is
easy to load with pandas and is what the tests read.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any, Mapping

import jax
import numpy as np
from clu import metric_writers
from clu.metric_writers import interface


def _open(path: str, mode: str):
  """open() for local paths; TensorFlow's gfile for URLs (gs://bucket/run),
  whose append mode rewrites the object (metrics files stay small)."""
  if "://" in path:
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
    return tf.io.gfile.GFile(path, mode)
  return open(path, mode, encoding="utf-8")


class JsonlWriter(interface.MetricWriter):
  """Appends `{"step": s, name: value, ...}` lines to a file."""

  def __init__(self, path: str):
    self._path = path
    if "://" not in path:   # object stores have no directories to make
      os.makedirs(os.path.dirname(path), exist_ok=True)

  def write_scalars(self, step: int, scalars: Mapping[str, Any]):
    record = {"step": int(step)}
    record.update({k: float(np.asarray(v)) for k, v in scalars.items()})
    with _open(self._path, "a") as f:
      f.write(json.dumps(record) + "\n")

  def write_summaries(self, step, values, metadata=None): pass
  def write_images(self, step, images): pass
  def write_videos(self, step, videos): pass
  def write_audios(self, step, audios, *, sample_rate): pass
  def write_texts(self, step, texts): pass
  def write_histograms(self, step, arrays, num_buckets=None): pass
  def write_pointcloud(self, step, point_clouds, *, point_colors=None,
                       configs=None): pass
  def write_hparams(self, hparams): pass
  def flush(self): pass
  def close(self): pass


def create_writer(workdir: str) -> metric_writers.MetricWriter:
  """TensorBoard + console (+ metrics.jsonl) on process 0; console elsewhere."""
  if jax.process_index() > 0:
    return metric_writers.create_default_writer(workdir, just_logging=True)
  default = metric_writers.create_default_writer(workdir, asynchronous=False)
  return metric_writers.MultiWriter(
      [default, JsonlWriter(os.path.join(workdir, "metrics.jsonl"))])


def read_metrics(workdir: str) -> list[dict]:
  """The records of `workdir/metrics.jsonl`, later duplicates of a step win."""
  path = os.path.join(workdir, "metrics.jsonl")
  by_step = {}
  with _open(path, "r") as f:
    for line in f:
      rec = json.loads(line)
      by_step.setdefault(rec["step"], {}).update(rec)
  return [by_step[s] for s in sorted(by_step)]


def _fmt_duration(seconds: float) -> str:
  seconds = int(max(seconds, 0))
  h, rem = divmod(seconds, 3600)
  m, s = divmod(rem, 60)
  return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"


class IntervalMean:
  """Averages per-step scalars between two log steps (CLU's Average metric).

  A single step's contrastive loss is noisy (the number of segments and the
  negatives change every batch); the mean over the logging interval is what
  shows the trend. `add` takes host floats; `result` returns the means and
  starts a new interval.
  """

  def __init__(self):
    self._sums: dict[str, float] = {}
    self._count = 0

  def add(self, scalars: Mapping[str, float]) -> None:
    for k, v in scalars.items():
      self._sums[k] = self._sums.get(k, 0.0) + float(v)
    self._count += 1

  def result(self) -> dict[str, float]:
    out = {k: v / max(self._count, 1) for k, v in self._sums.items()}
    self._sums, self._count = {}, 0
    return out


class Progress:
  """Tracks throughput and prints one progress line with an ETA per log."""

  def __init__(self, total_steps: int, global_batch: int, start_step: int):
    self.total = total_steps
    self.batch = global_batch
    self._last_step = start_step
    self._last_time = time.time()

  def rates(self, step: int) -> dict[str, float]:
    """Images/s and steps/s since the previous call."""
    now = time.time()
    steps = max(step - self._last_step, 1)
    dt = max(now - self._last_time, 1e-9)
    self._last_step, self._last_time = step, now
    return {"train/images_per_sec": steps * self.batch / dt,
            "train/steps_per_sec": steps / dt}

  def line(self, step: int, scalars: Mapping[str, float]) -> str:
    sps = scalars.get("train/steps_per_sec", 0.0)
    eta = (self.total - step) / sps if sps > 0 else float("nan")
    return (f"step {step}/{self.total} ({100.0 * step / self.total:.0f}%) "
            f"loss {scalars['train/loss']:.4f} "
            f"lr {scalars['train/learning_rate']:.4g} "
            f"{scalars.get('train/images_per_sec', 0):.1f} img/s "
            f"ETA {_fmt_duration(eta) if eta == eta else '?'}")

