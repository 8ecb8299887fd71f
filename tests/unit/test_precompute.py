"""Tests of mask precompute (precompute.py, beam_precompute.py) and records.py.

Small crops of the photos bundled with scikit-image stand in for ImageNet;
precompute runs once per module and the tests read what it wrote.
"""

from __future__ import annotations

import io
import itertools
import os
import struct
import zlib

import numpy as np
from PIL import Image
import pytest
import tensorflow as tf

from configs import detcon_b
from odin_jax.data import masks
from odin_jax.data import pipeline
from odin_jax.data import records
from odin_jax.data import sources
from odin_jax.data.records import precompute
from odin_jax import reporting, train
from tests.helpers import FH, photo  # pylint: disable=g-bad-import-order

FH_KEY = "fh_s100_sig0.8_min50"
GRID = "grid:size=20"          # 400 cells: ids past 255
NUM_SHARDS = 3


def _save(path, array, fmt, **kw):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  Image.fromarray(array).save(path, fmt, **kw)


def _png48(path, rgb16):
  """A 16-bit-per-channel RGB PNG (PIL cannot write one)."""
  h, w, _ = rgb16.shape
  raw = b"".join(b"\0" + row.astype(">u2").tobytes() for row in rgb16)
  chunk = lambda t, d: (struct.pack(">I", len(d)) + t + d +  # noqa: E731
                        struct.pack(">I", zlib.crc32(t + d)))
  with open(path, "wb") as f:
    f.write(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(
        ">IIBBBBB", w, h, 16, 2, 0, 0, 0)) + chunk(b"IDAT", zlib.compress(raw))
            + chunk(b"IEND", b""))


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
  """8 valid images in 3 class dirs: JPEG (RGB, gray), PNG, WebP."""
  root = str(tmp_path_factory.mktemp("photos"))
  _save(f"{root}/a/astronaut.jpg", photo("astronaut", 40, 60), "JPEG")
  _save(f"{root}/a/coffee.jpg", photo("coffee", 100, 200), "JPEG")
  _save(f"{root}/a/camera.jpg", photo("camera", 100, 100), "JPEG")  # gray
  _save(f"{root}/b/chelsea.jpg", photo("chelsea", 50, 100), "JPEG")
  _save(f"{root}/b/rocket.png", photo("rocket", 100, 200), "PNG")
  _save(f"{root}/b/ihc.jpg", photo("immunohistochemistry", 0, 0), "JPEG")
  _save(f"{root}/c/astro2.webp", photo("astronaut", 250, 200), "WEBP",
        quality=90)
  _save(f"{root}/c/coffee2.JPEG", photo("coffee", 0, 0), "JPEG")
  with open(f"{root}/c/readme.txt", "w") as f:
    f.write("not an image")
  return root


def _options(folder, out, **kw):
  kw = {"masks": (FH, GRID), "num_shards": NUM_SHARDS, "num_workers": 2,
        "folder_labels": True, "log_every_s": 1e9, **kw}
  return precompute.Options(source=f"folder:{folder}", output_dir=str(out),
                            **kw)


@pytest.fixture(scope="module")
def precomputed(folder, tmp_path_factory):
  out = tmp_path_factory.mktemp("records")
  meta = precompute.run(_options(folder, out))
  return str(out), meta


def _files(directory):
  return {f: open(os.path.join(directory, f), "rb").read()
          for f in sorted(os.listdir(directory))}


def _decode(serialized):
  f = tf.train.Example.FromString(serialized).features.feature
  return {k: (v.bytes_list.value[0] if v.HasField("bytes_list")
              else v.int64_list.value[0]) for k, v in f.items()}


def test_mask_setting_syntax():
  cfg = records.parse_mask_setting("fh:scale=500,min_size=500")
  assert (cfg.method, cfg.fh_scale, cfg.fh_sigma, cfg.fh_min_size) == (
      "fh", 500.0, 0.8, 500)
  assert (records.mask_setting_string(cfg)
          == "fh:scale=500,sigma=0.8,min_size=500")
  # The key of a setting is the key of the same config.masks fields.
  c = detcon_b.get_config()
  c.masks.method, c.masks.slic_n_segments = "slic", 100
  s = records.mask_setting_string(c.masks)
  assert s == "slic:n_segments=100,compactness=10"
  assert (masks.mask_config_key(records.parse_mask_setting(s))
          == masks.mask_config_key(c.masks) == "slic_n100_c10")
  assert records.parse_mask_setting("grid:size=7").grid_size == 7
  with pytest.raises(ValueError, match="takes scale"):
    records.parse_mask_setting("fh:scael=3")
  with pytest.raises(ValueError, match="method must be one of"):
    records.parse_mask_setting("watershed:markers=5")


def test_example_bytes_equal_tensorflow_serialization():
  features = {"id": "a/ü.jpg", "image": bytes(range(256)) * 3, "label": -1,
              "height": 300, "masks/grid20": b"\x89PNG"}
  feature = tf.train.Feature
  want = tf.train.Example(features=tf.train.Features(feature={
      "id": feature(bytes_list=tf.train.BytesList(value=["a/ü.jpg".encode()])),
      "image": feature(bytes_list=tf.train.BytesList(
          value=[bytes(range(256)) * 3])),
      "label": feature(int64_list=tf.train.Int64List(value=[-1])),
      "height": feature(int64_list=tf.train.Int64List(value=[300])),
      "masks/grid20": feature(bytes_list=tf.train.BytesList(
          value=[b"\x89PNG"]))}))
  assert records.encode_example(features) == want.SerializeToString(
      deterministic=True)


def test_16_bit_mask_png_round_trip_through_tf():
  ids = (np.arange(37 * 53).reshape(37, 53) * 35) % records.MAX_SEGMENTS
  ids[0, 0] = records.MAX_SEGMENTS - 1
  png = records.encode_mask_png(ids)
  got = tf.io.decode_png(png, channels=1, dtype=tf.uint16).numpy()[..., 0]
  np.testing.assert_array_equal(got.astype(np.int64), ids)
  with pytest.raises(ValueError, match="65535"):
    records.encode_mask_png(np.full((4, 4), records.MAX_SEGMENTS))


def test_round_trip_images_masks_labels(precomputed, folder):
  out, meta = precomputed
  assert meta["num_examples"] == 8 and meta["skipped"] == {}
  assert meta["notes"] == {"converted_png": 1, "converted_webp": 1,
                           "grayscale": 1}
  assert meta["segments_per_image"]["grid20"]["over_256"] == 8
  fh = records.RecordSource(out, FH)
  grid = records.RecordSource(out, "grid20")     # by key works too
  assert fh.num_examples == grid.num_examples == 8
  classes = {"a": 0, "b": 1, "c": 2}
  seen = []
  for i in range(8):
    ex = fh.lookup(tf.constant(i, tf.int64))
    name = ex["id"].numpy().decode()
    seen.append(name)
    assert ex["label"].numpy() == classes[name.split("/")[0]]
    image, seg = ex["image"].numpy(), ex["segments"].numpy()
    assert image.dtype == np.uint8 and image.shape == (90, 120, 3)
    stored = _decode(fh.read_serialized(i))["image"]
    if name.endswith(".jpg"):    # valid JPEGs are stored byte for byte
      assert stored == open(os.path.join(folder, name), "rb").read()
    pil = np.asarray(Image.open(io.BytesIO(stored)).convert("RGB"))
    assert np.abs(pil.astype(int) - image).max() <= 2
    # Stored FH map == FH recomputed independently on the stored image.
    np.testing.assert_array_equal(
        seg, masks.compute_segments(pil, records.parse_mask_setting(FH)))
    assert 1 < seg.max() + 1 < 256
    g = grid.lookup(tf.constant(i, tf.int64))["segments"].numpy()
    np.testing.assert_array_equal(g, masks.grid_segments(90, 120, 20))
    assert g.max() == 399                       # no wrap past 255
  assert sorted(seen) == sorted(
      f"{d}/{f}" for d in "abc" for f in os.listdir(os.path.join(folder, d))
      if not f.endswith(".txt"))
  assert seen != sorted(seen)                    # shards are shuffled


def test_interrupted_rerun_is_byte_identical(precomputed, folder, tmp_path):
  out, _ = precomputed
  want = _files(out)
  # One worker here, two in the fixture: output must not depend on it.
  opts = _options(folder, tmp_path, num_workers=1)
  precompute.run(opts)
  # Interrupt: shard 1 lost its records, shard 2 its stats and left a stale
  # half-written temporary file; metadata.json not written yet.
  name = lambda s: records.shard_name(s, NUM_SHARDS)  # noqa: E731
  os.remove(tmp_path / name(1))
  os.remove(tmp_path / records.stats_name(2, NUM_SHARDS))
  (tmp_path / (name(2) + ".tmp")).write_bytes(b"half a shard")
  os.remove(tmp_path / records.METADATA)
  kept = os.stat(tmp_path / name(0)).st_mtime_ns
  with pytest.raises(FileNotFoundError, match="incomplete"):
    records.RecordSource(str(tmp_path), FH)
  precompute.run(opts)
  assert os.stat(tmp_path / name(0)).st_mtime_ns == kept   # not rewritten
  got = _files(tmp_path)
  assert sorted(got) == sorted(want)                        # no .tmp left
  spec_got, spec_want = (records.read_json(os.path.join(d, records.SPEC))
                         for d in (tmp_path, out))
  assert spec_got.pop("command") != spec_want.pop("command")  # output_dir
  assert spec_got == spec_want
  for f in want:
    if f != records.SPEC:
      assert got[f] == want[f], f
  # Other settings into the same directory are refused.
  with pytest.raises(ValueError, match="another precompute run"):
    precompute.run(_options(folder, tmp_path, num_workers=1, seed=1))


def test_tasks_on_several_machines_equal_one_run(precomputed, folder,
                                                  tmp_path):
  out, _ = precomputed
  def opts(m):
    return _options(folder, tmp_path, num_workers=1, num_tasks=2,
                    task_index=m)
  assert precompute.run(opts(1)) is None         # shard 0 (task 0) missing
  assert not os.path.exists(tmp_path / records.METADATA)
  assert precompute.run(opts(0))["num_examples"] == 8
  want, got = _files(out), _files(tmp_path)
  assert sorted(got) == sorted(want)
  for f in want:
    if f != records.SPEC:
      assert got[f] == want[f], f


def test_bad_inputs_are_converted_or_skipped_and_counted(tmp_path):
  root = tmp_path / "in"
  rgb = photo("chelsea", 50, 100)
  _save(f"{root}/ok.jpg", rgb, "JPEG")
  buf = io.BytesIO()
  Image.fromarray(rgb).save(buf, "JPEG")
  jpeg = buf.getvalue()
  (root / "truncated.jpg").write_bytes(jpeg[:len(jpeg) // 2])
  (root / "garbage.png").write_bytes(np.random.default_rng(0).bytes(3000))
  (root / "empty.jpg").write_bytes(b"")
  _save(f"{root}/gray.png", photo("camera", 100, 100), "PNG")
  Image.fromarray(rgb).convert("CMYK").save(f"{root}/cmyk.jpg", "JPEG")
  rgba = np.dstack([rgb, np.tile(np.linspace(0, 255, 120, dtype=np.uint8),
                                 (90, 1))])
  _save(f"{root}/alpha.png", rgba, "PNG")
  gray16 = (photo("camera", 100, 100).astype(np.uint16) * 257)
  gray16[:, :10] = 65535
  _save(f"{root}/gray16.png", gray16, "PNG")
  rgb16 = rgb.astype(np.uint16) * 257
  _png48(f"{root}/rgb48.png", rgb16)
  Image.fromarray(rgb).convert("P").save(f"{root}/palette.gif",
                                         transparency=0)
  Image.fromarray(rgb).convert("P").save(f"{root}/palette.png")
  _save(f"{root}/tiny.png", rgb[:20, :20], "PNG")
  _save(f"{root}/flat.png", np.full((90, 120, 3), 128, np.uint8), "PNG")
  out = tmp_path / "out"
  meta = precompute.run(_options(root, out, masks=(FH,), num_shards=2,
                                 num_workers=1, folder_labels=False))
  assert meta["skipped"] == {"corrupt": 3, "too_small": 1}
  assert meta["notes"] == {
      "alpha": 2, "cmyk": 1, "converted_gif": 1, "converted_jpeg": 1,
      "converted_png": 6, "grayscale": 2, "high_bit_depth": 2,
      f"one_segment:{FH_KEY}": 1, "palette": 1}
  assert meta["num_examples"] == 9 and meta["num_inputs"] == 13
  source = records.RecordSource(str(out), FH)
  images = {}
  for i in range(source.num_examples):
    ex = source.lookup(tf.constant(i, tf.int64))
    assert ex["image"].shape == (90, 120, 3)
    name = ex["id"].numpy().decode()
    assert (ex["segments"].numpy().max() > 0) == (name != "flat.png")
    images[name] = ex["image"].numpy().astype(int)
  assert set(images) == {"ok.jpg", "gray.png", "cmyk.jpg", "alpha.png",
                         "gray16.png", "rgb48.png", "palette.gif",
                         "palette.png", "flat.png"}
  # 16 bit -> 8 bit over the full range; alpha composited on black.
  # (JPEG-stored, so compared on average; clipping 16-bit values to 255
  # instead of scaling them would be off by ~100.)
  close = lambda a, b: np.abs(a - b).mean() < 4.0  # noqa: E731
  assert close(images["gray16.png"][..., 0], gray16 / 257)
  assert close(images["rgb48.png"], rgb)
  assert close(images["alpha.png"], rgb * (rgba[..., 3:] / 255.0))
  # CMYK was itself saved at JPEG quality 75 (mean error ~5 before our
  # re-encode); inverted or unconverted ink values would be off by > 50.
  assert np.abs(images["cmyk.jpg"] - rgb).mean() < 8
  paletted = np.asarray(Image.fromarray(rgb).convert("P").convert("RGB"))
  assert close(images["palette.png"], paletted)
  # One-segment images are kept (a global mask) unless asked otherwise.
  meta = precompute.run(_options(root, tmp_path / "out2", masks=(FH,),
                                 num_shards=2, num_workers=1,
                                 skip_one_segment=True))
  assert meta["skipped"] == {"corrupt": 3, "too_small": 1,
                             f"one_segment:{FH_KEY}": 1}
  assert meta["num_examples"] == 8
  # More segments than 16-bit ids hold: skipped and counted, never wrapped.
  _save(f"{tmp_path}/big/big.png", np.zeros((260, 260, 3), np.uint8), "PNG")
  _save(f"{tmp_path}/big/small.png", np.zeros((100, 100, 3), np.uint8), "PNG")
  meta = precompute.run(_options(f"{tmp_path}/big", tmp_path / "big_out",
                                 masks=("grid:size=257",), num_shards=1,
                                 num_workers=1))
  assert meta["skipped"] == {"too_many_segments:grid257": 1,
                             "mask_error:grid257": 1}
  with pytest.raises(ValueError, match="no examples"):
    records.RecordSource(str(tmp_path / "big_out"), "grid:size=257")


def _pipeline_config():
  c = detcon_b.get_config("test")
  c.image_size = 32
  return c


def test_two_hosts_read_disjoint_examples_and_resume(precomputed):
  out, _ = precomputed
  source = records.RecordSource(out, FH)
  c = _pipeline_config()

  def take(host, n, start_step=0):
    ds = pipeline.make_train_dataset(c, source, global_batch_size=4,
                                     start_step=start_step, process_index=host,
                                     process_count=2)
    return list(itertools.islice(pipeline.numpy_batches(ds), n))

  h0, h1 = take(0, 2), take(1, 2)     # 8 examples, 2 global steps per epoch
  ids0 = np.concatenate([b["example_id"] for b in h0])
  ids1 = np.concatenate([b["example_id"] for b in h1])
  assert not set(ids0) & set(ids1)
  assert sorted(np.concatenate([ids0, ids1])) == list(range(8))
  assert h0[0]["mask1"].max() > 0 and h0[0]["view1"].shape == (2, 32, 32, 3)
  (resumed,) = take(1, 1, start_step=1)
  for k in h1[1]:
    np.testing.assert_array_equal(resumed[k], h1[1][k])


def _shard_ids(directory, shard):
  """The 'id's in one shard file, read directly (not through RecordSource)."""
  from array_record.python import array_record_module
  reader = array_record_module.ArrayRecordReader(
      os.path.join(directory, records.shard_name(shard, NUM_SHARDS)))
  try:
    return [_decode(r)["id"].decode()
            for r in reader.read(list(range(reader.num_records())))]
  finally:
    reader.close()


def test_shards_mode_hosts_read_only_their_own_shard_files(precomputed,
                                                           tmp_path):
  """host_split='shards': host h reads the shards s % 2 == h, and only them."""
  out, meta = precomputed
  sizes = [s["num_examples"] for s in meta["shards"]]
  assert sizes == [2, 3, 3]
  owned = {0: (0, 2), 1: (1,)}       # 5 and 3 examples
  c = _pipeline_config()
  c.dataset.host_split = "shards"

  def take(source, host, n, start_step=0):
    ds = pipeline.make_train_dataset(c, source, global_batch_size=4,
                                     start_step=start_step, process_index=host,
                                     process_count=2)
    return list(itertools.islice(pipeline.numpy_batches(ds), n))

  source = records.RecordSource(out, FH)
  assert source.shard_sizes == (2, 3, 3)
  seen = {}
  for host, shards in owned.items():
    batches = take(source, host, 4)          # 8 examples >= one host epoch
    ids = np.concatenate([b["example_id"] for b in batches])
    n_h = sum(sizes[s] for s in shards)
    epoch = ids[:n_h]
    assert len(set(epoch)) == n_h            # a permutation of the host's ...
    names = {_decode(source.read_serialized(i))["id"].decode() for i in epoch}
    want = {x for s in shards for x in _shard_ids(out, s)}
    assert names == want                     # ... shard files' examples
    assert set(ids) == set(epoch)
    seen[host] = set(epoch)
    assert batches[0]["mask1"].max() > 0
    (resumed,) = take(source, host, 1, start_step=3)
    for k in batches[3]:
      np.testing.assert_array_equal(resumed[k], batches[3][k])
  assert not seen[0] & seen[1]
  assert seen[0] | seen[1] == set(range(8))
  # Host 0 never opens shard 1: with that file gone it still reads two
  # epochs, and 'examples' mode (reads every file) fails on it.
  copy = tmp_path / "records"
  copy.mkdir()
  for f, data in _files(out).items():
    (copy / f).write_bytes(data)
  source = records.RecordSource(str(copy), FH)
  os.remove(copy / records.shard_name(1, NUM_SHARDS))
  batches = take(source, 0, 5)
  assert set(np.concatenate([b["example_id"] for b in batches])) == seen[0]
  # 'examples' mode reads every file: shard 1's examples (ids 2..4) fail to
  # load there and are skipped (pipeline.py, "Bad examples").
  c.dataset.host_split = "examples"
  bad = np.concatenate([b["bad_id"] for b in take(source, 0, 5)])
  assert set(bad[bad >= 0]) <= {2, 3, 4} and (bad >= 0).any()


def test_shards_mode_with_too_few_shards_says_how_to_reshard(precomputed,
                                                             folder):
  out, _ = precomputed
  c = _pipeline_config()
  c.dataset.host_split = "shards"
  with pytest.raises(ValueError) as e:
    pipeline.make_train_dataset(c, records.RecordSource(out, FH),
                                global_batch_size=4, process_index=0,
                                process_count=4)
  msg = str(e.value)
  assert "3 shard(s) for 4 hosts" in msg
  assert ("python -m odin_jax.data.precompute --source=folder:"
          f"{os.path.abspath(folder)} ") in msg
  assert (f"--output_dir={out}-4shards --masks={FH} --masks={GRID} "
          "--num_shards=4") in msg
  assert f"--config.dataset.records_dir={out}-4shards" in msg
  assert "host_split='examples'" in msg


def test_random_mask_setting_per_example(precomputed):
  out, _ = precomputed
  both = [records.RecordSource(out, [FH, GRID], seed=s) for s in (0, 0, 5)]
  fh = records.RecordSource(out, FH)
  choices = []
  for source in both:
    picks = []
    for i in range(8):
      seg = source.lookup(tf.constant(i, tf.int64))["segments"].numpy()
      if seg.max() == 399:
        np.testing.assert_array_equal(seg, masks.grid_segments(90, 120, 20))
        picks.append(1)
      else:
        np.testing.assert_array_equal(
            seg, fh.lookup(tf.constant(i, tf.int64))["segments"].numpy())
        picks.append(0)
    choices.append(picks)
  assert choices[0] == choices[1]             # deterministic in (seed, id)
  assert 0 < sum(choices[0]) < 8              # both settings are used
  assert choices[2] != choices[0]             # and the seed matters


def test_record_source_errors_say_what_to_run(precomputed, tmp_path):
  out, _ = precomputed
  missing = str(tmp_path / "nothing")
  with pytest.raises(FileNotFoundError) as e:
    records.RecordSource(missing, "slic:n_segments=100")
  assert (f"python -m odin_jax.data.precompute --source=folder:/path/to/images"
          f" --output_dir={missing} --masks=slic:n_segments=100,compactness=10"
          in str(e.value))
  with pytest.raises(ValueError) as e:
    records.RecordSource(out, "slic:n_segments=100")
  msg = str(e.value)
  assert "hold mask settings ['fh_s100_sig0.8_min50', 'grid20']" in msg
  assert (f"--output_dir={out}-slic_n100_c10 --masks={FH} --masks={GRID} "
          "--masks=slic:n_segments=100,compactness=10 --seed=0 --min_side=32 "
          "--max_side=0 --jpeg_quality=95 --folder_labels=True") in msg
  assert "skip_one_segment" not in msg       # False flags are left out
  # from_config: records_dir + config.masks; hint from the dataset name.
  c = _pipeline_config()
  c.dataset.name, c.dataset.records_dir = "imagenet2012", missing
  c.masks.method, c.masks.fh_scale, c.masks.fh_min_size = "fh", 100.0, 50
  with pytest.raises(FileNotFoundError,
                     match="--source=tfds:imagenet2012:train"):
    records.RecordSource.from_config(c)
  c.dataset.records_dir = out
  assert records.RecordSource.from_config(c).mask_keys == [FH_KEY]


def test_beam_equals_multiprocessing(precomputed, folder, tmp_path):
  if os.environ.get("ODIN_JAX_REQUIRE_BEAM") == "1":   # .ci/run's Beam venv
    from odin_jax.data import beam_precompute  # pylint: disable=g-import-not-at-top
  else:
    beam_precompute = pytest.importorskip("odin_jax.data.beam_precompute",
                                          exc_type=ImportError)
  out, _ = precomputed
  meta = beam_precompute.run(_options(folder, tmp_path),
                             ["--runner=DirectRunner"])
  assert meta["num_examples"] == 8
  want, got = _files(out), _files(tmp_path)
  assert sorted(got) == sorted(want)
  for f in want:
    if f != records.SPEC:
      assert got[f] == want[f], f


@pytest.mark.slow
def test_detcon_trains_on_precomputed_records(precomputed, tmp_path):
  """The issue's end point: a folder -> records -> DetCon trains on them."""
  out, _ = precomputed
  c = detcon_b.get_config("test")
  c.dataset.records_dir = out
  c.masks.method, c.masks.fh_scale = "fh", 100.0   # the FH setting written
  c.masks.fh_sigma, c.masks.fh_min_size = 0.8, 50
  c.total_steps, c.log_every_steps = 2, 1
  assert isinstance(sources.make_source(c), records.RecordSource)
  state = train.train_and_evaluate(c, str(tmp_path))
  assert int(state.step) == 2
  assert all(np.isfinite(r["train/loss"]) and r["train/segments_per_view"] > 1
             for r in reporting.read_metrics(str(tmp_path)))
