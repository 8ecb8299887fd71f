"""Tests of odin_jax.data.augment: geometry alignment, ids, determinism, stats."""

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
  # Eager agrees with graph mode (masks exactly; float views up to an ulp,
  # graph optimisations may fuse arithmetic differently).
  e = augment.two_views(image, seg, _seed(3), config)
  for k in a:
    np.testing.assert_allclose(a[k].numpy(), e[k].numpy(), rtol=0, atol=1e-6)
  for k in ("mask1", "mask2"):
    np.testing.assert_array_equal(a[k].numpy(), e[k].numpy())


def test_colour_aug_does_not_change_geometry():
  image, seg = _scene()
  full = augment.two_views(image, seg, _seed(5), _config(64, colour=True))
  geo = augment.two_views(image, seg, _seed(5), _config(64, colour=False))
  for k in ("mask1", "mask2"):
    np.testing.assert_array_equal(full[k].numpy(), geo[k].numpy())
  assert not np.allclose(full["view1"].numpy(), geo["view1"].numpy())
  for k in ("view1", "view2"):
    assert 0.0 <= full[k].numpy().min() and full[k].numpy().max() <= 1.0


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


def test_gaussian_blur_keeps_constants_and_smooths():
  flat = tf.fill([64, 64, 3], 0.3)
  r = augment.blur_radius(64)
  out = augment.gaussian_blur(flat, 1.5, 64).numpy()
  # Constant away from the border; zero padding darkens the border ring.
  np.testing.assert_allclose(out[r:-r, r:-r], 0.3, atol=1e-6)
  assert (out[0] < 0.3 - 1e-3).all() and (out[:, -1] < 0.3 - 1e-3).all()
  rng = np.random.default_rng(3)
  noise = tf.constant(rng.random((64, 64, 3)), tf.float32)
  blurred = augment.gaussian_blur(noise, 2.0, 64).numpy()
  assert blurred.shape == (64, 64, 3)
  assert blurred.std() < 0.5 * noise.numpy().std()
  inner = (slice(r, -r), slice(r, -r))   # the mean is kept off the border
  assert abs(blurred[inner].mean() - noise.numpy()[inner].mean()) < 0.01


@pytest.mark.parametrize("view", [0, 1])
def test_blur_and_solarize_probabilities_per_view(view):
  # blur_prob=(1, 0): view 1 always blurred, view 2 never; same for solarise.
  rng = np.random.default_rng(4)
  image = rng.integers(0, 256, size=(H, W, 3)).astype(np.uint8)
  seg = np.zeros((H, W), np.int32)
  c = _config(64, colour=False)
  probs = [0.0, 0.0]
  probs[view] = 1.0
  c.augment.solarize_prob = tuple(probs)
  out = augment.two_views(image, seg, _seed(6), c)
  plain = augment.two_views(image, seg, _seed(6), _config(64, colour=False))
  changed = [not np.allclose(out[k].numpy(), plain[k].numpy())
             for k in ("view1", "view2")]
  assert changed == [view == 0, view == 1]
  v = out[f"view{view + 1}"].numpy()
  assert v.max() <= 0.5 + 1e-6   # solarised: every value folded below 0.5


# --- Colour ops against NumPy (BYOL's augmentations.py / SimCLR v1) --------

def _np_blur(image, sigma, radius):
  """Separable Gaussian blur with zero padding, a plain loop over taps."""
  x = np.arange(-radius, radius + 1, dtype=np.float64)
  k = np.exp(-x ** 2 / (2 * sigma ** 2))
  k /= k.sum()
  h, w = image.shape[:2]
  p = np.pad(image.astype(np.float64), [(radius, radius), (radius, radius),
                                         (0, 0)])
  rows = sum(k[i] * p[:, i:i + w] for i in range(2 * radius + 1))
  return sum(k[i] * rows[i:i + h] for i in range(2 * radius + 1))


def _np_jitter(image, p):
  """The 4 jitter ops in p['order'], each clipped to [0, 1] (skimage HSV)."""
  x = image.astype(np.float64)
  for op in p["order"]:
    if op == 0:                                  # brightness: additive
      x = x + p["brightness"]
    elif op == 1:                                # contrast: per-channel mean
      mean = x.mean(axis=(0, 1), keepdims=True)
      x = mean + p["contrast"] * (x - mean)
    else:
      hsv = skcolor.rgb2hsv(x)
      if op == 2:
        hsv[..., 1] = np.clip(hsv[..., 1] * p["saturation"], 0, 1)
      else:
        hsv[..., 0] = (hsv[..., 0] + p["hue"]) % 1.0
      x = skcolor.hsv2rgb(hsv)
    x = np.clip(x, 0, 1)
  return x


def _np_color(image, p, size):
  """Jitter -> grayscale -> blur -> solarise -> clip, where p says."""
  x = _np_jitter(image, p) if p["jitter"] else image.astype(np.float64)
  if p["grayscale"]:
    x = np.repeat(x @ np.array([0.2989, 0.5870, 0.1140])[:, None], 3, -1)
  if p["blur"]:
    x = _np_blur(x, p["sigma"], int(size / 20))
  if p["solarize"]:
    x = np.where(x < 0.5, x, 1 - x)
  return np.clip(x, 0, 1)


def _params(order, **flags):
  p = {"jitter": True, "grayscale": False, "blur": False, "solarize": False,
       "brightness": 0.3, "contrast": 1.3, "saturation": 0.6, "hue": -0.08,
       "order": np.array(order, np.int32), "sigma": 1.3}
  p.update(flags)
  return p


def _tf_params(p):
  return {k: tf.constant(v) for k, v in p.items()}


@pytest.mark.parametrize("order", [(0, 1, 2, 3), (3, 2, 1, 0), (1, 3, 0, 2)])
def test_color_jitter_matches_numpy(order):
  rng = np.random.default_rng(10)
  image = rng.random((12, 12, 3)).astype(np.float32)
  for brightness in (0.3, -0.25):
    p = _params(order, brightness=brightness)
    got = augment.color_jitter(tf.constant(image), _tf_params(p)).numpy()
    np.testing.assert_allclose(got, _np_jitter(image, p), atol=2e-5)


@pytest.mark.parametrize("flags", [
    dict(blur=True, solarize=True),
    dict(grayscale=True, blur=True),
    dict(jitter=False, grayscale=True, solarize=True),
])
def test_apply_color_matches_numpy_in_byol_order(flags):
  rng = np.random.default_rng(11)
  size = 40
  image = rng.random((size, size, 3)).astype(np.float32)
  p = _params((2, 0, 3, 1), **flags)
  got = augment.apply_color(tf.constant(image), _tf_params(p)).numpy()
  np.testing.assert_allclose(got, _np_color(image, p, size), atol=2e-5)


def test_gaussian_blur_is_zero_padded_like_the_references():
  # BYOL / SimCLR: a 'SAME' depthwise conv (zero padding), kernel
  # int(S / 10 / 2) taps each side: 23 taps at 224 px.
  assert augment.blur_radius(224) == 11 and augment.blur_radius(80) == 4
  rng = np.random.default_rng(12)
  size, sigma = 48, 1.7
  image = rng.random((size, size, 3)).astype(np.float32)
  image[:, :3] = 1.0     # a bright border: zero and reflect padding differ
  got = augment.gaussian_blur(tf.constant(image), sigma, size).numpy()
  np.testing.assert_allclose(got, _np_blur(image, sigma, 2), atol=1e-6)
  # The same as TF's depthwise conv with 'SAME' padding (BYOL's op).
  x = np.arange(-2, 3, dtype=np.float32)
  k = np.exp(-x ** 2 / (2 * sigma ** 2))
  k /= k.sum()
  conv = tf.nn.depthwise_conv2d(
      image[None], np.tile(k[None, :, None, None], (1, 1, 3, 1)),
      [1, 1, 1, 1], "SAME")
  conv = tf.nn.depthwise_conv2d(
      conv, np.tile(k[:, None, None, None], (1, 1, 3, 1)), [1, 1, 1, 1],
      "SAME")
  np.testing.assert_allclose(got, conv[0].numpy(), atol=1e-6)


def _brightness_only_config(size):
  c = _config(size, colour=False)
  a = c.augment
  a.color_jitter_prob = 1.0
  a.contrast = a.saturation = a.hue = 0.0
  return c


def test_brightness_is_an_additive_offset():
  # BYOL / DetCon / Odin A.1 add delta ~ U[-0.4, 0.4]: a black image turns
  # grey by delta > 0 (a factor would keep it black), a mid-grey one moves
  # by the same delta, in both directions.
  c = _brightness_only_config(32)
  black = np.zeros((40, 40, 3), np.uint8)
  grey = np.full((40, 40, 3), 128, np.uint8)
  seg = np.zeros((40, 40), np.int32)
  views = tf.function(lambda im, s: augment.two_views(im, seg, s, c))
  deltas, lifted = [], 0
  for i in range(16):
    for k in ("view1", "view2"):
      b = views(black, _seed(i))[k].numpy()
      g = views(grey, _seed(i))[k].numpy()
      delta = g - 128 / 255
      np.testing.assert_allclose(delta, delta.flat[0], atol=1e-5)
      np.testing.assert_allclose(b, max(delta.flat[0], 0.0), atol=1e-5)
      deltas.append(delta.flat[0])
      lifted += b.max() > 0.05
  deltas = np.array(deltas)
  assert (np.abs(deltas) <= 0.4 + 1e-5).all()
  assert deltas.min() < -0.2 and deltas.max() > 0.2 and lifted > 0


def _param_samples(config, view, n=400):
  ds = tf.data.Dataset.range(n).map(
      lambda i: augment.sample_color_params(
          tf.stack([i, tf.constant(11, tf.int64)]), config, view))
  out = list(ds.as_numpy_iterator())
  return {k: np.array([o[k] for o in out]) for k in out[0]}


def test_sampled_color_params_follow_the_byol_recipe():
  c = byol.get_config("test")
  v1, v2 = _param_samples(c, 0), _param_samples(c, 1)
  for p in (v1, v2):
    assert np.abs(p["brightness"]).max() <= 0.4
    assert p["brightness"].min() < -0.3 and p["brightness"].max() > 0.3
    assert (p["contrast"] >= 0.6).all() and (p["contrast"] <= 1.4).all()
    assert (p["saturation"] >= 0.8).all() and (p["saturation"] <= 1.2).all()
    assert np.abs(p["hue"]).max() <= 0.1
    assert (np.sort(p["order"], axis=1) == np.arange(4)).all()
    assert len({tuple(o) for o in p["order"]}) == 24   # every permutation
    assert 0.74 < p["jitter"].mean() < 0.86
    assert 0.14 < p["grayscale"].mean() < 0.26
  # Asymmetric: view 1 always blurred, never solarised; view 2 rarely.
  assert v1["blur"].all() and not v1["solarize"].any()
  assert 0.05 < v2["blur"].mean() < 0.15
  assert 0.14 < v2["solarize"].mean() < 0.26


@pytest.mark.parametrize("module", [detcon_s, simclr], ids=["detcon_s",
                                                            "simclr"])
def test_simclr_recipe_is_symmetric(module):
  # SimCLR v1: the two views draw from one distribution (here: the same
  # function of the seed), strength-1 jitter, blur 0.5, no solarisation.
  c = module.get_config("test")
  v1, v2 = _param_samples(c, 0), _param_samples(c, 1)
  for k in v1:
    np.testing.assert_array_equal(v1[k], v2[k])
  assert not v1["solarize"].any()
  assert 0.42 < v1["blur"].mean() < 0.58
  assert 0.74 < v1["jitter"].mean() < 0.86
  assert 0.14 < v1["grayscale"].mean() < 0.26
  assert np.abs(v1["brightness"]).max() <= 0.8
  assert v1["brightness"].min() < -0.6 and v1["brightness"].max() > 0.6
  assert v1["contrast"].min() < 0.4 and v1["saturation"].max() > 1.6
  assert np.abs(v1["hue"]).max() <= 0.2 and np.abs(v1["hue"]).max() > 0.15
  # BYOL's recipe, for contrast, draws differently in the two views.
  b = byol.get_config("test")
  assert not np.array_equal(_param_samples(b, 0, 50)["blur"],
                            _param_samples(b, 1, 50)["blur"])
