"""Two-view augmentation for one example, in TensorFlow.

The recipe is the config's: BYOL's asymmetric one by default (DetCon-B, BYOL,
Odin A.1, R2O), SimCLR's symmetric one for DetCon-S and SimCLR
(configs/common.py: simclr_augmentation).

Everything runs in TF graph mode inside tf.data and ALL randomness comes from
stateless ops keyed by an explicit seed (int32/int64 tensor of shape [2]), so
`two_views(image, segments, seed, config)` is a pure function of its inputs:
the same (image, segments, seed) always gives bit-identical views. That is
what makes a resumed input pipeline exact.

Per view (each view draws its own randomness):
  geometry  random resized crop (torchvision-style box) + horizontal flip,
            applied with the SAME box and flip to the image (bicubic, clipped
            to [0, 1]) and to its segment map (nearest: ids are never
            interpolated, so output ids are a subset of input ids);
  colour    (image only) colour jitter (additive brightness, contrast,
            saturation, hue in random order) with prob p, grayscale, Gaussian
            blur (zero padding), solarisation: sample_color_params draws the
            parameters, apply_color applies them (pure ops, one per function).

`config` may be the full experiment ConfigDict (reads config.image_size and
config.augment.*) or, for the helpers that do not need the view size, the
`augment` sub-config itself.
"""

from __future__ import annotations

import math

import tensorflow as tf

_NUM_CROP_ATTEMPTS = 10


def _aug(config):
  """The augment sub-config of a full config, or the config itself."""
  return config.augment if "augment" in config else config


def _split(seed, num: int):
  """num independent stateless seeds [num, 2] derived from seed [2]."""
  return tf.random.experimental.stateless_split(seed, num=num)


def _uniform(seed, shape=(), minval=0.0, maxval=1.0):
  return tf.random.stateless_uniform(shape, seed=seed, minval=minval,
                                     maxval=maxval, dtype=tf.float32)


def sample_crop_box(seed, height, width, config):
  """Random-resized-crop box of an image [height, width], torchvision-style.

  Up to 10 attempts, all drawn at once: area fraction ~ U[area_min, area_max],
  aspect (w / h) log-uniform in [aspect_min, aspect_max]; the first attempt
  that fits inside the image wins, otherwise a central crop with the aspect
  clamped into range is used.

  Args:
    seed: int32/int64 [2] stateless seed.
    height, width: scalar int tensors (or ints), the image size.
    config: full config or its augment sub-config.
  Returns:
    (y0, x0, h, w): int32 scalars, 0 <= y0, y0 + h <= height (same for x).
  """
  a = _aug(config)
  height = tf.cast(height, tf.int32)
  width = tf.cast(width, tf.int32)
  hf, wf = tf.cast(height, tf.float32), tf.cast(width, tf.float32)
  s = _split(seed, 4)
  n = (_NUM_CROP_ATTEMPTS,)
  target_area = hf * wf * _uniform(s[0], n, a.crop_area_min, a.crop_area_max)
  ratio = tf.exp(_uniform(s[1], n, math.log(a.aspect_min),
                          math.log(a.aspect_max)))
  w = tf.cast(tf.round(tf.sqrt(target_area * ratio)), tf.int32)
  h = tf.cast(tf.round(tf.sqrt(target_area / ratio)), tf.int32)
  fits = (w > 0) & (h > 0) & (w <= width) & (h <= height)
  # Top-left corner uniform over the integer positions that keep the box in.
  y0 = tf.cast(tf.floor(_uniform(s[2], n) * tf.cast(height - h + 1,
                                                    tf.float32)), tf.int32)
  x0 = tf.cast(tf.floor(_uniform(s[3], n) * tf.cast(width - w + 1,
                                                    tf.float32)), tf.int32)
  y0 = tf.clip_by_value(y0, 0, tf.maximum(height - h, 0))
  x0 = tf.clip_by_value(x0, 0, tf.maximum(width - w, 0))
  first = tf.argmax(tf.cast(fits, tf.int32), output_type=tf.int32)

  # Fallback: central crop of the whole image, aspect clamped into range.
  in_ratio = wf / hf
  fb_w = tf.where(in_ratio > a.aspect_max,
                  tf.cast(tf.round(hf * a.aspect_max), tf.int32), width)
  fb_h = tf.where(in_ratio < a.aspect_min,
                  tf.cast(tf.round(wf / a.aspect_min), tf.int32), height)
  fb_w = tf.clip_by_value(fb_w, 1, width)
  fb_h = tf.clip_by_value(fb_h, 1, height)
  any_fit = tf.reduce_any(fits)
  return (tf.where(any_fit, y0[first], (height - fb_h) // 2),
          tf.where(any_fit, x0[first], (width - fb_w) // 2),
          tf.where(any_fit, h[first], fb_h),
          tf.where(any_fit, w[first], fb_w))


def sample_geometry(seed, height, width, config):
  """(box, flip) of one view: sample_crop_box and a flip with p=flip_prob."""
  s = _split(seed, 2)
  box = sample_crop_box(s[0], height, width, config)
  flip = _uniform(s[1]) < _aug(config).flip_prob
  return box, flip


def crop_resize_image(image, box, size: int):
  """image cropped to box (y0, x0, h, w) and resized bicubic to [S, S, 3].

  uint8 input is scaled by 1/255; the output is float32 clipped to [0, 1].
  """
  y0, x0, h, w = [tf.cast(v, tf.int32) for v in box]
  crop = tf.slice(image, tf.stack([y0, x0, 0]), tf.stack([h, w, 3]))
  if crop.dtype == tf.uint8:
    crop = tf.cast(crop, tf.float32) / 255.0
  else:
    crop = tf.cast(crop, tf.float32)
  out = tf.image.resize(crop, [size, size], method="bicubic")
  return tf.clip_by_value(out, 0.0, 1.0)


def crop_resize_flip(image, segments, box, flip, size: int):
  """Crops image and segments to box, resizes to size x size, maybe flips.

  Args:
    image: uint8 [H, W, 3] (scaled by 1/255) or float [H, W, 3] in [0, 1].
    segments: int [H, W] segment ids.
    box: (y0, x0, h, w) int32 scalars, e.g. from sample_crop_box.
    flip: bool scalar; True mirrors both outputs left-right.
    size: output side S (python int).
  Returns:
    view float32 [S, S, 3] in [0, 1] (bicubic, clipped), mask int32 [S, S]
    (nearest neighbour, same half-pixel sampling grid as the image).
  """
  y0, x0, h, w = box
  view = crop_resize_image(image, box, size)
  seg = tf.slice(tf.cast(segments, tf.int32), tf.stack([y0, x0]),
                 tf.stack([h, w]))
  mask = tf.image.resize(seg[..., None], [size, size], method="nearest")[..., 0]
  view, mask = tf.cond(flip,
                       lambda: (tf.reverse(view, [1]), tf.reverse(mask, [1])),
                       lambda: (view, mask))
  return view, mask


# --- Colour ----------------------------------------------------------------
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


def blur_radius(size: int) -> int:
  """Half-width of the blur kernel for views of side `size`.

  BYOL and SimCLR use a kernel of ~10% of the view, int(size / 10 / 2) taps
  each side: 23 taps at 224 px, 9 at 80-96 px. At least 1, so views under
  20 px (never trained on) still get a 3-tap kernel.
  """
  return max(1, int(size / 20))


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
  """Every random draw of one view's colour augmentation.

  Args:
    seed: int32/int64 [2] stateless seed.
    config: full config or its augment sub-config.
    view: 0 or 1, selects blur_prob[view] and solarize_prob[view].
  Returns:
    dict of scalars: jitter, grayscale, blur, solarize (bool: apply the op);
    brightness (additive delta ~ U[-b, b]), contrast and saturation
    (factors ~ U[max(0, 1 - c), 1 + c]), hue (delta ~ U[-h, h]), order
    (int32 [4], a uniform permutation of the jitter ops brightness,
    contrast, saturation, hue = 0..3), sigma (blur std ~ U[min, max]).
  """
  a = _aug(config)
  s = _split(seed, 3)
  u = _uniform(s[0], (4,))     # apply: jitter, grayscale, blur, solarise
  j = _split(s[1], 5)
  factor = lambda k, m: _uniform(k, (), max(0.0, 1.0 - m), 1.0 + m)
  return {
      "jitter": u[0] < a.color_jitter_prob,
      "grayscale": u[1] < a.grayscale_prob,
      "blur": u[2] < float(a.blur_prob[view]),
      "solarize": u[3] < float(a.solarize_prob[view]),
      "brightness": _uniform(j[0], (), -a.brightness, a.brightness),
      "contrast": factor(j[1], a.contrast),
      "saturation": factor(j[2], a.saturation),
      "hue": _uniform(j[3], (), -a.hue, a.hue),
      "order": tf.argsort(_uniform(j[4], (4,))),   # int32
      "sigma": _uniform(s[2], (), a.blur_sigma_min, a.blur_sigma_max),
  }


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


def one_view(image, segments, seed, config, view: int):
  """One augmented view: geometry on image + mask, colour on the image.

  view (0 or 1) selects blur_prob[view] and solarize_prob[view].
  Returns float32 [S, S, 3] in [0, 1] and int32 [S, S] (S = image_size).
  """
  a = config.augment
  size = int(config.image_size)
  s = _split(seed, 2)
  shape = tf.shape(image)
  box, flip = sample_geometry(s[0], shape[0], shape[1], a)
  out, mask = crop_resize_flip(image, segments, box, flip, size)
  out.set_shape([size, size, 3])
  out = color_augment(out, s[1], a, view)
  mask.set_shape([size, size])
  return out, mask


def two_views(image, segments, seed, config):
  """Two independently augmented views of one example.

  Args:
    image: uint8 [H, W, 3].
    segments: int32 [H, W] segment ids (>= 0) aligned with image.
    seed: int32/int64 [2] stateless seed; output is a pure function of it.
    config: full config (image_size, augment.*).
  Returns:
    dict view1, view2: float32 [S, S, 3] in [0, 1]; mask1, mask2: int32
    [S, S], the source segment ids carried through each view's geometry.
  """
  seeds = _split(tf.convert_to_tensor(seed), 2)
  view1, mask1 = one_view(image, segments, seeds[0], config, 0)
  view2, mask2 = one_view(image, segments, seeds[1], config, 1)
  return {"view1": view1, "view2": view2, "mask1": mask1, "mask2": mask2}
