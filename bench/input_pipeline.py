"""Input pipeline throughput: view pairs/s with masks at 224 px from records.

Precomputes FH masks for ImageNet-like JPEGs (bench/precompute.py's images),
then times the training pipeline (pipeline.make_train_dataset: read record,
decode JPEG + 16-bit PNG, two augmented 224 px views with their masks, batch)
on RecordSource, against the same pipeline on FolderSource computing FH on
the fly (what non-demo sources did before precompute), in the same run.
  python bench/input_pipeline.py                      # 64 images, batch 64
  python bench/input_pipeline.py --records_dir=DIR    # existing records
The model's consumption rate comes from bench/step_time.py, e.g.
  python bench/step_time.py --depth=50 --width=1 --image_size=224 --batch=64
consumes batch / step_time pairs/s per host; the input pipeline must exceed
it on each host (per host: its CPU cores feed its accelerators).
"""
import argparse
import importlib.util
import itertools
import os
import sys
import tempfile
import time

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, _ROOT)

from configs import detcon_b  # noqa: E402
from odin_jax.data import pipeline  # noqa: E402
from odin_jax.data import precompute  # noqa: E402
from odin_jax.data import records  # noqa: E402
from odin_jax.data import sources  # noqa: E402


def _bench_precompute():
  spec = importlib.util.spec_from_file_location(
      "bench_precompute", os.path.join(_ROOT, "bench", "precompute.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def pairs_per_second(config, source, batch, steps, warmup):
  ds = pipeline.make_train_dataset(config, source, global_batch_size=batch,
                                   process_index=0, process_count=1)
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


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--images", type=int, default=64)
  p.add_argument("--records_dir", default=None)
  p.add_argument("--batch", type=int, default=64)
  p.add_argument("--steps", type=int, default=8)
  p.add_argument("--warmup", type=int, default=2)
  p.add_argument("--skip_on_the_fly", action="store_true")
  args = p.parse_args()
  c = detcon_b.get_config("imagenet")      # 224 px, FH scale 1000
  load_before = os.getloadavg()
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
    rec = pairs_per_second(c, source, args.batch, args.steps, args.warmup)
    fly = None
    if not args.skip_on_the_fly:
      fly = pairs_per_second(c, sources.FolderSource(folder, c.masks),
                             args.batch, max(2, args.steps // 4), 1)
  load_after = os.getloadavg()
  print(f"\n224 px view pairs + masks, batch {args.batch}, {os.cpu_count()} "
        f"cores, loadavg before {tuple(round(x, 2) for x in load_before)}, "
        f"after {tuple(round(x, 2) for x in load_after)}")
  print(f"{'source':32s} {'pairs/s':>8s}")
  print(f"{'RecordSource (precomputed FH)':32s} {rec:8.1f}")
  print(f"{'  its read + decode alone':32s} {dec:8.1f}   (examples/s, no "
        "views: the rest is augmentation)")
  if fly is not None:
    print(f"{'FolderSource (FH on the fly)':32s} {fly:8.1f}   "
          f"-> records {rec / fly:.1f}x faster")
  print("Model consumption: batch / step time of bench/step_time.py "
        "(--depth=50 --width=1 --image_size=224) on the training "
        "accelerators; input must be faster per host.")


if __name__ == "__main__":
  main()
