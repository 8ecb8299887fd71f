"""The TFDS input path on a real (tiny) TFDS dataset, built offline here.

A GeneratorBasedBuilder writes six photo crops with class labels and file
names as ArrayRecord files in two shards (what `tfds build ...
--file_format=array_record` writes for ImageNet or COCO). Training reads it
through sources.TfdsSource (dataset.name = the builder's name), and
`python -m odin_jax.data.precompute --source=tfds:...` turns it into records.
"""

from __future__ import annotations

import io
import itertools
import os
import subprocess
import sys

from etils import epath
import numpy as np
from PIL import Image
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from configs import detcon_b
from odin_jax.data import masks
from odin_jax.data import pipeline
from odin_jax.data import records
from odin_jax.data import sources
from tests.test_precompute import _photo

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NAME = "odin_test_photos"
FH = "fh:scale=100,sigma=0.8,min_size=50"
CROPS = [("astronaut", 40, 60), ("coffee", 100, 200), ("chelsea", 50, 100),
         ("rocket", 100, 200), ("immunohistochemistry", 0, 0),
         ("astronaut", 250, 200)]
PHOTOS = {f"photo{i}.jpg": (_photo(n, top, left), i % 3)
          for i, (n, top, left) in enumerate(CROPS)}   # name: (RGB, label)


class OdinTestPhotos(tfds.core.GeneratorBasedBuilder):
  """Six 90x120 RGB photo crops, JPEG-encoded, labels 0..2."""

  VERSION = tfds.core.Version("1.0.0")

  # TFDS 4.9.10 finds the code of a builder in a dotted module (here
  # tests.test_tfds_source) through the package `importlib_resources`, which
  # it requires only on Python < 3.9 and is not installed here; this file is
  # the code path (it holds no checksums.tsv: nothing is downloaded).
  @tfds.core.utils.classproperty
  @classmethod
  def code_path(cls):
    return epath.Path(__file__)

  def _info(self):
    features = tfds.features.FeaturesDict({
        "image": tfds.features.Image(shape=(None, None, 3),
                                     encoding_format="jpeg"),
        "label": tfds.features.ClassLabel(names=["a", "b", "c"]),
        "file_name": tfds.features.Text()})
    return tfds.core.DatasetInfo(builder=self, features=features)

  def _split_generators(self, dl_manager):
    del dl_manager   # nothing to download
    return {"train": self._generate_examples()}

  def _generate_examples(self):
    for name, (image, label) in PHOTOS.items():
      yield name, {"image": image, "label": label, "file_name": name}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  root = str(tmp_path_factory.mktemp("tfds"))
  builder = OdinTestPhotos(data_dir=root, file_format="array_record")
  builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
      try_download_gcs=False, num_shards=2))
  assert builder.info.splits["train"].shard_lengths == [3, 3]
  return root


def _raw_jpegs(data_dir):
  """file name -> the JPEG bytes TFDS stored, read without decoding."""
  source = tfds.builder(NAME, data_dir=data_dir).as_data_source(
      "train", decoders={"image": tfds.decode.SkipDecoding()})
  return {ex["file_name"].decode(): ex["image"] for ex in source}


def _config(data_dir):
  c = detcon_b.get_config("test")
  c.image_size = 32
  c.dataset.name, c.dataset.data_dir = NAME, data_dir
  c.masks.method, c.masks.fh_scale, c.masks.fh_min_size = "fh", 100.0, 50
  return c


def test_training_reads_the_tfds_dataset(data_dir):
  c = _config(data_dir)
  source = sources.make_source(c)
  assert isinstance(source, sources.TfdsSource)
  assert source.num_examples == 6 and source.shard_sizes == (3, 3)
  raw = _raw_jpegs(data_dir)
  seen = []
  for i in range(6):
    ex = {k: v.numpy() for k, v in
          source.lookup(tf.constant(i, tf.int64)).items()}
    name = ex["id"].decode()
    seen.append(name)
    photo, label = PHOTOS[name]
    assert ex["label"] == label
    assert ex["image"].dtype == np.uint8 and ex["image"].shape == (90, 120, 3)
    # The pixels of the stored JPEG (decoded by PIL), close to the photo.
    stored = np.asarray(Image.open(io.BytesIO(raw[name])).convert("RGB"))
    assert np.abs(stored.astype(int) - ex["image"]).max() <= 2
    assert np.abs(photo.astype(int) - ex["image"]).mean() < 4
    # Segments: FH (config.masks) recomputed on those pixels.
    np.testing.assert_array_equal(
        ex["segments"], masks.compute_segments(ex["image"], c.masks))
    assert ex["segments"].max() > 1
  assert sorted(seen) == sorted(PHOTOS)

  # The pipeline: two hosts in 'shards' mode each read one TFDS shard file.
  c.dataset.host_split = "shards"
  epochs = []
  for host in (0, 1):
    ds = pipeline.make_train_dataset(c, source, global_batch_size=4,
                                     process_index=host, process_count=2)
    batches = list(itertools.islice(pipeline.numpy_batches(ds), 3))
    ids = np.concatenate([b["example_id"] for b in batches])
    np.testing.assert_array_equal(np.sort(ids[:3]), np.arange(3) + 3 * host)
    np.testing.assert_array_equal(np.sort(ids[3:]), np.arange(3) + 3 * host)
    assert batches[0]["view1"].shape == (2, 32, 32, 3)
    assert batches[0]["mask1"].max() > 0
    epochs.append(set(ids))
  assert epochs[0] | epochs[1] == set(range(6))


def test_precompute_cli_from_tfds_keeps_images_and_labels(data_dir, tmp_path):
  out = str(tmp_path / "records")
  cmd = [sys.executable, "-m", "odin_jax.data.precompute",
         f"--source=tfds:{NAME}:train", f"--tfds_data_dir={data_dir}",
         f"--output_dir={out}", f"--masks={FH}", "--num_shards=2",
         "--num_workers=2"]   # spawned workers open TFDS by name
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "TF_CPP_MIN_LOG_LEVEL": "2"}
  done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True,
                        text=True, timeout=300)
  assert done.returncode == 0, done.stderr[-3000:]
  meta = records.read_json(os.path.join(out, records.METADATA))
  assert meta["source"] == f"tfds:{NAME}:train"
  assert meta["num_examples"] == 6 and meta["skipped"] == {}
  assert meta["has_labels"] and meta["notes"] == {}   # JPEGs kept as they are
  raw = _raw_jpegs(data_dir)
  source = records.RecordSource(out, FH)
  assert source.shard_sizes == (3, 3)
  names = []
  for i in range(6):
    features = {k: v.numpy() for k, v in
                source.lookup(tf.constant(i, tf.int64)).items()}
    name = features["id"].decode()
    names.append(name)
    assert features["label"] == PHOTOS[name][1]
    stored = tf.train.Example.FromString(source.read_serialized(i))
    assert stored.features.feature["image"].bytes_list.value[0] == raw[name]
    np.testing.assert_array_equal(
        features["segments"],
        masks.compute_segments(features["image"],
                               records.parse_mask_setting(FH)))
  assert sorted(names) == sorted(PHOTOS)
