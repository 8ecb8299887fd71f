"""Tests of the input pipeline (odin_jax.data.pipeline) and sources."""

import functools
import io
import itertools
import os

import numpy as np
from PIL import Image
import pytest
import tensorflow as tf

from configs import detcon_b
from odin_jax.data import pipeline
from odin_jax.data import sources
from odin_jax.data import stream

N = 12        # examples in the synthetic source
SIZE = 32     # view side


def _config(seed=0, colour=True):
  c = detcon_b.get_config("test")
  c.seed = seed
  c.image_size = SIZE
  if not colour:
    a = c.augment
    a.color_jitter_prob = a.grayscale_prob = 0.0
    a.blur_prob = a.solarize_prob = (0.0, 0.0)
  return c


def _source():
  """Example i: a constant-colour image (red = 10*i) with segment ids 0..3."""
  images = np.zeros((N, 40, 40, 3), np.uint8)
  images[..., 0] = (10 * np.arange(N))[:, None, None]
  images[..., 1] = 200
  segments = np.zeros((N, 40, 40), np.int32)
  segments[:, :20, 20:] = 1
  segments[:, 20:, :20] = 2
  segments[:, 20:, 20:] = 3
  return sources.ArraySource(images, segments)


def _take(config, source, n, **kw):
  kw.setdefault("process_index", 0)
  kw.setdefault("process_count", 1)
  ds = pipeline.make_train_dataset(config, source, **kw)
  return list(itertools.islice(pipeline.numpy_batches(ds), n))


@functools.lru_cache(maxsize=None)
def _stream(n, seed=3, colour=True, **kw):
  """First n batches on the synthetic source (memoised: tracing costs ~2 s)."""
  return _take(_config(seed, colour), _SOURCE(), n, **kw)


_SOURCE = functools.lru_cache(maxsize=None)(_source)


def test_batch_contract_shapes_and_dtypes():
  batches = _stream(3, global_batch_size=8, process_index=1, process_count=2)
  b = batches[0]
  assert set(b) == {"view1", "view2", "mask1", "mask2", "index", "example_id",
                    "skipped", "bad_id"}
  for k in ("view1", "view2"):   # geometry only: colour is the step's
    assert b[k].shape == (4, SIZE, SIZE, 3) and b[k].dtype == np.uint8
  for k in ("mask1", "mask2"):   # FH ids: the narrowest unsigned type
    assert b[k].shape == (4, SIZE, SIZE) and b[k].dtype == np.uint16
    assert set(np.unique(b[k])) <= {0, 1, 2, 3}
  for k in ("index", "example_id"):
    assert b[k].shape == (4,) and b[k].dtype == np.int64
  # Host 1 of 2 holds positions [k*8 + 4, k*8 + 8) of global batch k.
  np.testing.assert_array_equal(batches[0]["index"], [4, 5, 6, 7])
  np.testing.assert_array_equal(batches[1]["index"], [12, 13, 14, 15])


def test_resume_gives_exactly_the_same_batches():
  full = _stream(5, global_batch_size=8)
  resumed = _stream(2, global_batch_size=8, start_step=3)
  for want, got in zip(full[3:], resumed):
    for k in want:
      np.testing.assert_array_equal(want[k], got[k])
  # ... and the batches are not all the same (resume test could fail).
  assert not np.array_equal(full[0]["view1"], full[3]["view1"])


def test_parallelism_settings_do_not_change_the_stream():
  c = _config(3)
  c.dataset.num_parallel_calls, c.dataset.prefetch_batches = 1, 1
  c.dataset.private_threads = 1
  serial = _take(c, _SOURCE(), 3, global_batch_size=8)
  for want, got in zip(_stream(3, global_batch_size=8), serial):
    for k in want:
      np.testing.assert_array_equal(want[k], got[k])
  c.dataset.prefetch_batches = 0
  with pytest.raises(ValueError, match="prefetch_batches"):
    _take(c, _SOURCE(), 1, global_batch_size=8)


def test_each_epoch_is_a_fresh_permutation():
  batches = _stream(5, global_batch_size=8)   # 40 positions: 3+ epochs
  ids = np.concatenate([b["example_id"] for b in batches])
  np.testing.assert_array_equal(np.concatenate([b["index"] for b in batches]),
                                np.arange(40))
  epochs = ids[:3 * N].reshape(3, N)
  for e in epochs:
    np.testing.assert_array_equal(np.sort(e), np.arange(N))
  assert not np.array_equal(epochs[0], epochs[1])
  assert not np.array_equal(epochs[0], np.arange(N))   # actually shuffled
  # Another seed, another order.
  # The ids are the pure function stream.example_id_at(position) ...
  np.testing.assert_array_equal(
      [stream.example_id_at(p, N, 3).numpy() for p in range(N)], epochs[0])
  # ... and another seed gives another order.
  other = [stream.example_id_at(p, N, 2).numpy() for p in range(N)]
  assert sorted(other) == list(range(N)) and list(other) != list(epochs[0])


def test_example_id_matches_the_content():
  for b in _stream(2, colour=False, global_batch_size=8):
    # Constant-colour image i has red 10*i / 255 (no colour augmentation).
    red = b["view1"][..., 0].mean(axis=(1, 2))
    np.testing.assert_allclose(red, 10 * b["example_id"], atol=0.5)


def test_two_hosts_together_equal_one_host():
  one = _stream(5, global_batch_size=8)
  h0 = _stream(3, global_batch_size=8, process_index=0, process_count=2)
  h1 = _stream(3, global_batch_size=8, process_index=1, process_count=2)
  for g, a, b in zip(one, h0, h1):
    for k in g:
      np.testing.assert_array_equal(g[k], np.concatenate([a[k], b[k]]))


def test_bad_arguments():
  with pytest.raises(ValueError, match="multiple"):
    pipeline.make_train_dataset(_config(), _source(), global_batch_size=6,
                                process_index=0, process_count=4)
  with pytest.raises(ValueError):
    pipeline.make_train_dataset(_config(), _source(), global_batch_size=4,
                                process_index=2, process_count=2)
  assert pipeline.num_steps_per_epoch(_source(), 4) == 3
  assert pipeline.num_steps_per_epoch(_source(), 5) == 2
  assert pipeline.num_steps_per_epoch(_source(), 64) == 1


# ------------------------------------------- dataset.host_split='shards' --
SHARDS = (3, 2, 4, 3)   # ids 0-2 | 3-4 | 5-8 | 9-11
OWNED = {0: [0, 1, 2, 5, 6, 7, 8], 1: [3, 4, 9, 10, 11]}   # s % 2 == h


def _sharded_source():
  plain = _SOURCE()
  return sources.ArraySource(plain._images.numpy(), plain._segments.numpy(),
                             shard_sizes=SHARDS)


_SHARDED = functools.lru_cache(maxsize=None)(_sharded_source)


@functools.lru_cache(maxsize=None)
def _sharded_stream(n, host, start_step=0, num_hosts=2):
  """n batches (G = 4: B = 2 per host) of host `host` in 'shards' mode."""
  c = _config(seed=3, colour=False)
  c.dataset.host_split = "shards"
  return _take(c, _SHARDED(), n, global_batch_size=4, start_step=start_step,
               process_index=host, process_count=num_hosts)


def _ids(batches):
  return np.concatenate([b["example_id"] for b in batches])


def test_shards_two_hosts_read_disjoint_shards_covering_the_dataset():
  streams = {h: _sharded_stream(8, h) for h in (0, 1)}   # 16 examples each
  for h, batches in streams.items():
    ids, n_h = _ids(batches), len(OWNED[h])
    # Every host epoch is a permutation of exactly the host's shards ...
    np.testing.assert_array_equal(np.sort(ids[:n_h]), OWNED[h])
    np.testing.assert_array_equal(np.sort(ids[n_h:2 * n_h]), OWNED[h])
    assert set(ids) == set(OWNED[h])
    assert not np.array_equal(ids[:n_h], ids[n_h:2 * n_h])   # fresh order
    assert not np.array_equal(ids[:n_h], OWNED[h])           # shuffled
    # ... the id is the pixels' (red = 10 * id, no colour augmentation) ...
    for b in batches:
      red = b["view1"][..., 0].mean(axis=(1, 2))
      np.testing.assert_allclose(red, 10 * b["example_id"], atol=0.5)
    # ... and 'index' is the host's slot of global batch k: k*4 + 2h + j.
    np.testing.assert_array_equal(
        np.concatenate([b["index"] for b in batches]),
        [4 * k + 2 * h + j for k in range(8) for j in range(2)])
  # Disjoint, and together exactly the dataset.
  assert not set(OWNED[0]) & set(OWNED[1])
  assert sorted(OWNED[0] + OWNED[1]) == list(range(N))
  # Two hosts do not replay one another's augmentation.
  assert not np.array_equal(streams[0][0]["view1"], streams[1][0]["view1"])


def test_shards_order_is_a_pure_function_of_seed_and_host_position():
  for h in (0, 1):
    full = _sharded_stream(8, h)
    resumed = _sharded_stream(3, h, start_step=5)
    for want, got in zip(full[5:], resumed):
      for k in want:
        np.testing.assert_array_equal(want[k], got[k])
    # stream.example_id_at(q, N_h, seed, host) + local_to_global_id.
    plan = stream.host_shards(_SHARDED(), h, 2)
    assert plan.shards == tuple(range(h, 4, 2))
    assert plan.num_examples == len(OWNED[h])
    want = [stream.local_to_global_id(stream.example_id_at(
        q, plan.num_examples, 3, host=h), plan).numpy() for q in range(16)]
    np.testing.assert_array_equal(_ids(full), want)
  # One host holding every shard reads a permutation of all of it.
  one = _ids(_sharded_stream(3, 0, num_hosts=1))
  np.testing.assert_array_equal(np.sort(one), np.arange(N))


def test_shards_mode_errors_say_what_to_do():
  c = _config()
  c.dataset.host_split = "shards"
  kw = dict(global_batch_size=4, process_index=0, process_count=2)
  with pytest.raises(ValueError, match="shard files.*host_split='examples'"):
    pipeline.make_train_dataset(c, _source(), **kw)      # no shard_sizes
  with pytest.raises(ValueError, match=r"1 shard\(s\) for 2 hosts.*"
                     r"--num_shards=2"):
    pipeline.make_train_dataset(
        c, sources.ArraySource(np.zeros((4, 8, 8, 3), np.uint8),
                               np.zeros((4, 8, 8), np.int32),
                               shard_sizes=(4,)), **kw)
  with pytest.raises(ValueError, match=r"host 1 of 2 owns shards \[1\]"):
    pipeline.make_train_dataset(
        c, sources.ArraySource(np.zeros((4, 8, 8, 3), np.uint8),
                               np.zeros((4, 8, 8), np.int32),
                               shard_sizes=(4, 0)), **{**kw,
                                                       "process_index": 1})
  with pytest.raises(ValueError, match="sum to 12"):
    sources.ArraySource(_SOURCE()._images.numpy(),
                        _SOURCE()._segments.numpy(), shard_sizes=(3, 3))
  c.dataset.host_split = "files"
  with pytest.raises(ValueError, match="'examples', 'shards'"):
    pipeline.make_train_dataset(c, _source(), **kw)


def test_demo_source_end_to_end(tmp_path):
  c = _config()
  c.dataset.name = "demo"
  c.dataset.demo_num_scenes = 4
  c.dataset.demo_image_size = 48
  c.dataset.cache_dir = str(tmp_path)
  c.masks.method = "grid"
  c.masks.grid_size = 3
  source = sources.make_source(c)
  assert isinstance(source, sources.DemoSource)
  assert source.num_examples == len(source.data.images)
  (b,) = _take(c, source, 1, global_batch_size=4)
  assert b["view1"].shape == (4, SIZE, SIZE, 3)
  assert set(np.unique(b["mask1"])) <= set(range(9))


def _write(path, array, fmt):
  Image.fromarray(array).save(path, fmt)


@pytest.fixture
def image_folder(tmp_path):
  rng = np.random.default_rng(0)
  root = tmp_path / "imgs"
  (root / "sub").mkdir(parents=True)
  _write(root / "a_rgb.png", rng.integers(0, 256, (40, 50, 3), np.uint8), "PNG")
  _write(root / "sub" / "b_gray.png", rng.integers(0, 256, (30, 36), np.uint8),
         "PNG")
  _write(root / "c_rgba.PNG", rng.integers(0, 256, (44, 33, 4), np.uint8),
         "PNG")
  _write(root / "sub" / "d.JPG", rng.integers(0, 256, (48, 64, 3), np.uint8),
         "JPEG")
  (root / "e_corrupt.jpg").write_bytes(b"this is not an image at all")
  buf = io.BytesIO()
  Image.fromarray(rng.integers(0, 256, (40, 40, 3), np.uint8)).save(buf, "PNG")
  (root / "f_truncated.png").write_bytes(buf.getvalue()[:100])
  (root / "notes.txt").write_text("ignored")
  return root


def test_folder_source(image_folder):
  c = _config()
  c.dataset.name = "folder"
  c.dataset.folder = str(image_folder)
  c.masks.method = "fh"
  c.masks.fh_scale, c.masks.fh_min_size = 100.0, 50
  source = sources.make_source(c)
  names = [os.path.basename(p) for p in source.paths]
  assert names == ["a_rgb.png", "c_rgba.PNG", "b_gray.png", "d.JPG"]
  bad = sorted(os.path.basename(p) for p, _ in source.bad_files)
  assert bad == ["e_corrupt.jpg", "f_truncated.png"]
  sizes = [(40, 50), (44, 33), (30, 36), (48, 64)]
  for i, hw in enumerate(sizes):
    ex = source.lookup(tf.constant(i, tf.int64))
    assert ex["image"].dtype == tf.uint8 and ex["image"].shape == hw + (3,)
    assert ex["segments"].dtype == tf.int32 and ex["segments"].shape == hw
    assert ex["segments"].numpy().min() == 0
  gray = source.lookup(tf.constant(2, tf.int64))["image"].numpy()
  np.testing.assert_array_equal(gray[..., 0], gray[..., 2])
  (b,) = _take(c, source, 1, global_batch_size=4)
  assert b["view1"].shape == (4, SIZE, SIZE, 3)
  assert sorted(b["example_id"]) == [0, 1, 2, 3]


def test_folder_source_errors(tmp_path, image_folder):
  masks = _config().masks
  with pytest.raises(FileNotFoundError, match="does not exist"):
    sources.FolderSource(str(tmp_path / "missing"), masks)
  (tmp_path / "empty").mkdir()
  with pytest.raises(FileNotFoundError, match="No image files"):
    sources.FolderSource(str(tmp_path / "empty"), masks)
  (tmp_path / "bad").mkdir()
  (tmp_path / "bad" / "x.png").write_bytes(b"garbage")
  with pytest.raises(ValueError, match="could be read"):
    sources.FolderSource(str(tmp_path / "bad"), masks)
  masks.method = "gt"
  with pytest.raises(ValueError, match="ground-truth"):
    sources.FolderSource(str(image_folder), masks)


def test_tfds_not_prepared_explains_how(tmp_path):
  c = _config()
  c.dataset.name = "imagenet2012"
  c.dataset.data_dir = str(tmp_path)
  with pytest.raises(RuntimeError) as err:
    sources.make_source(c)
  msg = str(err.value)
  assert "demo" in msg and "configs/detcon_b.py:demo" in msg
  assert "array_record" in msg and "--manual_dir" in msg
  assert "--config.dataset.data_dir" in msg


def test_unknown_dataset_name(tmp_path):
  c = _config()
  c.dataset.name = "no_such_dataset_xyz"
  c.dataset.data_dir = str(tmp_path)
  with pytest.raises(ValueError, match="demo.*folder"):
    sources.make_source(c)
