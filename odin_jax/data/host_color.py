"""The former host-side colour augmentation, in TensorFlow (tf.data).

Training no longer uses it: the colour ops run in the jitted step on the
accelerator (data/color.py), and the host ships uint8 views after the
geometry (data/augment.py). It is kept for one measured reason and one
check:
  - bench/input_pipeline.py runs it after the new host pipeline to measure
    what moving the colour work off the host gained, in the same run
    (host_color_views reproduces the old path's draws for each seed);
  - tests/unit/test_color.py checks the device ops against it, a second
    implementation beside the NumPy / scikit-image references.

Every op is a pure function (image float [S, S, 3], parameter) -> image and
sample_color_params draws all of one view's parameters at once. Ops, order
and ranges follow BYOL's augmentations.py: jitter -> grayscale -> blur ->
solarise.
"""

from __future__ import annotations

import tensorflow as tf

from odin_jax.data.augment import _split, _uniform
from odin_jax.data import color
from odin_jax.data.color import blur_radius


# Every colour op is a pure function (image float [S, S, 3], parameter) ->
# image, and sample_color_params draws all of one view's parameters at once:
# the ops can be checked against NumPy with known parameters, and moved onto
# the device (jnp) one at a time. Ops, order and ranges follow BYOL's
# augmentations.py (the DetCon-B / Odin A.1 recipe): jitter -> grayscale ->
# blur -> solarise. SimCLR v1's data_util.py has the same ops bar solarise.

def adjust_brightness(image, delta):
  """image + delta (any shape). Additive, as BYOL / DetCon / Odin A.1 and
  SimCLR v1 (tf.image.random_brightness); SimCLR v2's code multiplies."""
  return image + delta


def adjust_contrast(image, factor):
  """mean_c + factor * (image - mean_c), mean_c per channel over [S, S]."""
  return tf.image.adjust_contrast(image, factor)


def adjust_saturation(image, factor):
  """HSV saturation * factor, clipped to [0, 1] (TF's op, BYOL's formula)."""
  return tf.image.adjust_saturation(image, factor)


def adjust_hue(image, delta):
  """HSV hue + delta, modulo 1 (delta in [-0.5, 0.5])."""
  return tf.image.adjust_hue(image, delta)


def to_grayscale(image):
  """ITU-R 601 luma (0.2989, 0.5870, 0.1140) repeated in 3 channels."""
  return tf.tile(tf.image.rgb_to_grayscale(image), [1, 1, 3])


def solarize(image, threshold: float = 0.5):
  """Values >= threshold become 1 - value (BYOL's threshold 0.5)."""
  return tf.where(image < threshold, image, 1.0 - image)


def gaussian_blur(image, sigma, size: int):
  """Separable Gaussian blur of float [S, S, 3] with ZERO padding.

  The zero padding is the references' ('SAME' depthwise conv in BYOL and
  SimCLR): pixels within blur_radius(size) of the border are darkened, as in
  the papers' training. Written as a weighted sum of shifted slices (~5x
  faster than a depthwise conv on CPU at these sizes, same values).
  Args:
    image: float [S, S, 3]; sigma: scalar std (pixels); size: S.
  Returns:
    float [S, S, 3].
  """
  radius = blur_radius(size)
  taps = 2 * radius + 1
  x = tf.range(-radius, radius + 1, dtype=tf.float32)
  kernel = tf.exp(-tf.square(x) / (2.0 * tf.square(sigma)))
  kernel /= tf.reduce_sum(kernel)
  h, w = int(image.shape[0]), int(image.shape[1])
  padded = tf.pad(image, [[radius, radius], [radius, radius], [0, 0]])
  rows = tf.add_n([kernel[i] * padded[:, i:i + w] for i in range(taps)])
  return tf.add_n([kernel[i] * rows[i:i + h] for i in range(taps)])


def sample_color_params(seed, config, view: int) -> dict:
  """Every random draw of one view's colour augmentation
  (color.params_from_draws' dict) from a stateless seed int32/int64 [2]."""
  s = _split(seed, 3)
  j = _split(s[1], 5)
  return color.params_from_draws(
      config, view, _uniform(s[0], (4,)), [_uniform(j[i]) for i in range(4)],
      _uniform(j[4], (4,)), _uniform(s[2]), tf.argsort)


def color_jitter(image, params):
  """The 4 jitter ops of float [S, S, 3] in params['order'], each clipped to
  [0, 1] (as BYOL and SimCLR do). params: sample_color_params' dict."""
  clip = lambda y: tf.clip_by_value(y, 0.0, 1.0)

  def apply(op, x):
    return tf.switch_case(op, [
        lambda: clip(adjust_brightness(x, params["brightness"])),
        lambda: clip(adjust_contrast(x, params["contrast"])),
        lambda: clip(adjust_saturation(x, params["saturation"])),
        lambda: clip(adjust_hue(x, params["hue"])),
    ])

  # One loop over the 4 steps traces the branches once (not 4 times).
  _, image = tf.while_loop(lambda i, x: i < 4,
                           lambda i, x: (i + 1, apply(params["order"][i], x)),
                           (tf.constant(0), image))
  return image


def apply_color(image, params):
  """Jitter -> grayscale -> blur -> solarise, each where params say, clipped.

  Args:
    image: float32 [S, S, 3] in [0, 1].
    params: sample_color_params' dict.
  Returns:
    float32 [S, S, 3] in [0, 1].
  """
  size = int(image.shape[0])
  image = tf.cond(params["jitter"], lambda: color_jitter(image, params),
                  lambda: image)
  image = tf.cond(params["grayscale"], lambda: to_grayscale(image),
                  lambda: image)
  image = tf.cond(params["blur"],
                  lambda: gaussian_blur(image, params["sigma"], size),
                  lambda: image)
  image = tf.cond(params["solarize"], lambda: solarize(image), lambda: image)
  return tf.clip_by_value(image, 0.0, 1.0)


def color_augment(image, seed, config, view: int):
  """One view's random colour augmentation of float32 [S, S, 3] in [0, 1]."""
  return apply_color(image, sample_color_params(seed, config, view))


def host_color_views(views: dict, seed, config) -> dict:
  """The old host path's colour step on two_views' uint8 views.

  Draws each view's parameters from the seed half that augment.one_view
  reserves for colour, as the host pipeline did, and returns float32
  views in [0, 1].
  """
  seeds = _split(tf.convert_to_tensor(seed), 2)
  out = dict(views)
  for v, name in enumerate(("view1", "view2")):
    image = tf.cast(views[name], tf.float32) / 255.0
    out[name] = color_augment(image, _split(seeds[v], 2)[1], config.augment,
                              v)
  return out
