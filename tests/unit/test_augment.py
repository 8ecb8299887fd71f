"""Tests of odin_jax.data.augment: geometry alignment, ids, determinism, stats,
and the host -> device transport (uint8 views, narrow masks). The colour
ops, which run on the device, are tested in test_color.py."""

import numpy as np
import pytest
import tensorflow as tf

from skimage import color as skcolor

from configs import byol, detcon_b, detcon_s, simclr
from odin_jax.data import augment

H, W = 96, 80          # non-square source image
RED_ID, BLUE_ID, BG_ID = 5, 9, 2


def _config(image_size=64, colour=True):
  c = detcon_b.get_config("test")
  c.image_size = image_size
  if not colour:
    a = c.augment
    a.color_jitter_prob = 0.0
    a.grayscale_prob = 0.0
    a.blur_prob = (0.0, 0.0)
    a.solarize_prob = (0.0, 0.0)
  return c


def _scene():
  """Gray background, red block top-left, blue block bottom-right (asymmetric)."""
  image = np.full((H, W, 3), 128, np.uint8)
  seg = np.full((H, W), BG_ID, np.int32)
  image[8:56, 6:34] = (255, 0, 0)
  seg[8:56, 6:34] = RED_ID
  image[60:90, 44:76] = (0, 0, 255)
  seg[60:90, 44:76] = BLUE_ID
  return image, seg


def _seed(i):
  return tf.constant([i, 1234], tf.int64)


def _interior(mask, r=1):
  """bool [S, S]: pixels whose (2r+1)^2 neighbourhood has a single id."""
  p = np.pad(mask, r, mode="edge")
  same = np.ones(mask.shape, bool)
  for dy in range(2 * r + 1):
    for dx in range(2 * r + 1):
      same &= p[dy:dy + mask.shape[0], dx:dx + mask.shape[1]] == mask
  return same


def _colour_class(view):
  """Per-pixel id implied by the colour of a view float [S, S, 3]."""
  r, g, b = view[..., 0], view[..., 1], view[..., 2]
  out = np.full(view.shape[:2], -1, np.int32)
  out[(r > 0.75) & (g < 0.25) & (b < 0.25)] = RED_ID
  out[(b > 0.75) & (g < 0.25) & (r < 0.25)] = BLUE_ID
  gray = (np.abs(view - 128 / 255).max(-1) < 0.12)
  out[gray] = BG_ID
  return out


def _check_aligned(view, mask):
  view = view / 255.0 if view.dtype == np.uint8 else view
  # Away from id boundaries (1 px; 2 px tolerance at block corners where the
  # separable bicubic kernel rounds the corner), the colour names the id.
  interior = _interior(mask, r=1)
  got = _colour_class(view)
  bad = interior & (got != mask)
  corners_ok = _interior(mask, r=2)
  assert not (bad & corners_ok).any(), np.argwhere(bad & corners_ok)[:5]
  assert bad.mean() < 0.01


def test_crop_resize_flip_keeps_image_and_mask_aligned():
  image, seg = _scene()
  boxes = [(0, 0, H, W), (4, 2, 40, 30), (30, 20, 50, 50), (50, 30, 25, 22),
           (10, 10, 20, 20)]
  for box in boxes:
    for flip in (False, True):
      view, mask = augment.crop_resize_flip(
          image, seg, tuple(tf.constant(v, tf.int32) for v in box),
          tf.constant(flip), 64)
      view, mask = view.numpy(), mask.numpy()
      assert view.shape == (64, 64, 3) and mask.shape == (64, 64)
      assert view.min() >= 0.0 and view.max() <= 1.0
      _check_aligned(view, mask)


def test_crop_resize_flip_mask_matches_nearest_reference():
  rng = np.random.default_rng(0)
  seg = rng.integers(0, 50, size=(H, W)).astype(np.int32)
  image = np.zeros((H, W, 3), np.uint8)
  y0, x0, h, w, s = 7, 11, 50, 37, 64
  for flip in (False, True):
    _, mask = augment.crop_resize_flip(
        image, seg, tuple(tf.constant(v) for v in (y0, x0, h, w)),
        tf.constant(flip), s)
    rows = y0 + np.floor((np.arange(s) + 0.5) * h / s).astype(int)
    cols = x0 + np.floor((np.arange(s) + 0.5) * w / s).astype(int)
    want = seg[np.ix_(rows, cols)]
    if flip:
      want = want[:, ::-1]
    np.testing.assert_array_equal(mask.numpy(), want)


def test_two_views_alignment_over_many_seeds():
  image, seg = _scene()
  config = _config(64, colour=False)
  fn = tf.function(lambda s: augment.two_views(image, seg, s, config))
  flipped_red_left = flipped_red_right = 0
  for i in range(24):
    out = {k: v.numpy() for k, v in fn(_seed(i)).items()}
    for v in ("1", "2"):
      _check_aligned(out["view" + v], out["mask" + v])
      cols = np.argwhere(out["mask" + v] == RED_ID)[:, 1]
      blue = np.argwhere(out["mask" + v] == BLUE_ID)[:, 1]
      if len(cols) and len(blue):  # red is left of blue unless flipped
        if cols.mean() < blue.mean():
          flipped_red_left += 1
        else:
          flipped_red_right += 1
  assert flipped_red_left > 0 and flipped_red_right > 0  # both flips covered


def test_nearest_resize_never_invents_ids():
  rng = np.random.default_rng(1)
  ids = np.array([0, 3, 17, 40, 1000, 123456])
  seg = ids[rng.integers(0, len(ids), size=(H, W))].astype(np.int32)
  image = rng.integers(0, 256, size=(H, W, 3)).astype(np.uint8)
  config = _config(64)
  fn = tf.function(lambda s: augment.two_views(image, seg, s, config))
  for i in range(8):
    out = fn(_seed(i))
    for k in ("mask1", "mask2"):
      assert out[k].dtype == tf.int32
      assert set(np.unique(out[k].numpy())) <= set(ids.tolist())


def test_deterministic_in_seed():
  rng = np.random.default_rng(2)
  image = rng.integers(0, 256, size=(H, W, 3)).astype(np.uint8)
  seg = rng.integers(0, 7, size=(H, W)).astype(np.int32)
  config = _config(64)
  fn = tf.function(lambda s: augment.two_views(image, seg, s, config))
  a, b, c = fn(_seed(3)), fn(_seed(3)), fn(_seed(4))
  for k in a:
    np.testing.assert_array_equal(a[k].numpy(), b[k].numpy())
  assert not np.array_equal(a["view1"].numpy(), c["view1"].numpy())
  assert not np.array_equal(a["mask1"].numpy(), c["mask1"].numpy())
  # The two views of one call differ from each other.
  assert not np.array_equal(a["view1"].numpy(), a["view2"].numpy())
  # Eager agrees with graph mode (masks exactly; uint8 views up to one
  # level, where graph optimisations move a value across a rounding edge).
  e = augment.two_views(image, seg, _seed(3), config)
  for k in a:
    np.testing.assert_allclose(a[k].numpy().astype(np.int32),
                               e[k].numpy().astype(np.int32), rtol=0, atol=1)
  for k in ("mask1", "mask2"):
    np.testing.assert_array_equal(a[k].numpy(), e[k].numpy())


def test_host_views_are_uint8_geometry_only():
  # The colour recipe runs on the device (data/color.py): the host's views
  # do not depend on it, and they are the bicubic crop rounded to uint8.
  image, seg = _scene()
  full = augment.two_views(image, seg, _seed(5), _config(64, colour=True))
  geo = augment.two_views(image, seg, _seed(5), _config(64, colour=False))
  for k in full:
    np.testing.assert_array_equal(full[k].numpy(), geo[k].numpy())
  assert full["view1"].dtype == tf.uint8
  box = (tf.constant(0), tf.constant(0), tf.constant(H), tf.constant(W))
  float_view, _ = augment.crop_resize_flip(image, seg, box, tf.constant(False),
                                           64)
  np.testing.assert_array_equal(
      augment.to_uint8(float_view).numpy(),
      np.round(np.clip(float_view.numpy(), 0, 1) * 255).astype(np.uint8))


@pytest.mark.parametrize("method,grid,dtype", [
    ("grid", 5, np.uint8), ("grid", 16, np.uint8), ("grid", 17, np.uint16),
    ("fh", 5, np.uint16), ("gt", 5, np.uint16)])
def test_masks_ship_in_the_narrowest_type(method, grid, dtype):
  c = _config()
  c.masks.method, c.masks.grid_size = method, grid
  ids = np.array([[0, 3], [255 if dtype == np.uint8 else 65535, 7]],
                 np.int32)
  out = augment.narrow_masks({"mask1": tf.constant(ids),
                              "mask2": tf.constant(ids[::-1])}, c)
  assert out["mask1"].dtype.as_numpy_dtype == dtype
  np.testing.assert_array_equal(out["mask1"].numpy(), ids)   # no wrapping
  np.testing.assert_array_equal(out["mask2"].numpy(), ids[::-1])


def test_ids_too_large_for_uint16_are_relabelled_jointly():
  # Ids above 65535 are relabelled densely over both views (and the span's
  # map), so the equalities the step reads survive; nothing wraps.
  c = _config()
  c.masks.method = "fh"
  m1 = np.array([[70000, 5], [5, 123456]], np.int32)
  m2 = np.array([[123456, 123456], [9, 70000]], np.int32)
  out = augment.narrow_masks({"mask1": tf.constant(m1),
                              "mask2": tf.constant(m2)}, c)
  o1, o2 = out["mask1"].numpy(), out["mask2"].numpy()
  assert o1.dtype == np.uint16 and max(o1.max(), o2.max()) < 5
  both_in, both_out = np.concatenate([m1.ravel(), m2.ravel()]), np.concatenate(
      [o1.ravel(), o2.ravel()]).astype(np.int64)
  np.testing.assert_array_equal(both_in[:, None] == both_in[None],
                                both_out[:, None] == both_out[None])


def _geometry_samples(n, height, width):
  config = _config()
  ds = tf.data.Dataset.range(n).map(
      lambda i: augment.sample_geometry(tf.stack([i, tf.constant(7, tf.int64)]),
                                        height, width, config))
  boxes, flips = [], []
  for box, flip in ds.as_numpy_iterator():
    boxes.append(box)
    flips.append(flip)
  return np.array(boxes), np.array(flips)


def test_crop_box_statistics():
  boxes, flips = _geometry_samples(600, H, W)
  y0, x0, h, w = boxes.T
  assert (y0 >= 0).all() and (x0 >= 0).all()
  assert (y0 + h <= H).all() and (x0 + w <= W).all()
  # Area and aspect in range up to the rounding of h and w to integers.
  assert ((h + 0.5) * (w + 0.5) >= 0.08 * H * W).all()
  assert ((h - 0.5) * (w - 0.5) <= H * W).all()
  assert ((w + 0.5) / (h - 0.5) >= 3 / 4).all()
  assert ((w - 0.5) / (h + 0.5) <= 4 / 3).all()
  area = h * w / (H * W)
  assert area.min() < 0.15 and area.max() > 0.9   # the whole range is used
  log_aspect = np.log(w / h)
  assert abs(log_aspect.mean()) < 0.05            # log-uniform: symmetric
  assert (log_aspect < -0.2).mean() > 0.1 and (log_aspect > 0.2).mean() > 0.1
  assert 0.42 < flips.mean() < 0.58
  assert len({tuple(b) for b in boxes}) > 500     # boxes vary with the seed


def test_crop_box_fallback_is_central_with_clamped_aspect():
  # 10 x 400: no attempt can fit (h <= 10 forces an aspect way above 4/3).
  boxes, _ = _geometry_samples(5, 10, 400)
  for y0, x0, h, w in boxes:
    assert (h, w) == (10, 13)
    assert (y0, x0) == (0, (400 - 13) // 2)


