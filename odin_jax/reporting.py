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

from odin_jax import numerics


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
  """TensorBoard + metrics.jsonl on process 0; the console elsewhere.

  Process 0 has no console writer: CLU's default writer logs every write
  (all scalars on one long line, the hparams as one dict), which doubled
  the training loop's own progress line (Progress.line) at each log step
  and the evaluation's table. The other processes print no progress line,
  so CLU's console writer is their one line per log step.
  """
  if jax.process_index() > 0:
    return metric_writers.create_default_writer(workdir, just_logging=True)
  return metric_writers.MultiWriter(
      [metric_writers.SummaryWriter(workdir),
       JsonlWriter(os.path.join(workdir, "metrics.jsonl"))])


def _readable(value) -> bool | int | float | str:
  """A config value as TensorBoard's hparams and a reader take it: numbers,
  booleans and strings as they are, sequences as 'a, b', None as 'None'."""
  if isinstance(value, (bool, int, float, str)):
    return value
  if isinstance(value, (tuple, list)):
    return ", ".join(str(_readable(v)) for v in value)
  return str(value)


def _leaves(config) -> list[tuple[str, Any]]:
  """(dotted name, value) of every leaf field of a ConfigDict."""
  return list(numerics.flatten_config(config).items())


def flat_config(config) -> dict[str, bool | int | float | str]:
  """{'augment.blur_prob': '1.0, 0.1', 'model.depth': 50, ...}: every leaf
  field under its dotted name, sorted by name, in the types TensorBoard's
  hparams take (the hparams written at step 0)."""
  return {k: _readable(v) for k, v in sorted(_leaves(config))}


def format_config(config) -> str:
  """One `  name = value` line per leaf field, sorted, values as Python
  writes them ('resnet', (1.0, 0.1), None): the config as train.log shows
  it, instead of the nested YAML-like ConfigDict dump."""
  return "\n".join(f"  {k} = {v!r}" for k, v in sorted(_leaves(config)))


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
  """Tracks throughput and prints one progress line with an ETA per log.

  The first step this process runs also compiles the train step and fills
  the input pipeline (seconds to minutes), so its time says nothing about
  the steps to come. Throughput, and the ETA from it, are measured from
  the end of that step: `step_done` records it. Until a later step is done
  the line shows the first step's time and no ETA.

  `clock` (seconds, monotonic) is injectable for tests.
  """

  def __init__(self, total_steps: int, global_batch: int, start_step: int,
               clock=time.perf_counter):
    self.total = total_steps
    self.batch = global_batch
    self._clock = clock
    self._started = (start_step, clock())
    self._first: tuple[int, float] | None = None   # (step, time) compiled
    self._last: tuple[int, float] | None = None    # previous rates() call

  def step_done(self, step: int) -> None:
    """Marks `step` finished on device (its metrics fetched); the first call
    ends the compiling step."""
    if self._first is None:
      self._first = (step, self._clock())

  def rates(self, step: int) -> dict[str, float]:
    """Images/s and steps/s since the previous call, or since the first step
    ended. At the first step itself (nothing measured after compiling yet)
    they are that step's, compilation included, and line() says so."""
    self.step_done(step)   # no-op unless the caller never marked a step
    now = self._clock()
    if step <= self._first[0]:
      since = self._started
    else:
      since = self._last if self._last is not None else self._first
      self._last = (step, now)
    steps = max(step - since[0], 1)
    dt = max(now - since[1], 1e-9)
    return {"train/images_per_sec": steps * self.batch / dt,
            "train/steps_per_sec": steps / dt}

  def line(self, step: int, scalars: Mapping[str, float]) -> str:
    head = (f"step {step}/{self.total} ({100.0 * step / self.total:.0f}%) "
            f"loss {scalars['train/loss']:.4f} "
            f"lr {scalars['train/learning_rate']:.4g} ")
    if self._first is None or step <= self._first[0]:
      compiling = ((self._first[1] if self._first else self._clock())
                   - self._started[1])
      return head + f"first step {compiling:.1f}s (compiling), ETA ?"
    sps = scalars.get("train/steps_per_sec", 0.0)
    eta = (self.total - step) / sps if sps > 0 else float("nan")
    return head + (f"{scalars.get('train/images_per_sec', 0):.1f} img/s "
                   f"ETA {_fmt_duration(eta) if eta == eta else '?'}")

