"""Input pipeline throughput: view pairs/s per core at 224 px from records.

Precomputes FH masks for ImageNet-like JPEGs (bench/precompute.py's images)
and times the training pipeline (pipeline.make_train_dataset: read record,
decode JPEG + 16-bit PNG, two 224 px views with their masks: crop, flip,
resize, uint8; batch) with 1 and 2 tf.data workers, against, in the same
run, the former host path that also applied the colour recipe on the host
(data/host_color.py, what training did before the colour ops moved into
the step: data/color.py). Then the feed-rate check: host pairs/s per core
x cores per chip against what the chip consumes at 50 % of its peak FLOPs,
from the AOT tool's FLOPs per image (bench/results/aot/detcon_b_v4-64.json,
`python bench/aot_table.py --only=detcon_b_v4-64`).
  python bench/input_pipeline.py                      # 64 images, batch 64
  python bench/input_pipeline.py --records_dir=DIR    # existing records
  python bench/input_pipeline.py --smoke              # tiny, for the tests
"""
import argparse
import importlib.util
import itertools
import json
import os
import sys
import tempfile
import time

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, _ROOT)

from configs import detcon_b  # noqa: E402
from odin_jax.data import host_color  # noqa: E402
from odin_jax.data import pipeline  # noqa: E402
from odin_jax.data import records  # noqa: E402
from odin_jax.data import sources  # noqa: E402
from odin_jax.data import stream  # noqa: E402
from odin_jax.data.records import precompute  # noqa: E402


def _bench_precompute():
  spec = importlib.util.spec_from_file_location(
      "bench_precompute", os.path.join(_ROOT, "bench", "precompute.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


# Chips' peak dense bf16 FLOP/s and the host cores that feed each chip.
CHIPS = {
    # v4: 275 TFLOP/s per chip; a v4 host has 240 vCPUs for its 4 chips.
    "TPU v4": (275e12, 240 / 4),
    # H100 SXM: 989 TFLOP/s dense bf16; a typical 8-GPU node, 208 vCPUs.
    "H100": (989e12, 208 / 8),
}
AOT_JSON = os.path.join(_ROOT, "bench", "results", "aot", "detcon_b_v4-64.json")
# The paper arithmetic's ResNet-50 BYOL-style step (bench/aot_table.py) when
# no AOT result is cached: 2 views x (3 + 1) x 8.2 GFLOPs.
FALLBACK_FLOPS_PER_IMAGE = 65.6e9


def with_host_colour(config, dataset):
  """The former host path: the colour recipe applied on the host, after the
  geometry, per example, with the draws the host pipeline used to make."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  seed = int(config.seed)

  def colour(example):
    return host_color.host_color_views(
        example, stream.augment_seed_at(example["index"], seed), config)

  batch = dataset.element_spec["view1"].shape[0]
  workers = int(config.dataset.num_parallel_calls)
  return dataset.unbatch().map(colour, num_parallel_calls=workers,
                               deterministic=True).batch(
                                   batch, drop_remainder=True).prefetch(2)


def pairs_per_second(config, source, batch, steps, warmup, *, workers,
                     host_colour=False):
  """View pairs/s of the training pipeline with `workers` tf.data threads."""
  config = config.copy_and_resolve_references()
  config.dataset.num_parallel_calls = workers
  config.dataset.private_threads = workers
  ds = pipeline.make_train_dataset(config, source, global_batch_size=batch,
                                   process_index=0, process_count=1)
  if host_colour:
    ds = with_host_colour(config, ds)
  it = pipeline.numpy_batches(ds)
  for b in itertools.islice(it, warmup):
    assert b["view1"].shape[1] == config.image_size and b["mask1"].max() >= 0
  t = time.perf_counter()
  for _ in itertools.islice(it, steps):
    pass
  return steps * batch / (time.perf_counter() - t)


def decoded_per_second(source, batch, steps):
  """Examples/s of source.lookup alone (read + decode, no views)."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  ds = tf.data.Dataset.range(source.num_examples).repeat().map(
      lambda i: tf.reduce_sum(tf.cast(source.lookup(i)["segments"], tf.int64)),
      num_parallel_calls=tf.data.AUTOTUNE).batch(batch).prefetch(2)
  it = iter(ds)
  next(it)
  t = time.perf_counter()
  for _ in range(steps):
    next(it)
  return steps * batch / (time.perf_counter() - t)


def flops_per_image() -> tuple[float, str]:
  """DetCon-B ResNet-50's step FLOPs per image and where the number is from."""
  if os.path.exists(AOT_JSON):
    with open(AOT_JSON, encoding="utf-8") as f:
      return float(json.load(f)["flops_per_image"]), os.path.relpath(
          AOT_JSON, _ROOT)
  return FALLBACK_FLOPS_PER_IMAGE, "paper arithmetic (no AOT JSON cached)"


def feed_rate_lines(per_core: float) -> list[str]:
  """Host supply (pairs/s per core x cores per chip) against each chip's
  demand at 50 % of peak FLOPs."""
  flops, origin = flops_per_image()
  lines = [f"Feed rate (DetCon-B ResNet-50, {flops / 1e9:.1f} GFLOPs per "
           f"image from {origin}; demand at 50 % of peak):"]
  for chip, (peak, cores) in CHIPS.items():
    demand = 0.5 * peak / flops
    supply = per_core * cores
    lines.append(f"  {chip:7s} {cores:5.0f} cores/chip x {per_core:6.1f} = "
                 f"{supply:7.0f} pairs/s vs {demand:6.0f} needed: "
                 f"{'enough' if supply >= demand else 'INPUT-BOUND'} "
                 f"({supply / demand:.2f}x)")
  return lines


def main(argv=None):
  p = argparse.ArgumentParser()
  p.add_argument("--images", type=int, default=64)
  p.add_argument("--records_dir", default=None)
  p.add_argument("--batch", type=int, default=64)
  p.add_argument("--steps", type=int, default=8)
  p.add_argument("--warmup", type=int, default=2)
  p.add_argument("--workers", default="1,2",
                 help="tf.data worker threads to time, comma-separated")
  p.add_argument("--smoke", action="store_true",
                 help="8 images at 64 px, 1 timed batch of 8 (tests)")
  args = p.parse_args(argv)
  c = detcon_b.get_config("imagenet")      # 224 px, FH scale 1000
  if args.smoke:
    c.image_size = 64
    args.images, args.batch, args.steps, args.warmup = 8, 8, 1, 1
  workers = [int(w) for w in args.workers.split(",")]
  load_before = os.getloadavg()
  rows = []
  with tempfile.TemporaryDirectory() as tmp:
    folder = os.path.join(tmp, "images")
    os.makedirs(folder)
    _bench_precompute().make_images(folder, args.images)
    records_dir = args.records_dir
    if records_dir is None:
      records_dir = os.path.join(tmp, "records")
      precompute.run(precompute.Options(
          source=f"folder:{folder}", output_dir=records_dir,
          masks=(records.mask_setting_string(c.masks),), num_shards=4,
          log_every_s=1e9))
    source = records.RecordSource(records_dir, c.masks)
    dec = decoded_per_second(source, args.batch, args.steps)
    for w in workers:
      timed = lambda host: pairs_per_second(
          c, source, args.batch, args.steps, args.warmup, workers=w,
          host_colour=host)
      before, now = timed(True), timed(False)
      rows.append((w, before, now))
  load_after = os.getloadavg()
  print(f"\n{c.image_size} px view pairs + masks from records, batch "
        f"{args.batch}, {os.cpu_count()} cores, loadavg before "
        f"{tuple(round(x, 2) for x in load_before)}, after "
        f"{tuple(round(x, 2) for x in load_after)}")
  print(f"read + decode alone: {dec:.1f} examples/s (AUTOTUNE threads)")
  print(f"{'workers':>7s} {'host colour':>12s} {'device colour':>14s} "
        f"{'per core: before':>17s} {'now':>7s} {'ratio':>6s}")
  for w, before, now in rows:
    print(f"{w:7d} {before:12.1f} {now:14.1f} {before / w:17.1f} "
          f"{now / w:7.1f} {now / before:5.2f}x")
  best = max(now / w for w, _, now in rows)
  print(f"Goal: >= 4x per core and >= 200 pairs/s per core; best per core "
        f"now {best:.1f}.")
  print("\n".join(feed_rate_lines(best)))
  return rows


if __name__ == "__main__":
  main()
