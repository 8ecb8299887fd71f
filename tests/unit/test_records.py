"""Tests of the records package (format, writer, reader) and image listing.

Tiny images written here; no model and no precompute pool.
"""

from __future__ import annotations

import io
import os
import pathlib
import re
import subprocess
import sys

import numpy as np
from PIL import Image
import pytest
import tensorflow as tf

from odin_jax.data import records
from odin_jax.data import sources
from odin_jax.data.records import examples
from odin_jax.data.records import inputs
from odin_jax.data.records import writer

_ROOT = pathlib.Path(__file__).resolve().parents[2]
# The PIL format that writes each listed extension (lossless where it can).
_WRITE_AS = {".jpg": "JPEG", ".jpeg": "JPEG", ".jpe": "JPEG", ".jfif": "JPEG",
             ".png": "PNG", ".bmp": "BMP", ".gif": "GIF", ".webp": "WEBP",
             ".tif": "TIFF", ".tiff": "TIFF", ".ppm": "PPM", ".pgm": "PPM",
             ".pnm": "PPM"}


def _image(seed: int, hw=(36, 44)) -> np.ndarray:
  rng = np.random.default_rng(seed)
  return rng.integers(0, 256, hw + (3,), dtype=np.uint8)


def _write(path: pathlib.Path, array: np.ndarray, fmt: str) -> None:
  path.parent.mkdir(parents=True, exist_ok=True)
  kw = {"lossless": True} if fmt == "WEBP" else {}
  if path.suffix.lower() == ".pgm":
    array = array[..., 0]                      # a grayscale PNM
  Image.fromarray(array).save(path, fmt, **kw)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
  """One image per listed extension (half of them upper case, some in a
  sub-folder), plus files that are not images."""
  root = tmp_path_factory.mktemp("every_kind")
  for i, ext in enumerate(sources.IMAGE_EXTENSIONS):
    name = f"img{i:02d}" + (ext.upper() if i % 2 else ext)
    _write(root / ("sub" if i % 3 == 0 else "") / name, _image(i),
           _WRITE_AS[ext])
  (root / "notes.txt").write_text("not an image")
  (root / "sub" / "data.npy").write_bytes(b"\x93NUMPY")
  return root


def test_every_extension_is_listed_and_nothing_else(folder):
  assert set(_WRITE_AS) == set(sources.IMAGE_EXTENSIONS)
  rel = sources.list_images(str(folder), relative=True)
  assert len(rel) == len(sources.IMAGE_EXTENSIONS)
  assert rel == sorted(rel) and all("\\" not in r for r in rel)
  assert {os.path.splitext(r)[1].lower() for r in rel} == set(_WRITE_AS)
  full = sources.list_images(str(folder))
  assert full == [os.path.join(str(folder), *r.split("/")) for r in rel]
  # The precompute's inputs are exactly this listing.
  assert inputs.make_inputs(f"folder:{folder}").locators == rel


def test_folder_source_decodes_every_listed_kind(folder):
  """TensorFlow decodes what it can, PIL the rest (TIFF, PNM), to the
  pixels PIL reads (exactly for the lossless kinds)."""
  masks = records.parse_mask_setting("grid:size=2")
  source = sources.FolderSource(str(folder), masks, num_threads=2)
  assert source.bad_files == []
  lossy = (".jpg", ".jpeg", ".jpe", ".jfif", ".gif")   # GIF: a palette
  for i, path in enumerate(source.paths):
    image = source.lookup(tf.constant(i, tf.int64))["image"].numpy()
    with Image.open(path) as im:
      want = np.asarray(im.convert("RGB"))
    assert image.shape == want.shape and image.dtype == np.uint8, path
    if not path.lower().endswith(lossy):
      np.testing.assert_array_equal(image, want, err_msg=path)


def test_encode_example_is_what_tensorflow_parses():
  features = {"id": "a/b.jpg", "image": b"\xff\xd8jpeg", "height": 3,
              "width": 70000, "label": -1, "masks/grid_5": b"png"}
  parsed = tf.train.Example.FromString(records.encode_example(features))
  want = tf.train.Example()
  for name, value in features.items():
    feature = want.features.feature[name]
    if isinstance(value, int):
      feature.int64_list.value.append(value)
    else:
      feature.bytes_list.value.append(
          value.encode() if isinstance(value, str) else value)
  assert parsed == want
  assert records.encode_example(features) == want.SerializeToString(
      deterministic=True)


def _write_records(out: str, images, segments, shards=((0, 1), (2,))):
  """The records of images/segments through the writer, as the Odin cache
  writes them (ExampleResult, ShardWriter per shard, finalize)."""
  for s, ids in enumerate(shards):
    shard_writer = writer.ShardWriter(out, s, len(shards))
    for i in ids:
      buf = io.BytesIO()
      Image.fromarray(images[i]).save(buf, "PNG")   # the reader reads JPEG
      png = records.encode_mask_png(segments[i])    # decoders: PNG is fine
      record = records.encode_example({
          "id": f"ex{i}", "image": buf.getvalue(), "height": 36,
          "width": 44, "label": i, "masks/" + "grid_s": png})
      shard_writer.add(writer.ExampleResult(
          f"ex{i}", record, num_segments=(("grid_s", 5),),
          image_bytes=len(buf.getvalue()), mask_bytes=(("grid_s", len(png)),)))
    shard_writer.close()
  return writer.finalize(out, {
      "format": records.FORMAT, "version": records.VERSION,
      "source": "test", "num_inputs": 3, "num_shards": len(shards),
      "mask_settings": {"grid_s": "grid_s"}})


def test_writer_and_reader_round_trip(tmp_path):
  images = [_image(10 + i) for i in range(3)]
  segments = [np.arange(36 * 44).reshape(36, 44) % (300 + i)
              for i in range(3)]
  assert writer.finalize(str(tmp_path), {"num_shards": 2}) is None
  meta = _write_records(str(tmp_path), images, segments)
  assert meta["num_examples"] == 3
  assert [s["num_examples"] for s in meta["shards"]] == [2, 1]
  assert not list(tmp_path.glob("*.tmp"))
  source = records.RecordSource(str(tmp_path), ["grid_s"])
  assert source.shard_sizes == (2, 1)
  for i in range(3):
    ex = source.lookup(tf.constant(i, tf.int64))
    np.testing.assert_array_equal(ex["image"].numpy(), images[i])
    np.testing.assert_array_equal(ex["segments"].numpy(), segments[i])
    assert int(ex["label"]) == i and ex["id"].numpy() == f"ex{i}".encode()


def test_reader_refuses_another_version(tmp_path):
  _write_records(str(tmp_path), [_image(0)] * 3,
                 [np.zeros((36, 44), int)] * 3)
  meta_path = tmp_path / records.METADATA
  meta = records.read_json(str(meta_path))
  records.write_json_atomic(str(meta_path), {**meta, "version": 0})
  with pytest.raises(ValueError, match="version"):
    records.RecordSource(str(tmp_path), ["grid_s"])


def test_decode_pixels_converts_sixteen_bit_and_alpha():
  gray16 = Image.fromarray(np.array([[0, 65535], [257, 514]], np.uint16))
  pixels, notes = examples.decode_pixels(gray16)
  np.testing.assert_array_equal(pixels, [[0, 255], [1, 2]])
  assert "grayscale" in notes and "high_bit_depth" in notes
  rgba = np.zeros((2, 2, 4), np.uint8)
  rgba[..., :3], rgba[..., 3] = 200, [[255, 0], [128, 255]]
  pixels, notes = examples.decode_pixels(Image.fromarray(rgba, "RGBA"))
  np.testing.assert_array_equal(pixels[..., 0], [[200, 0], [100, 200]])
  assert notes == ["alpha"]


def test_precompute_cli_is_imported_by_no_module_and_workers_stay_light():
  cli = re.compile(r"^\s*(from odin_jax\.data import .*\bprecompute\b|"
                   r"(from|import) odin_jax\.data\.precompute\b)", re.M)
  users = [str(p.relative_to(_ROOT)) for d in ("odin_jax", "bench", "tests")
           for p in (_ROOT / d).rglob("*.py") if cli.search(p.read_text())]
  assert users == []
  code = ("import sys; import odin_jax.data.records.precompute; "
          "import odin_jax.data.sources; "
          "print(sorted({'tensorflow', 'jax'} & set(sys.modules)))")
  out = subprocess.run([sys.executable, "-c", code], cwd=_ROOT, check=True,
                       capture_output=True, text=True).stdout
  assert out.strip() == "[]"
