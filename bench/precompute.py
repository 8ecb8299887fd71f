"""Mask precompute speed: images/s per core, parallel efficiency, ImageNet ETA.

Makes ImageNet-like JPEGs (about 500x375, random crops / flips / resizes of
the photos bundled with scikit-image), then runs the real precompute
(odin_jax.data.precompute.run: decode, FH, 16-bit PNG, record, shard write)
with 1 worker process and with every core, in the same run.
  python bench/precompute.py                       # 96 images, DetCon FH 1000
  python bench/precompute.py --images=200 --masks=fh:scale=1000 \
      --masks=slic:n_segments=100,compactness=10
  python bench/precompute.py --masks=fh_opencv:scale=1000   # OpenCV's FH
Prints a table; goals (issue 3): efficiency >= 0.9, ImageNet (1.33 M images)
on 16 cores <= 6 h, i.e. >= 10x faster than the reference script's 48-72 h.
The machine may be shared: os.getloadavg() is printed before and after.
"""
import argparse
import concurrent.futures
import functools
import multiprocessing
import os
import resource
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from odin_jax.data import demo  # noqa: E402
from odin_jax.data import masks  # noqa: E402
from odin_jax.data import records  # noqa: E402
from odin_jax.data.records import precompute  # noqa: E402

PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "motorcycle",
          "immunohistochemistry", "camera", "coins", "brick", "grass")
IMAGENET_IMAGES = 1_331_167       # ILSVRC-2012 train + val


def make_images(folder: str, n: int, seed: int = 0) -> None:
  """n JPEGs (quality 90) of 500x375 or 375x500, ImageNet-like."""
  rng = np.random.default_rng(seed)
  photos = [demo._load_photo(p) for p in PHOTOS]  # pylint: disable=protected-access
  for i in range(n):
    photo = photos[i % len(photos)]
    h, w = photo.shape[:2]
    ch, cw = int(h * rng.uniform(0.6, 1.0)), int(w * rng.uniform(0.6, 1.0))
    top, left = rng.integers(0, h - ch + 1), rng.integers(0, w - cw + 1)
    crop = photo[top:top + ch, left:left + cw]
    if rng.random() < 0.5:
      crop = crop[:, ::-1]
    size = (500, 375) if rng.random() < 0.75 else (375, 500)   # (w, h)
    Image.fromarray(np.ascontiguousarray(crop)).resize(
        size, Image.BICUBIC).save(os.path.join(folder, f"{i:05d}.jpg"),
                                  quality=90)


def _segment_file(path, setting):
  """Control workload: decode + the segmenter only (no PNG or records)."""
  image = np.asarray(Image.open(path).convert("RGB"))
  return int(masks.compute_segments(
      image, records.parse_mask_setting(setting)).max())


def control_rate(paths, workers, setting):
  """images/s of the bare segmenter over `paths` in a warm pool of `workers`
  processes.

  The ceiling any precompute with this mask setting can reach on this
  machine right now; the precompute's efficiency is read against this one's.
  """
  ctx = multiprocessing.get_context("spawn")
  run = functools.partial(_segment_file, setting=setting)
  with concurrent.futures.ProcessPoolExecutor(workers, mp_context=ctx) as pool:
    list(pool.map(run, paths[:workers]))                 # start + warm up
    t = time.perf_counter()
    list(pool.map(run, paths))
    return len(paths) / (time.perf_counter() - t)


def _cpu_s():
  """CPU seconds (user + system) of this process and its reaped children."""
  return sum(x.ru_utime + x.ru_stime for x in (
      resource.getrusage(resource.RUSAGE_SELF),
      resource.getrusage(resource.RUSAGE_CHILDREN)))


def timed_run(folder, out, settings, workers):
  """(wall s, CPU s of parent + workers, metadata) of one precompute run."""
  opts = precompute.Options(source=f"folder:{folder}", output_dir=out,
                            masks=tuple(settings), num_workers=workers,
                            num_shards=8, log_every_s=1e9)
  t, c = time.perf_counter(), _cpu_s()
  meta = precompute.run(opts)
  return time.perf_counter() - t, _cpu_s() - c, meta


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--images", type=int, default=96)
  p.add_argument("--masks", action="append", default=None)
  p.add_argument("--workers", type=int, default=len(os.sched_getaffinity(0)))
  p.add_argument("--target_cores", type=int, default=16)
  args = p.parse_args()
  masks_arg = args.masks or list(precompute.DEFAULT_MASKS)
  load_before = os.getloadavg()
  with tempfile.TemporaryDirectory() as tmp:
    folder = os.path.join(tmp, "images")
    os.makedirs(folder)
    make_images(folder, args.images)
    # The first setting's segmenter alone on the same images: how much of
    # the per-image cost is segmentation.
    first = records.parse_mask_setting(masks_arg[0])
    sample = [np.asarray(Image.open(os.path.join(folder, f)).convert("RGB"))
              for f in sorted(os.listdir(folder))[:8]]
    t = time.perf_counter()
    for im in sample:
      masks.compute_segments(im, first)
    fh_s = (time.perf_counter() - t) / len(sample)
    paths = sorted(os.path.join(folder, f) for f in os.listdir(folder))
    ctl1 = control_rate(paths, 1, masks_arg[0])
    ctl_n = control_rate(paths, args.workers, masks_arg[0])
    t1, c1, meta = timed_run(folder, os.path.join(tmp, "out1"), masks_arg, 1)
    tn, cn, meta_n = timed_run(folder, os.path.join(tmp, "outn"), masks_arg,
                               args.workers)
    same = all(open(os.path.join(tmp, "out1", s["file"]), "rb").read() ==
               open(os.path.join(tmp, "outn", s["file"]), "rb").read()
               for s in meta["shards"]) and meta == meta_n
  load_after = os.getloadavg()
  n = meta["num_inputs"]
  rate1, rate_n = n / t1, n / tn
  eff = rate_n / (args.workers * rate1)
  hours = IMAGENET_IMAGES / (rate1 * args.target_cores * min(eff, 1.0)) / 3600
  # Contention-robust variants: CPU time instead of wall time. On a shared
  # machine wall-clock rates measure the neighbours as much as this code.
  cpu_eff = c1 / cn
  cpu_hours = IMAGENET_IMAGES * (cn / n) / args.target_cores / 3600
  b = meta["bytes_per_example"]
  print(f"\n{n} JPEGs ~500x375, masks {list(meta['mask_settings'])}, "
        f"{meta['num_examples']} written")
  print(f"loadavg before {tuple(round(x, 2) for x in load_before)}, after "
        f"{tuple(round(x, 2) for x in load_after)} on {os.cpu_count()} cores")
  print(f"{'workers':>8s} {'wall (s)':>9s} {'images/s':>9s} {'per core':>9s}"
        f" {'CPU (s)':>8s} {'CPU s/img':>9s}")
  print(f"{1:8d} {t1:9.1f} {rate1:9.2f} {rate1:9.2f} {c1:8.1f} {c1 / n:9.3f}")
  print(f"{args.workers:8d} {tn:9.1f} {rate_n:9.2f} "
        f"{rate_n / args.workers:9.2f} {cn:8.1f} {cn / n:9.3f}")
  print(f"parallel efficiency ({args.workers} workers): wall {eff:.2f} "
        f"(pool start-up included), CPU {cpu_eff:.2f} (CPU(1) / CPU(N))")
  ctl_eff = ctl_n / (args.workers * ctl1)
  print(f"control ({masks_arg[0]} alone, warm pool): {ctl1:.2f} images/s with 1, "
        f"{ctl_n:.2f} with {args.workers} -> efficiency {ctl_eff:.2f}; "
        f"precompute / control efficiency {eff / ctl_eff:.2f}")
  print(f"wall core-seconds per image: {1 / rate1:.3f} (segmenter alone "
        f"{fh_s:.3f} s/image on the same images)")
  print(f"ImageNet {IMAGENET_IMAGES / 1e6:.2f} M images on "
        f"{args.target_cores} cores: {hours:.1f} h from wall rates, "
        f"{cpu_hours:.1f} h from CPU s/image (reference script: 48-72 h)")
  print(f"bytes/example: record {b['record'] / 1e3:.1f} kB (image "
        f"{b['image'] / 1e3:.1f} kB, masks "
        f"{', '.join(f'{k} {v / 1e3:.1f} kB' for k, v in b['masks'].items())})"
        f" -> ImageNet {b['record'] * IMAGENET_IMAGES / 1e9:.0f} GB")
  print(f"1-worker and {args.workers}-worker outputs byte-identical: {same}")


if __name__ == "__main__":
  main()
