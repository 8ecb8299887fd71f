"""Tests of odin_jax.data.color: the colour augmentation the step runs on the
device, against NumPy / scikit-image references, against the former host
path (data/host_color.py, TensorFlow) with the same parameters, and its
randomness: per example position, so sharding and resume do not change it.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow as tf
from skimage import color as skcolor

from configs import byol, detcon_b, detcon_s, simclr
from odin_jax import sharding
from odin_jax.data import color, host_color


# --- NumPy references (BYOL's augmentations.py / SimCLR v1) ----------------

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


def _jnp(p):
  return {k: jnp.asarray(v) for k, v in p.items()}


@pytest.mark.parametrize("order", [(0, 1, 2, 3), (3, 2, 1, 0), (1, 3, 0, 2)])
def test_color_jitter_matches_numpy(order):
  rng = np.random.default_rng(10)
  image = rng.random((12, 12, 3)).astype(np.float32)
  for brightness in (0.3, -0.25):
    p = _params(order, brightness=brightness)
    got = np.asarray(color.color_jitter(jnp.asarray(image), _jnp(p)))
    np.testing.assert_allclose(got, _np_jitter(image, p), atol=2e-5)


def test_hsv_round_trip_matches_scikit_image():
  rng = np.random.default_rng(13)
  rgb = rng.random((500, 3)).astype(np.float32)
  rgb[:50] = rgb[:50, :1]          # grays: hue 0, saturation 0
  rgb[50:60, 1] = rgb[50:60, 0]    # ties between the largest channels
  hsv = np.asarray(color.rgb_to_hsv(jnp.asarray(rgb)))
  np.testing.assert_allclose(hsv, skcolor.rgb2hsv(rgb[None])[0], atol=2e-6)
  np.testing.assert_allclose(np.asarray(color.hsv_to_rgb(jnp.asarray(hsv))),
                             rgb, atol=2e-6)


@pytest.mark.parametrize("factor", [0.0, 0.6, 1.8, 6.0])
def test_saturation_matches_the_hsv_definition(factor):
  # Written without the HSV round trip: equal to scaling HSV's s (clipped
  # to 1, which the larger factors reach) in scikit-image's HSV.
  rng = np.random.default_rng(15)
  image = rng.random((30, 30, 3)).astype(np.float32)
  image[0] = image[0, :, :1]       # grays stay gray
  hsv = skcolor.rgb2hsv(image.astype(np.float64))
  hsv[..., 1] = np.clip(hsv[..., 1] * factor, 0, 1)
  got = np.asarray(color.adjust_saturation(jnp.asarray(image), factor))
  np.testing.assert_allclose(got, skcolor.hsv2rgb(hsv), atol=3e-6)


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
  got = np.asarray(color.apply_color(jnp.asarray(image), _jnp(p)))
  np.testing.assert_allclose(got, _np_color(image, p, size), atol=2e-5)


def test_device_ops_equal_the_former_host_ops():
  # The same parameters through the TF ops training used before (host) and
  # the jnp ops it uses now (device).
  rng = np.random.default_rng(14)
  size = 48
  image = rng.random((size, size, 3)).astype(np.float32)
  for order, flags in (((0, 1, 2, 3), {}), ((3, 1, 0, 2), dict(blur=True)),
                       ((2, 3, 1, 0), dict(grayscale=True, solarize=True))):
    p = _params(order, **flags)
    host = host_color.apply_color(
        tf.constant(image), {k: tf.constant(v) for k, v in p.items()})
    device = color.apply_color(jnp.asarray(image), _jnp(p))
    np.testing.assert_allclose(np.asarray(device), host.numpy(), atol=3e-6)


def test_gaussian_blur_is_zero_padded_like_the_references():
  # BYOL / SimCLR: a 'SAME' depthwise conv (zero padding), kernel
  # int(S / 10 / 2) taps each side: 23 taps at 224 px.
  assert color.blur_radius(224) == 11 and color.blur_radius(80) == 4
  rng = np.random.default_rng(12)
  size, sigma = 48, 1.7
  image = rng.random((size, size, 3)).astype(np.float32)
  image[:, :3] = 1.0     # a bright border: zero and reflect padding differ
  got = np.asarray(color.gaussian_blur(jnp.asarray(image), sigma))
  np.testing.assert_allclose(got, _np_blur(image, sigma, 2), atol=1e-6)
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
  # A constant stays constant away from the border, the ring darkens.
  r = color.blur_radius(64)
  flat = np.asarray(color.gaussian_blur(jnp.full((64, 64, 3), 0.3), 1.5))
  np.testing.assert_allclose(flat[r:-r, r:-r], 0.3, atol=1e-6)
  assert (flat[0] < 0.3 - 1e-3).all()


# --- Sampling ----------------------------------------------------------------

def _samples(config, view, n=400, seed=11):
  keys = jax.random.split(jax.random.PRNGKey(seed), n)
  out = jax.jit(jax.vmap(lambda k: color.sample_params(k, config, view)))(
      keys)
  return {k: np.asarray(v) for k, v in out.items()}


def test_sampled_params_follow_the_byol_recipe():
  c = byol.get_config("test")
  v1, v2 = _samples(c, 0), _samples(c, 1)
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
    assert (p["sigma"] >= 0.1).all() and (p["sigma"] <= 2.0).all()
  # Asymmetric: view 1 always blurred, never solarised; view 2 rarely.
  assert v1["blur"].all() and not v1["solarize"].any()
  assert 0.05 < v2["blur"].mean() < 0.15
  assert 0.14 < v2["solarize"].mean() < 0.26


@pytest.mark.parametrize("module", [detcon_s, simclr], ids=["detcon_s",
                                                            "simclr"])
def test_simclr_recipe_is_symmetric(module):
  # SimCLR v1: the two views draw from one distribution (the same function
  # of the key), strength-1 jitter, blur 0.5, no solarisation.
  c = module.get_config("test")
  v1, v2 = _samples(c, 0), _samples(c, 1)
  for k in v1:
    np.testing.assert_array_equal(v1[k], v2[k])
  assert not v1["solarize"].any()
  assert 0.42 < v1["blur"].mean() < 0.58
  assert 0.74 < v1["jitter"].mean() < 0.86
  assert np.abs(v1["brightness"]).max() <= 0.8
  assert v1["brightness"].min() < -0.6 and v1["brightness"].max() > 0.6
  assert v1["contrast"].min() < 0.4 and v1["saturation"].max() > 1.6
  assert np.abs(v1["hue"]).max() <= 0.2 and np.abs(v1["hue"]).max() > 0.15


def test_brightness_is_an_additive_offset():
  # BYOL / DetCon / Odin A.1 add delta ~ U[-0.4, 0.4]: a black image turns
  # grey by delta > 0 (a factor would keep it black).
  c = detcon_b.get_config("test")
  a = c.augment
  a.color_jitter_prob, a.grayscale_prob = 1.0, 0.0
  a.blur_prob = a.solarize_prob = (0.0, 0.0)
  a.contrast = a.saturation = a.hue = 0.0
  n = 32
  black = jnp.zeros((n, 8, 8, 3), jnp.uint8)
  grey = jnp.full((n, 8, 8, 3), 128, jnp.uint8)
  key, pos = jax.random.PRNGKey(2), jnp.arange(n)
  b = np.asarray(color.augment_views(black, pos, key, c, 0))
  g = np.asarray(color.augment_views(grey, pos, key, c, 0))
  delta = g[:, 0, 0, 0] - 128 / 255
  per_image = lambda x: np.broadcast_to(x[:, None, None, None], g.shape)
  np.testing.assert_allclose(g, per_image(delta + 128 / 255), atol=1e-6)
  np.testing.assert_allclose(b, per_image(np.maximum(delta, 0)), atol=1e-6)
  assert (np.abs(delta) <= 0.4 + 1e-6).all()
  assert delta.min() < -0.2 and delta.max() > 0.2


def test_blur_and_solarize_follow_each_views_probability():
  # blur_prob (1, 0) and solarize_prob (1, 0): view 1 always, view 2 never.
  c = detcon_b.get_config("test")
  a = c.augment
  a.color_jitter_prob = a.grayscale_prob = 0.0
  a.blur_prob, a.solarize_prob = (1.0, 0.0), (1.0, 0.0)
  rng = np.random.default_rng(4)
  views = jnp.asarray(rng.integers(0, 256, (4, 32, 32, 3)), jnp.uint8)
  pos, key = jnp.arange(4), jax.random.PRNGKey(0)
  v1 = np.asarray(color.augment_views(views, pos, key, c, 0))
  v2 = np.asarray(color.augment_views(views, pos, key, c, 1))
  np.testing.assert_allclose(v2, np.asarray(views) / 255.0, atol=1e-7)
  assert v1.max() <= 0.5 + 1e-6     # solarised: every value folded below 0.5


# --- The batch: keys per example position ------------------------------------

def _batch(b=8, size=16, first=100):
  rng = np.random.default_rng(5)
  return {"view1": rng.integers(0, 256, (b, size, size, 3), dtype=np.uint8),
          "view2": rng.integers(0, 256, (b, size, size, 3), dtype=np.uint8),
          "mask1": rng.integers(0, 9, (b, size, size)).astype(np.uint8),
          "mask2": rng.integers(0, 9, (b, size, size)).astype(np.uint16),
          "index": np.arange(first, first + b, dtype=np.int32)}


def test_prepare_follows_each_examples_position_not_its_row():
  config = detcon_b.get_config("test")
  key = jax.random.PRNGKey(7)
  prepare = jax.jit(lambda b: color.prepare(b, key, config))
  batch = _batch()
  out = prepare(batch)
  assert "index" not in out
  assert out["view1"].dtype == jnp.float32 and out["mask2"].dtype == jnp.int32
  np.testing.assert_array_equal(out["mask1"], batch["mask1"])
  # Rows permuted (another batch layout): the same example, the same draw.
  perm = np.array([3, 0, 7, 1, 6, 2, 5, 4])
  shuffled = prepare({k: v[perm] for k, v in batch.items()})
  for k in ("view1", "view2"):
    np.testing.assert_array_equal(shuffled[k], np.asarray(out[k])[perm])
  # Another position, another draw; the two views differ.
  moved = prepare(dict(batch, index=batch["index"] + 1))
  assert not np.allclose(moved["view1"], out["view1"])
  assert not np.allclose(out["view1"], out["view2"])


def test_prepare_on_4_devices_equals_1_device():
  config = detcon_b.get_config("test")
  key = jax.random.PRNGKey(7)
  batch = _batch()
  one = jax.jit(lambda b: color.prepare(b, key, config))(batch)
  mesh = sharding.make_mesh(jax.devices()[:4])
  four = jax.jit(lambda b: color.prepare(b, key, config),
                 out_shardings=sharding.replicated(mesh))(
                     sharding.to_global(mesh, batch))
  # The same draws (exactly) and the same images up to float rounding (XLA
  # reduces the per-image means in another order per device count).
  for k in ("view1", "view2"):
    np.testing.assert_allclose(np.asarray(one[k]), np.asarray(four[k]),
                               rtol=0, atol=1e-6)
  draws = jax.vmap(lambda p: color.sample_params(color.view_key(key, p, 1),
                                                 config, 1))
  one = jax.jit(draws)(batch["index"])
  four = jax.jit(draws, out_shardings=sharding.replicated(mesh))(
      sharding.to_global(mesh, {"i": batch["index"]})["i"])
  for k in one:
    np.testing.assert_array_equal(np.asarray(one[k]), np.asarray(four[k]))


def test_float_views_are_refused_with_a_clear_message():
  config = detcon_b.get_config("test")
  batch = dict(_batch(), view1=np.zeros((8, 16, 16, 3), np.float32))
  with pytest.raises(TypeError, match="uint8"):
    color.prepare(batch, jax.random.PRNGKey(0), config)
