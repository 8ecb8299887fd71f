"""Embedded demo dataset: offline, deterministic, exact masks, disk cache."""
import os
import socket

import ml_collections
import numpy as np
import pytest

from odin_jax.data import demo
from odin_jax.data import masks

N_SCENES, SIZE = 8, 96


@pytest.fixture(scope="module")
def data():
  return demo.generate_demo(N_SCENES, SIZE, seed=0)


def _fh():
  return ml_collections.ConfigDict(dict(
      method="fh", fh_scale=100.0, fh_sigma=0.8, fh_min_size=50,
      slic_n_segments=50, slic_compactness=10.0, grid_size=4))


def test_photos_load_offline(monkeypatch):
  def no_network(*args, **kwargs):
    raise OSError("network disabled in this test")
  monkeypatch.setattr(socket.socket, "connect", no_network)
  monkeypatch.setattr(socket, "getaddrinfo", no_network)
  for name in demo.PHOTOS:
    photo = demo._load_photo(name)
    assert photo.dtype == np.uint8 and photo.ndim == 3 and photo.shape[2] == 3
    assert min(photo.shape[:2]) >= 256 and photo.std() > 10, name


def test_deterministic(data):
  again = demo.generate_demo(N_SCENES, SIZE, seed=0)
  for field in ("images", "instances", "classes", "has_gt"):
    a, b = getattr(data, field), getattr(again, field)
    assert a.dtype == b.dtype and a.tobytes() == b.tobytes(), field
  other = demo.generate_demo(N_SCENES, SIZE, seed=1)
  assert not np.array_equal(other.images[:N_SCENES], data.images[:N_SCENES])
  assert not np.array_equal(other.instances[:N_SCENES],
                            data.instances[:N_SCENES])
  # The photos do not depend on the seed.
  np.testing.assert_array_equal(other.images[N_SCENES:],
                                data.images[N_SCENES:])


def test_shapes_and_dtypes(data):
  n = N_SCENES + len(demo.PHOTOS)
  assert data.images.shape == (n, SIZE, SIZE, 3)
  assert data.images.dtype == np.uint8
  assert data.instances.shape == data.classes.shape == (n, SIZE, SIZE)
  assert data.instances.dtype == data.classes.dtype == np.int32
  assert data.has_gt.dtype == bool
  np.testing.assert_array_equal(data.has_gt, np.arange(n) < N_SCENES)
  assert data.class_names == demo.CLASS_NAMES and len(data.class_names) >= 4


def test_instances_match_classes(data):
  num_classes = len(data.class_names)
  seen_classes = set()
  for inst, cls in zip(data.instances[:N_SCENES], data.classes[:N_SCENES]):
    np.testing.assert_array_equal(inst == 0, cls == 0)  # same background
    k = inst.max()
    assert k >= 2                                        # >= 2 visible objects
    np.testing.assert_array_equal(np.unique(inst), np.arange(k + 1))
    for obj in range(1, k + 1):
      obj_classes = np.unique(cls[inst == obj])
      assert len(obj_classes) == 1                       # one class per object
      assert 1 <= obj_classes[0] <= num_classes
      seen_classes.add(int(obj_classes[0]))
      assert (inst == obj).sum() >= 0.01 * SIZE * SIZE   # not a sliver
  assert len(seen_classes) >= 3


def test_object_textures_from_photos(data):
  for img, inst in zip(data.images[:N_SCENES], data.instances[:N_SCENES]):
    background = img[inst == 0].astype(float)
    for obj in range(1, inst.max() + 1):
      pixels = img[inst == obj].astype(float)            # [P, 3]
      assert pixels.std(axis=0).max() > 3.0   # textured, not a flat colour
      assert np.abs(pixels.mean(0) - background.mean(0)).max() > 1.0


def test_photos_are_included_without_gt(data):
  photos = data.images[N_SCENES:]
  assert not data.has_gt[N_SCENES:].any()
  assert not data.instances[N_SCENES:].any() and not data.classes[N_SCENES:].any()
  assert all(p.std() > 10 for p in photos)
  assert len({p.tobytes() for p in photos}) == len(photos)
  # The first photo is the astronaut, center-cropped and resized.
  expected = demo._photo_view(demo._load_photo(demo.PHOTOS[0]), SIZE)
  np.testing.assert_array_equal(photos[0], expected)


def test_cache_round_trip(tmp_path, monkeypatch, data):
  first = demo.load_demo(N_SCENES, SIZE, 0, cache_dir=str(tmp_path))
  files = os.listdir(tmp_path / "demo")
  assert len(files) == 1 and files[0].endswith(".npz")   # no temp files left
  np.testing.assert_array_equal(first.images, data.images)

  def fail(*args, **kwargs):
    raise AssertionError("should have been read from the cache")
  monkeypatch.setattr(demo, "generate_demo", fail)
  second = demo.load_demo(N_SCENES, SIZE, 0, cache_dir=str(tmp_path))
  for field in ("images", "instances", "classes", "has_gt"):
    a, b = getattr(first, field), getattr(second, field)
    assert a.dtype == b.dtype, field
    np.testing.assert_array_equal(a, b)
  assert second.class_names == first.class_names
  with pytest.raises(AssertionError, match="cache"):  # other key -> generate
    demo.load_demo(N_SCENES, SIZE, 1, cache_dir=str(tmp_path))


def test_corrupt_cache_is_regenerated(tmp_path, monkeypatch, data):
  demo.load_demo(N_SCENES, SIZE, 0, cache_dir=str(tmp_path))
  (path,) = (tmp_path / "demo").iterdir()
  path.write_bytes(b"not an npz file")
  warnings = []
  monkeypatch.setattr(demo.logging, "warning",
                      lambda msg, *a: warnings.append(msg % a))
  again = demo.load_demo(N_SCENES, SIZE, 0, cache_dir=str(tmp_path))
  np.testing.assert_array_equal(again.images, data.images)
  np.testing.assert_array_equal(again.instances, data.instances)
  assert len(warnings) == 1 and "Corrupt" in warnings[0]
  with np.load(path) as f:                       # rewritten, valid again
    np.testing.assert_array_equal(f["classes"], data.classes)


def test_default_cache_dir_from_env(tmp_path, monkeypatch):
  monkeypatch.setenv("ODIN_JAX_CACHE", str(tmp_path / "env_cache"))
  assert demo.default_cache_dir() == str(tmp_path / "env_cache")
  demo.load_demo(2, 32, 0)
  assert len(os.listdir(tmp_path / "env_cache" / "demo")) == 1


def test_demo_segments(tmp_path, monkeypatch, data):
  n = len(data.images)
  fh = demo.demo_segments(data, _fh(), cache_dir=str(tmp_path))
  assert fh.shape == (n, SIZE, SIZE) and fh.dtype == np.int32
  for i in (0, n - 1):
    np.testing.assert_array_equal(
        fh[i], masks.felzenszwalb_segments(data.images[i], 100.0, 0.8, 50))
  assert (fh.max(axis=(1, 2)) >= 1).all()
  cached = [f for f in os.listdir(tmp_path / "demo") if "fh_s100" in f]
  assert len(cached) == 1

  gt = demo.demo_segments(data, ml_collections.ConfigDict({"method": "gt"}),
                          cache_dir=str(tmp_path))
  np.testing.assert_array_equal(gt[:N_SCENES], data.instances[:N_SCENES])
  assert not gt[N_SCENES:].any()          # photos: one background segment

  def fail(*args, **kwargs):
    raise AssertionError("should have been read from the cache")
  monkeypatch.setattr(masks, "compute_segments", fail)
  np.testing.assert_array_equal(
      demo.demo_segments(data, _fh(), cache_dir=str(tmp_path)), fh)
  # Different images must not hit the same cache entry.
  other = demo.generate_demo(N_SCENES, SIZE, seed=1)
  with pytest.raises(AssertionError, match="cache"):
    demo.demo_segments(other, _fh(), cache_dir=str(tmp_path))


def test_occluded_slivers_are_dropped():
  # Heavily occluded objects leave tiny visible slivers in about 1 scene in
  # 8; those must be dropped (and repainted as what lies beneath them).
  many = demo.generate_demo(64, 64, seed=0)
  for inst in many.instances[:64]:
    areas = np.bincount(inst.ravel())[1:]
    assert len(areas) >= 2 and areas.min() >= 0.01 * 64 * 64
