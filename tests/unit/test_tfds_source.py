"""The TFDS input path on a real (tiny) TFDS dataset, built offline here.

A GeneratorBasedBuilder (tests/helpers.py's OdinTestPhotos) writes six
photo crops with class labels and file names as ArrayRecord files in two
shards (what `tfds build ...
--file_format=array_record` writes for ImageNet or COCO). Training reads it
through tfds_source.TfdsSource (dataset.name = the builder's name), and
`python -m odin_jax.data.precompute --source=tfds:...` turns it into records.
"""

from __future__ import annotations

import io
import itertools
import os
import subprocess
import sys

import numpy as np
from PIL import Image
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from odin_jax.data import masks
from odin_jax.data import pipeline
from odin_jax.data import records
from odin_jax.data import sources
from odin_jax.data import tfds_source
from tests import helpers
from tests.helpers import FH, REPO

# The dataset (helpers.OdinTestPhotos) and its data_dir (conftest.py's
# session fixture `photos_data_dir`, read-only here) are shared with
# tests/e2e/test_bad_examples.py.
NAME = helpers.PHOTOS_NAME
PHOTOS = helpers.photos()   # name: (RGB, label)


@pytest.fixture(scope="module")
def data_dir(photos_data_dir):
  return photos_data_dir


def _raw_jpegs(data_dir):
  """file name -> the JPEG bytes TFDS stored, read without decoding."""
  source = tfds.builder(NAME, data_dir=data_dir).as_data_source(
      "train", decoders={"image": tfds.decode.SkipDecoding()})
  return {ex["file_name"].decode(): ex["image"] for ex in source}


def test_training_reads_the_tfds_dataset(data_dir):
  c = helpers.photos_config(data_dir)
  source = sources.make_source(c)
  assert isinstance(source, tfds_source.TfdsSource)
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
