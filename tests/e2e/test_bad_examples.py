"""A bad example never kills a run (issue 16): skipped, counted, named."""

import io
import itertools
import json
import os

import numpy as np
from PIL import Image
import pytest
import tensorflow as tf

from configs import detcon_b
from odin_jax import reporting, train
from odin_jax.data import pipeline, records, skips, sources, stream
from odin_jax.data import tfds_source

SIZE = 32        # view side of the pipeline tests
GOOD = 5         # good images in the damaged folder
BATCH = 8


def _jpeg(array) -> bytes:
  buf = io.BytesIO()
  Image.fromarray(array).save(buf, "JPEG", quality=90)
  return buf.getvalue()


def _photo(i, h=48, w=56):
  """A smooth image (a few FH segments), different for each i."""
  y, x = np.mgrid[:h, :w]
  img = np.stack([(x * 4 + 30 * i) % 256, (y * 5) % 256,
                  np.full_like(x, 40 * i % 256)], -1)
  return img.astype(np.uint8)


def _damaged_folder(root, num_good=GOOD, num_truncated=1):
  """num_good JPEG/PNG photos, truncated JPEGs (header fine, data cut: PIL's
  verify passes them, decoding fails), a text file named .jpg (the scan
  rejects it) and a .txt (not an image name)."""
  os.makedirs(root / "sub", exist_ok=True)
  for i in range(num_good):
    ext = "png" if i % 3 else "jpg"
    path = root / ("sub" if i % 2 else "") / f"good{i}.{ext}"
    Image.fromarray(_photo(i)).save(path)
  for i in range(num_truncated):
    data = _jpeg(_photo(10 + i, 64, 64))
    (root / f"truncated{i}.jpg").write_bytes(data[:len(data) // 2])
  (root / "not_an_image.jpg").write_text("hello")
  (root / "notes.txt").write_text("ignored")
  return root


def _config(folder, max_bad_fraction=0.5):
  c = detcon_b.get_config("test")
  c.image_size = SIZE
  c.dataset.name = "folder"
  c.dataset.folder = str(folder)
  c.dataset.max_bad_fraction = max_bad_fraction
  c.masks.method = "grid"
  c.masks.grid_size = 3
  return c


def _batches(config, source, n, **kw):
  kw.setdefault("process_index", 0)
  kw.setdefault("process_count", 1)
  ds = pipeline.make_train_dataset(config, source, global_batch_size=BATCH,
                                   **kw)
  return list(itertools.islice(pipeline.numpy_batches(ds), n))


@pytest.fixture(scope="module")
def damaged(tmp_path_factory):
  """(config, source, 4 batches) on a folder with one truncated JPEG."""
  root = _damaged_folder(tmp_path_factory.mktemp("damaged"))
  config = _config(root)
  source = sources.make_source(config)
  return config, source, _batches(config, source, 4)


def _bad_id(source, name="truncated0.jpg"):
  return [os.path.basename(p) for p in source.paths].index(name)


def test_folder_scan_passes_the_truncated_jpeg(damaged):
  _, source, _ = damaged
  assert source.num_examples == GOOD + 1
  assert [os.path.basename(p) for p, _ in source.bad_files] == [
      "not_an_image.jpg"]
  with pytest.raises(tf.errors.InvalidArgumentError):  # what used to kill runs
    source.lookup(tf.constant(_bad_id(source), tf.int64))


def test_batches_are_full_and_the_skips_are_counted_and_named(damaged, caplog):
  config, source, batches = damaged
  bad = _bad_id(source)
  n = source.num_examples
  for b in batches:
    assert b["view1"].shape == (BATCH, SIZE, SIZE, 3)
    assert np.isfinite(b["view1"]).all()
    # Independently: the positions whose own example is the truncated file.
    own = np.array([int(stream.example_id_at(p, n, config.seed))
                    for p in b["index"]])
    np.testing.assert_array_equal(b["skipped"] > 0, own == bad)
    np.testing.assert_array_equal(b["bad_id"], np.where(own == bad, bad, -1))
    assert bad not in b["example_id"]              # never trained on
    np.testing.assert_array_equal(b["example_id"][own != bad], own[own != bad])
    for p, used, tries in zip(b["index"], b["example_id"], b["skipped"]):
      if tries:   # the first substitute of p that is not the bad file
        draws = [int(stream.substitute_at(p, k, n, config.seed))
                 for k in range(1, tries + 1)]
        assert draws[:-1] == [bad] * (tries - 1) and draws[-1] == used
  expected = sum(int((b["skipped"] > 0).sum()) for b in batches)
  assert expected >= 2   # 32 positions over 6 examples: ~5 hit the bad one

  skipped = skips.SkippedExamples(source, config)
  with caplog.at_level("WARNING"):
    counts = [skipped.add(b) for b in batches]
  assert sum(counts) == expected
  assert skipped.result() == {"train/skipped_examples": expected}
  assert skipped.result() == {"train/skipped_examples": 0}   # since last
  assert list(skipped.named) == [bad]
  assert "truncated0.jpg" in skipped.named[bad]
  assert "jpeg" in skipped.named[bad].lower()            # the decode error
  logged = [r.getMessage() for r in caplog.records
            if "Skipped" in r.getMessage()]
  assert len(logged) == 1 and "truncated0.jpg" in logged[0]   # once per file


def test_substitutes_depend_only_on_the_position(damaged):
  """Resume at step 2 and 2 hosts reproduce the uninterrupted 1-host stream."""
  config, source, full = damaged
  assert any(b["skipped"].any() for b in full[2:])   # a skip after the resume
  resumed = _batches(config, source, 2, start_step=2)
  hosts = [_batches(config, source, 4, process_index=h, process_count=2)
           for h in range(2)]
  for k, b in enumerate(full):
    parts = [hosts[0][k], hosts[1][k]]
    for key in b:
      joined = np.concatenate([part[key] for part in parts])
      np.testing.assert_array_equal(joined, b[key], err_msg=key)
      if k >= 2:
        np.testing.assert_array_equal(resumed[k - 2][key], b[key],
                                      err_msg=key)


def test_too_many_bad_examples_stop_with_names_and_advice(tmp_path):
  root = _damaged_folder(tmp_path / "mostly_bad", num_good=2, num_truncated=4)
  config = _config(root, max_bad_fraction=0.05)
  source = sources.make_source(config)
  skipped = skips.SkippedExamples(source, config)
  for b in _batches(config, source, 2):
    skipped.add(b)
  with pytest.raises(skips.BadDataError) as err:
    skipped.result()
  msg = str(err.value)
  assert "dataset.max_bad_fraction=0.05" in msg
  assert "truncated" in msg and "python -m odin_jax.data.precompute" in msg
  assert f"--source=folder:{root}" in msg
  # Below the fraction it trains on (a fresh count: 2 of 6 files are good).
  lenient = skips.SkippedExamples(source, _config(root, 0.9))
  for b in _batches(config, source, 2):
    lenient.add(b)
  assert lenient.result()["train/skipped_examples"] > 0


def test_max_bad_fraction_is_validated():
  from odin_jax import config_check  # pylint: disable=g-import-not-at-top
  config = detcon_b.get_config("test")
  assert config.dataset.max_bad_fraction == 0.05
  config.dataset.max_bad_fraction = 1.5
  with pytest.raises(config_check.ConfigError,
                     match="dataset.max_bad_fraction=1.5"):
    config_check.validate(config)


def test_nothing_loadable_gives_a_counted_blank(tmp_path):
  """Every try of every position fails: blank views, the stream goes on."""
  root = _damaged_folder(tmp_path / "all_bad", num_good=0, num_truncated=3)
  config = _config(root, max_bad_fraction=0.05)
  source = sources.make_source(config)
  (b,) = _batches(config, source, 1)
  assert (b["skipped"] == pipeline.MAX_SUBSTITUTES + 1).all()
  np.testing.assert_array_equal(b["index"], np.arange(BATCH))
  np.testing.assert_array_equal(b["bad_id"], b["example_id"])
  assert b["view1"].shape == (BATCH, SIZE, SIZE, 3)
  skipped = skips.SkippedExamples(source, config)
  assert skipped.add(b) == BATCH
  with pytest.raises(skips.BadDataError, match="8 of the 8 examples"):
    skipped.result()


def _corrupt_records(folder, out):
  """Precomputed records of `folder` (2 shards) with record 1's JPEG cut and
  record 2's mask PNG cut; returns the source's 'id's of all records."""
  from odin_jax.data.records import precompute  # pylint: disable=g-import-not-at-top
  from array_record.python import array_record_module  # pylint: disable=g-import-not-at-top
  precompute.run(precompute.Options(
      source=f"folder:{folder}", output_dir=str(out), masks=("grid:size=3",),
      num_shards=2, num_workers=1, log_every_s=1e9))
  meta = records.read_json(os.path.join(out, records.METADATA))
  source = records.RecordSource(str(out), "grid:size=3")
  serialized = [source.read_serialized(i) for i in range(source.num_examples)]
  ids = []
  for i, data in enumerate(serialized):
    ex = tf.train.Example.FromString(data)
    ids.append(ex.features.feature["id"].bytes_list.value[0].decode())
    feature = ex.features.feature
    key = "image" if i == 1 else records.MASK_PREFIX + source.mask_keys[0]
    if i in (1, 2):
      value = feature[key].bytes_list.value[0]
      feature[key].bytes_list.value[0] = value[:len(value) // 2]
      serialized[i] = ex.SerializeToString()
  start = 0
  for shard in meta["shards"]:
    writer = array_record_module.ArrayRecordWriter(
        os.path.join(out, shard["file"]), records.WRITER_OPTIONS)
    for data in serialized[start:start + shard["num_examples"]]:
      writer.write(data)
    writer.close()
    start += shard["num_examples"]
  return ids


@pytest.mark.parametrize("split", ["examples", "shards"])
def test_corrupt_records_are_skipped(tmp_path_factory, split):
  root = tmp_path_factory.getbasetemp() / "records_case"
  out = root / "records"
  if not (out / records.METADATA).exists():
    folder = _damaged_folder(root / "photos", num_good=6, num_truncated=0)
    ids = _corrupt_records(folder, out)
    (root / "ids.json").write_text(json.dumps(ids))
  ids = json.loads((root / "ids.json").read_text())
  config = _config(root, 0.5)
  config.dataset.records_dir = str(out)
  config.dataset.host_split = split
  source = sources.make_source(config)
  assert isinstance(source, records.RecordSource)
  for bad in (1, 2):   # the damaged JPEG, the damaged mask
    with pytest.raises(tf.errors.InvalidArgumentError):
      source.lookup(tf.constant(bad, tf.int64))
  hosts = [_batches(config, source, 3, process_index=h, process_count=2)
           for h in range(2)]
  used = np.concatenate([b["example_id"] for h in hosts for b in h])
  bad_ids = np.concatenate([b["bad_id"] for h in hosts for b in h])
  assert not set(used.tolist()) & {1, 2}
  assert set(bad_ids.tolist()) == {-1, 1, 2}   # both hit in 48 positions
  if split == "shards":   # substitutes come from the host's own shards
    for h in range(2):
      mine = set(np.concatenate([b["example_id"] for b in hosts[h]]).tolist())
      own = stream.host_shards(source, h, 2)
      allowed = {int(o) + j for o, s in zip(own.offsets, own.sizes)
                 for j in range(s)}
      assert mine <= allowed
  skipped = skips.SkippedExamples(source, config)
  for b in hosts[0] + hosts[1]:
    skipped.add(b)
  for bad in (1, 2):
    assert ids[bad] in skipped.named[bad] and "record" in skipped.named[bad]


@pytest.mark.slow
def test_training_on_a_damaged_folder_runs_to_the_end(tmp_path):
  """:test preset, dataset.name='folder' with a truncated JPEG."""
  root = _damaged_folder(tmp_path / "photos")
  config = detcon_b.get_config("test")
  config.dataset.name = "folder"
  config.dataset.folder = str(root)
  config.dataset.max_bad_fraction = 0.5   # 1 of 6 files is bad
  config.total_steps = 4
  config.log_every_steps = 1
  config.eval.every_steps = 0
  state = train.train_and_evaluate(config, str(tmp_path / "run"))
  assert int(state.step) == 4
  rows = reporting.read_metrics(str(tmp_path / "run"))
  assert [r["step"] for r in rows] == [1, 2, 3, 4]
  counts = [r["train/skipped_examples"] for r in rows]
  assert all(c == int(c) >= 0 for c in counts)
  # The same positions, read by the pipeline alone, hit the bad file as often.
  source = sources.make_source(config)
  batches = _batches(config, source, 4)
  assert counts == [float((b["skipped"] > 0).sum()) for b in batches]
  assert sum(counts) > 0

  # With the default bound (5 %) the same data stops the run, naming it.
  config.dataset.max_bad_fraction = 0.05
  with pytest.raises(skips.BadDataError, match="truncated0.jpg"):
    train.train_and_evaluate(config, str(tmp_path / "strict"))


def test_corrupt_tfds_example_is_skipped(photos_data_dir, tmp_path):
  """A prepared TFDS dataset (ArrayRecord) with one JPEG cut in half: a
  copy of conftest.py's shared OdinTestPhotos data_dir."""
  import shutil  # pylint: disable=g-import-not-at-top
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  from array_record.python import array_record_module  # pylint: disable=g-import-not-at-top
  from tests import helpers  # pylint: disable=g-import-not-at-top
  shutil.copytree(photos_data_dir, tmp_path, dirs_exist_ok=True)
  builder = tfds.builder(helpers.PHOTOS_NAME, data_dir=str(tmp_path))
  assert isinstance(builder, helpers.OdinTestPhotos)
  # Record 0 of the first shard file is example id 0 of the data source.
  shard = sorted(p for p in builder.data_path.iterdir()
                 if "train.array_record" in p.name)[0]
  reader = array_record_module.ArrayRecordReader(str(shard))
  serialized = reader.read(list(range(reader.num_records())))
  reader.close()
  ex = tf.train.Example.FromString(serialized[0])
  jpeg = ex.features.feature["image"].bytes_list.value[0]
  ex.features.feature["image"].bytes_list.value[0] = jpeg[:len(jpeg) // 2]
  serialized[0] = ex.SerializeToString()
  writer = array_record_module.ArrayRecordWriter(str(shard), "group_size:1")
  for data in serialized:
    writer.write(data)
  writer.close()

  config = helpers.photos_config(str(tmp_path))
  config.masks.method, config.masks.grid_size = "grid", 3
  source = sources.make_source(config)
  assert isinstance(source, tfds_source.TfdsSource)
  with pytest.raises(Exception):   # the bare lookup fails ...
    source.lookup(tf.constant(0, tf.int64))["image"].numpy()
  batches = _batches(config, source, 3)   # ... the pipeline skips it
  bad = np.concatenate([b["bad_id"] for b in batches])
  used = np.concatenate([b["example_id"] for b in batches])
  assert set(bad.tolist()) == {-1, 0} and 0 not in used
  skipped = skips.SkippedExamples(source, config)
  for b in batches:
    skipped.add(b)
  assert ("example 0" in skipped.named[0]
          and helpers.PHOTOS_NAME in skipped.named[0])
