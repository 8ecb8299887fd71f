"""Segment-id maps: contiguous int32 ids that never wrap, grid layout, dispatch."""
import sys
import types

import ml_collections
import numpy as np
import pytest
import skimage.data
from skimage import segmentation

from odin_jax.data import masks


def _config(**kw):
  base = dict(method="fh", fh_scale=1000.0, fh_sigma=0.8, fh_min_size=1000,
              slic_n_segments=50, slic_compactness=10.0, grid_size=5)
  base.update(kw)
  return ml_collections.ConfigDict(base)


def _is_bijection(a, b):
  """True iff label maps a and b partition pixels identically."""
  pairs = np.unique(np.stack([a.ravel(), b.ravel()], 1), axis=0)
  return (len(pairs) == len(np.unique(a)) == len(np.unique(b)))


def _assert_contiguous_int32(seg):
  assert seg.dtype == np.int32
  np.testing.assert_array_equal(np.unique(seg), np.arange(seg.max() + 1))


def test_fh_keeps_more_than_255_patches_distinct():
  # 32 x 32 patches of 8 x 8 px, each a different colour; neighbours differ
  # by 255 in blue, so FH must return exactly one segment per patch.
  r, c = np.divmod(np.arange(32 * 32), 32)
  colours = np.stack([r * 8, c * 8, ((r + c) % 2) * 255], 1).astype(np.uint8)
  patch_id = np.kron(np.arange(32 * 32).reshape(32, 32), np.ones((8, 8), int))
  image = colours[patch_id]                          # [256, 256, 3]
  seg = masks.felzenszwalb_segments(image, scale=1.0, sigma=0.0, min_size=1)
  _assert_contiguous_int32(seg)
  assert seg.max() + 1 == 1024 > 255
  assert _is_bijection(seg, patch_id)  # no two patches merged, none split
  # The failure mode this guards against: 8-bit ids merge patches.
  assert not _is_bijection(seg.astype(np.uint8), patch_id)


def test_fh_noise_matches_skimage_partition():
  image = np.random.default_rng(0).integers(0, 256, (256, 256, 3), np.uint8)
  seg = masks.felzenszwalb_segments(image, scale=5.0, sigma=0.5, min_size=5)
  ref = segmentation.felzenszwalb(image, scale=5.0, sigma=0.5, min_size=5)
  _assert_contiguous_int32(seg)
  assert seg.max() + 1 > 255
  assert _is_bijection(seg, ref)


def test_fh_grayscale_and_float():
  gray = np.zeros((64, 64), np.uint8)
  gray[:, 32:] = 200
  seg = masks.felzenszwalb_segments(gray, scale=10, sigma=0.0, min_size=10)
  assert seg.shape == (64, 64)
  assert _is_bijection(seg, gray)
  seg_f = masks.felzenszwalb_segments(
      np.repeat(gray[..., None], 3, -1) / 255.0, scale=10, sigma=0.0,
      min_size=10)
  assert _is_bijection(seg_f, gray)


def test_slic_contiguous():
  image = skimage.data.chelsea()[::4, ::4]           # [75, 113, 3]
  seg = masks.slic_segments(image, n_segments=16, compactness=10.0)
  _assert_contiguous_int32(seg)
  assert seg.shape == image.shape[:2] and 4 <= seg.max() + 1 <= 64
  gray = masks.slic_segments(image[..., 0], n_segments=16, compactness=0.1)
  assert gray.shape == image.shape[:2] and gray.max() + 1 >= 4


def test_relabel_sequential_no_wrap():
  labels = np.array([[1000, 7], [256, 7]], np.int64)
  np.testing.assert_array_equal(masks.relabel_sequential(labels),
                                [[2, 0], [1, 0]])


def test_grid_segments():
  np.testing.assert_array_equal(
      masks.grid_segments(4, 6, 2),
      [[0, 0, 0, 1, 1, 1],
       [0, 0, 0, 1, 1, 1],
       [2, 2, 2, 3, 3, 3],
       [2, 2, 2, 3, 3, 3]])
  np.testing.assert_array_equal(
      masks.grid_segments(5, 3, 3),
      [[0, 1, 2], [0, 1, 2], [3, 4, 5], [3, 4, 5], [6, 7, 8]])
  g = masks.grid_segments(224, 224, 5)
  assert g.dtype == np.int32
  counts = np.bincount(g.ravel())
  assert len(counts) == 25 and counts.max() - counts.min() <= 2 * 224 // 5
  sizes = np.bincount(g[0])             # cell widths along one row
  assert sizes.max() - sizes.min() <= 1
  one = masks.grid_segments(17, 9, 1)
  assert one.dtype == np.int32 and not one.any()
  with pytest.raises(ValueError, match="grid_size"):
    masks.grid_segments(4, 4, 0)


def test_compute_segments_dispatch():
  image = np.random.default_rng(2).integers(0, 256, (48, 40, 3), np.uint8)
  fh = masks.compute_segments(image, _config(fh_scale=50, fh_min_size=20))
  np.testing.assert_array_equal(
      fh, masks.felzenszwalb_segments(image, 50, 0.8, 20))
  np.testing.assert_array_equal(
      masks.compute_segments(image, _config(method="slic")),
      masks.slic_segments(image, 50, 10.0))
  np.testing.assert_array_equal(
      masks.compute_segments(image, _config(method="grid", grid_size=3)),
      masks.grid_segments(48, 40, 3))
  gt = np.zeros((48, 40), np.int32)
  gt[10:20, 5:15] = 7
  gt[30:, 30:] = 300
  seg = masks.compute_segments(image, _config(method="gt"), gt_instances=gt)
  assert seg.dtype == np.int32
  np.testing.assert_array_equal(np.unique(seg), [0, 1, 2])
  assert _is_bijection(seg, gt)
  # Any attribute object works, not only ConfigDict.
  plain = types.SimpleNamespace(method="grid", grid_size=2)
  assert masks.compute_segments(image, plain).max() == 3


def test_compute_segments_errors():
  image = np.zeros((8, 8, 3), np.uint8)
  with pytest.raises(ValueError, match=r"mask_config.method.*'fh'.*'gt'"):
    masks.compute_segments(image, _config(method="felz"))
  with pytest.raises(ValueError, match="gt_instances"):
    masks.compute_segments(image, _config(method="gt"))
  with pytest.raises(ValueError, match="mask_config.grid_size"):
    masks.compute_segments(image, types.SimpleNamespace(method="grid"))
  with pytest.raises(ValueError, match="mask_config.method"):
    masks.compute_segments(image, types.SimpleNamespace())
  with pytest.raises(ValueError, match="does not match"):
    masks.compute_segments(image, _config(method="gt"),
                           gt_instances=np.zeros((4, 4), int))


def test_mask_config_key():
  assert masks.mask_config_key(_config()) == "fh_s1000_sig0.8_min1000"
  assert masks.mask_config_key(_config(method="grid")) == "grid5"
  assert masks.mask_config_key(_config(method="gt")) == "gt"
  assert masks.mask_config_key(_config(method="slic")) == "slic_n50_c10"
  assert (masks.mask_config_key(_config(fh_scale=500.0))
          != masks.mask_config_key(_config()))
  with pytest.raises(ValueError, match="method"):
    masks.mask_config_key(_config(method="nope"))


# --- OpenCV's FH ('fh_opencv', extra `opencv`) --------------------------------

def _photos(size=(240, 320)):
  from skimage import transform  # pylint: disable=g-import-not-at-top
  for name in ("astronaut", "coffee", "chelsea"):
    image = transform.resize(getattr(skimage.data, name)(), size)
    yield (image * 255).round().astype(np.uint8)


def test_fh_opencv_is_the_same_algorithm_as_skimage():
  from sklearn.metrics import adjusted_rand_score  # pylint: disable=g-import-not-at-top
  pytest.importorskip("cv2")   # in the `test` extra: runs in CI
  for image in _photos():
    cv = masks.compute_segments(image, _config(method="fh_opencv",
                                               fh_scale=500, fh_min_size=200))
    sk = masks.compute_segments(image, _config(fh_scale=500, fh_min_size=200))
    _assert_contiguous_int32(cv)
    assert cv.shape == image.shape[:2]
    # FH's final pass merges every component below min_size into a
    # neighbour: no segment is smaller (the image is connected).
    assert np.bincount(cv.ravel()).min() >= 200
    # Same algorithm and parameters, other implementation: nearly the same
    # partition and a similar number of segments (not identical: tie order
    # of equal edge weights and the smoothing differ).
    assert adjusted_rand_score(sk.ravel(), cv.ravel()) > 0.6
    assert 0.5 <= (cv.max() + 1) / (sk.max() + 1) <= 2.0


def test_fh_opencv_exact_cases():
  pytest.importorskip("cv2")
  # Two flat halves: exactly two segments, whatever the input dtype.
  gray = np.zeros((64, 64), np.uint8)
  gray[:, 32:] = 200
  for image in (gray, np.repeat(gray[..., None], 3, -1),
                np.repeat(gray[..., None], 3, -1) / 255.0):
    seg = masks.felzenszwalb_segments_opencv(image, scale=10, sigma=0.0,
                                             min_size=10)
    assert _is_bijection(seg, gray)
  # > 255 segments stay distinct (ids are int32, as for scikit-image's FH).
  r, c = np.divmod(np.arange(32 * 32), 32)
  colours = np.stack([r * 8, c * 8, ((r + c) % 2) * 255], 1).astype(np.uint8)
  patch_id = np.kron(np.arange(32 * 32).reshape(32, 32), np.ones((8, 8), int))
  seg = masks.felzenszwalb_segments_opencv(colours[patch_id], scale=1.0,
                                           sigma=0.0, min_size=1)
  assert seg.max() + 1 == 1024 and _is_bijection(seg, patch_id)
  assert masks.mask_config_key(_config(method="fh_opencv")) == (
      "fhcv_s1000_sig0.8_min1000")


def test_fh_opencv_precompute_round_trip(tmp_path):
  """'fh_opencv' settings go through precompute and back like 'fh' ones."""
  pytest.importorskip("cv2")
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  from PIL import Image  # pylint: disable=g-import-not-at-top
  from odin_jax.data import records  # pylint: disable=g-import-not-at-top
  from odin_jax.data.records import precompute  # pylint: disable=g-import-not-at-top
  folder = tmp_path / "images"
  folder.mkdir()
  for i, image in enumerate(_photos((120, 160))):
    Image.fromarray(image).save(folder / f"{i}.png")
  setting = "fh_opencv:scale=200,sigma=0.8,min_size=100"
  meta = precompute.run(precompute.Options(
      source=f"folder:{folder}", output_dir=str(tmp_path / "out"),
      masks=(setting,), num_workers=1, log_every_s=1e9))
  assert meta["num_examples"] == 3
  assert list(meta["mask_settings"]) == ["fhcv_s200_sig0.8_min100"]
  source = records.RecordSource(str(tmp_path / "out"), setting)
  for i in range(3):
    ex = source.lookup(tf.constant(i, tf.int64))
    image, segments = ex["image"].numpy(), ex["segments"].numpy()
    # The stored map is OpenCV's FH of the stored (JPEG-converted) image.
    np.testing.assert_array_equal(
        segments, masks.felzenszwalb_segments_opencv(image, 200, 0.8, 100))


def test_fh_opencv_without_opencv_says_how_to_install(tmp_path, monkeypatch):
  """No cv2: precompute stops before any work with the install command."""
  from odin_jax.data.records import precompute  # pylint: disable=g-import-not-at-top
  monkeypatch.setitem(sys.modules, "cv2", None)    # import cv2 -> ImportError
  image = np.zeros((8, 8, 3), np.uint8)
  with pytest.raises(ImportError, match=r"odin_jax\[opencv\]"):
    masks.compute_segments(image, _config(method="fh_opencv"))
  (tmp_path / "images").mkdir()
  from PIL import Image  # pylint: disable=g-import-not-at-top
  Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(
      tmp_path / "images" / "0.png")
  with pytest.raises(ImportError, match=r"odin_jax\[opencv\]"):
    precompute.run(precompute.Options(
        source=f"folder:{tmp_path / 'images'}",
        output_dir=str(tmp_path / "out"), masks=("fh_opencv:scale=100",),
        num_workers=1, log_every_s=1e9))
  assert not (tmp_path / "out").exists() or not any(
      (tmp_path / "out").glob("*.array_record*"))
