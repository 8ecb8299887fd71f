"""The precompute: inputs -> a records directory, in a pool of processes.

List the inputs (sorted relative paths / TFDS indices, inputs.py) -> order
them by sha256(seed, input) (a seeded shuffle that does not depend on
numpy's RNG) -> cut that order into num_shards contiguous shards -> run
every input through `examples.process_example` in a pool of processes (FH
holds the GIL, threads would not scale) -> the parent writes each shard in
order with a `writer.ShardWriter` -> metadata.json once every shard exists
(`writer.finalize`). Output is a pure function of the inputs and the
settings: a rerun skips finished shards and an interrupted + rerun job is
byte-identical to an uninterrupted one, for any num_workers.

Several machines can share one run (num_tasks / task_index: shard s belongs
to task s % num_tasks; the last one to finish writes metadata.json). The
command lines are data/precompute.py and data/beam_precompute.py (Beam runs
`prepare`'s plan); both take the flags of `define_flags`.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import hashlib
import math
import multiprocessing
import os
import time
from typing import Sequence

from absl import flags
from absl import logging
import numpy as np

from odin_jax.data import masks as masks_lib
from odin_jax.data.records import examples
from odin_jax.data.records import format as fmt
from odin_jax.data.records import inputs as inputs_lib
from odin_jax.data.records import settings
from odin_jax.data.records import writer

DEFAULT_MASKS = ("fh:scale=1000,sigma=0.8,min_size=1000",)


def plan_shards(locators: Sequence, num_shards: int,
                seed: int) -> list[list[int]]:
  """Input indices of each shard: a seeded shuffle cut into equal parts."""
  keys = [hashlib.sha256(f"{seed}/{loc}".encode()).digest() for loc in locators]
  order = sorted(range(len(locators)), key=keys.__getitem__)
  bounds = [s * len(order) // num_shards for s in range(num_shards + 1)]
  return [order[bounds[s]:bounds[s + 1]] for s in range(num_shards)]


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
  inputs: inputs_lib.FolderInputs | inputs_lib.TfdsInputs
  spec: examples.ExampleSpec
  run_spec: dict
  shards: list[list[int]]           # input indices of every shard
  pending: list[int]                # this task's shards still to write


def _command(o: Options, texts: Sequence[str], num_shards: int) -> str:
  return settings.precompute_command(
      o.source, o.output_dir, texts, num_shards=num_shards,
      **{k: getattr(o, k) for k in settings.RUN_FLAGS},
      tfds_data_dir=o.tfds_data_dir)


def prepare(o: Options) -> Plan:
  """Lists inputs, checks the output dir against earlier runs, plans shards."""
  inputs = inputs_lib.make_inputs(o.source, o.folder_labels, o.tfds_data_dir)
  by_key = {}
  for text in o.masks:
    cfg = settings.parse_mask_setting(text)
    if cfg.method == "fh_opencv":
      # Fail here, not as one 'mask_error' skip per image in the workers.
      masks_lib.compute_segments(np.zeros((8, 8, 3), np.uint8), cfg)
    by_key.setdefault(masks_lib.mask_config_key(cfg),
                      settings.mask_setting_string(cfg))
  if inputs.has_gt:
    by_key.setdefault("gt", "gt")
  if not by_key:
    raise ValueError("Give at least one --masks setting.")
  n = len(inputs.locators)
  num_shards = o.num_shards or max(1, math.ceil(n / writer.SHARD_TARGET_SIZE))
  if not 0 <= o.task_index < o.num_tasks:
    raise ValueError(f"task_index {o.task_index} not in [0, {o.num_tasks}).")
  spec = examples.ExampleSpec(tuple(by_key.values()), o.min_side,
                              o.max_side, o.jpeg_quality, o.skip_one_segment)
  digest = hashlib.sha256("\n".join(map(str, inputs.locators)).encode())
  if inputs.classes:
    digest.update(repr(sorted(inputs.classes.items())).encode())
  run_spec = {
      "format": fmt.FORMAT, "version": fmt.VERSION,
      "source": inputs.source, "inputs_sha256": digest.hexdigest(),
      "num_inputs": n, "num_shards": num_shards, "seed": o.seed,
      "mask_settings": by_key, "min_side": o.min_side,
      "max_side": o.max_side, "jpeg_quality": o.jpeg_quality,
      "folder_labels": o.folder_labels,
      "skip_one_segment": o.skip_one_segment,
      "has_labels": (bool(inputs.classes)
                     or isinstance(inputs, inputs_lib.TfdsInputs)),
      "command": _command(o, list(by_key.values()), num_shards)}
  _claim_output_dir(o.output_dir, run_spec)
  shards = plan_shards(inputs.locators, num_shards, o.seed)
  pending = [s for s in range(o.task_index, num_shards, o.num_tasks)
             if not writer.shard_done(o.output_dir, s, num_shards)]
  return Plan(inputs, spec, run_spec, shards, pending)


def _claim_output_dir(output_dir: str, run_spec: dict) -> None:
  """Writes run_spec to output_dir, or checks it against an earlier run's."""
  os.makedirs(output_dir, exist_ok=True)
  spec_path = os.path.join(output_dir, fmt.SPEC)
  if not os.path.exists(spec_path):
    fmt.write_json_atomic(spec_path, run_spec)
    return
  old = fmt.read_json(spec_path)
  diff = sorted(k for k in set(old) | set(run_spec) if k != "command"
                and old.get(k) != run_spec.get(k))
  if diff:
    raise ValueError(
        f"{output_dir} holds records of another precompute run (differs "
        f"in {diff}); use a new --output_dir or rerun the original command:"
        f"\n  {old.get('command')}")


_WORKER = {}


def _init_worker(loader, spec: examples.ExampleSpec) -> None:
  _WORKER["loader"], _WORKER["spec"] = loader, spec


def _work(locator) -> writer.ExampleResult:
  raw = _WORKER["loader"].load(locator)
  return examples.process_example(raw, _WORKER["spec"])


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

  def update(self, result: writer.ExampleResult, force: bool = False) -> None:
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
      shard_writer = writer.ShardWriter(o.output_dir, s, num_shards)
      for _ in plan.shards[s]:
        result = next(results)
        shard_writer.add(result)
        progress.update(result)
      shard_writer.close()
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
  meta = writer.finalize(o.output_dir, plan.run_spec)
  logging.info("precompute: wrote %d shards (%d images) in %.1f s with %d "
               "worker(s): %.2f images/s.", len(plan.pending), total, elapsed,
               workers, total / max(elapsed, 1e-9))
  if meta is None:
    logging.info("precompute: task %d/%d done; other tasks' shards are still "
                 "missing, metadata.json is written by the last one.",
                 o.task_index, o.num_tasks)
  else:
    logging.info("precompute summary (%s):\n%s", o.output_dir,
                 writer.format_summary(meta))
  return meta


# ------------------------------------------------------------------ flags --
def define_flags() -> None:
  """The flags of data/precompute.py and data/beam_precompute.py."""
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
  """Options from the flags of `define_flags` (after absl parsed them)."""
  f = flags.FLAGS
  names = [x.name for x in dataclasses.fields(Options)
           if x.name not in ("masks", "log_every_s")]
  return Options(masks=tuple(f.masks), **{k: f[k].value for k in names})
