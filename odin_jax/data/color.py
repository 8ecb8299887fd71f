"""Colour augmentation on the device, inside the jitted train step (jnp).

The host (data/augment.py) does the geometry only: decode, random resized
crop, flip and resize, the same box and flip for the image and its masks,
and ships each view as uint8. The step then calls `prepare(batch, key,
config)`, which turns the uint8 views into float32 in [0, 1] and applies the
colour recipe per example, as DeepMind's BYOL and DetCon do on the
accelerator (their augmentations.postprocess). The host's work per view
drops to a crop and a resize, and the colour ops run on the chip, sharded
with the batch, at well under 1 % of a ResNet-50 step's FLOPs
(bench/step_time.py --augmentation_share).

Randomness. View v (0, 1) of the example at global stream position p draws
every parameter from

    key(p, v) = fold_in(fold_in(color_key, p), v)

where color_key is the step's own key (step.step_keys(...)['color']). p is
the example's position in the whole run's stream (pipeline.py 'index'), so
the draw does not depend on the batch's sharding (1 device = N devices) and
a resumed run redraws exactly what the uninterrupted one drew.

Ops, order, ranges and probabilities follow BYOL's augmentations.py (the
DetCon-B / Odin A.1 / R2O recipe; SimCLR v1's for DetCon-S and SimCLR, from
config.augment): colour jitter (additive brightness, contrast, saturation,
hue, in a random order, each clipped to [0, 1]) with probability p_jitter,
grayscale, Gaussian blur (zero padding, a kernel of ~S/10), solarisation.
Each op is a pure function of (image float [S, S, 3], parameter), checked
against NumPy/scikit-image in tests/unit/test_color.py.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

# ITU-R 601 luma, as tf.image.rgb_to_grayscale.
_LUMA = (0.2989, 0.5870, 0.1140)
# Segment maps prepare() widens to int32 (they cross as uint8 / uint16).
MASK_KEYS = ("mask1", "mask2", "span_mask")


def _aug(config):
  """The augment sub-config of a full config, or the config itself."""
  return config.augment if "augment" in config else config


# --- The ops: float [S, S, 3] in [0, 1] (or any [..., 3]) -> same ----------

def adjust_brightness(image, delta):
  """image + delta. Additive, as BYOL / DetCon / Odin A.1 and SimCLR v1."""
  return image + delta


def adjust_contrast(image, factor):
  """mean_c + factor * (image - mean_c), mean_c per channel over [S, S]."""
  mean = jnp.mean(image, axis=(-3, -2), keepdims=True)
  return mean + factor * (image - mean)


def rgb_to_hsv(rgb):
  """[..., 3] RGB in [0, 1] -> HSV in [0, 1] (hue in turns; 0 where gray)."""
  v = jnp.max(rgb, axis=-1, keepdims=True)
  delta = v - jnp.min(rgb, axis=-1, keepdims=True)
  s = jnp.where(v > 0, delta / jnp.where(v > 0, v, 1.0), 0.0)
  return jnp.concatenate([_hue(rgb, v, delta), s, v], axis=-1)


def hsv_to_rgb(hsv):
  """[..., 3] HSV in [0, 1] -> RGB: channel n of (r, g, b) = v - v s
  clip(min(k, 4 - k), 0, 1), k = (n + 6 h) mod 6, n = 5, 3, 1."""
  h, s, v = hsv[..., 0:1], hsv[..., 1:2], hsv[..., 2:3]
  k = jnp.mod(jnp.array([5.0, 3.0, 1.0]) + 6.0 * h, 6.0)
  return v - v * s * jnp.clip(jnp.minimum(k, 4.0 - k), 0.0, 1.0)


def adjust_saturation(image, factor):
  """HSV saturation × factor, clipped to [0, 1] (BYOL's, via TF's op).

  Without the HSV round trip: each channel is v - v s g(h) (hsv_to_rgb), so
  scaling s to min(s f, 1) scales every channel's distance to v = max by
  min(f, v / (v - min)), and hue and value stay. Same values, a third of
  the work (the step evaluates every jitter op for every view: color_jitter).
  """
  v = jnp.max(image, axis=-1, keepdims=True)
  delta = v - jnp.min(image, axis=-1, keepdims=True)
  scale = jnp.minimum(factor, v / jnp.where(delta > 0, delta, 1.0))
  return jnp.where(delta > 0, v - scale * (v - image), image)


def _hue(image, v, delta):
  """HSV hue in turns of [..., 3] RGB, given v = max and delta = max - min
  ([..., 1] each); 0 where gray."""
  r, g, b = image[..., 0:1], image[..., 1:2], image[..., 2:3]
  safe = jnp.where(delta > 0, delta, 1.0)
  h = jnp.where(v == r, (g - b) / safe,
                jnp.where(v == g, 2.0 + (b - r) / safe, 4.0 + (r - g) / safe))
  return jnp.where(delta > 0, jnp.mod(h / 6.0, 1.0), 0.0)


def adjust_hue(image, delta):
  """HSV hue + delta, modulo 1 (delta in [-0.5, 0.5]).

  Saturation and value stay, so the result is hsv_to_rgb's formula with
  v s = max - min: channel n = v - (v - min) clip(min(k, 4 - k), 0, 1),
  k = (n + 6 (h + delta)) mod 6; no division by v, no HSV array.
  """
  v = jnp.max(image, axis=-1, keepdims=True)
  spread = v - jnp.min(image, axis=-1, keepdims=True)
  h = jnp.mod(_hue(image, v, spread) + delta, 1.0)
  k = jnp.mod(jnp.array([5.0, 3.0, 1.0]) + 6.0 * h, 6.0)
  return v - spread * jnp.clip(jnp.minimum(k, 4.0 - k), 0.0, 1.0)


def to_grayscale(image):
  """ITU-R 601 luma (0.2989, 0.5870, 0.1140) repeated in 3 channels."""
  gray = image @ jnp.asarray(_LUMA, image.dtype)
  return jnp.repeat(gray[..., None], 3, axis=-1)


def solarize(image, threshold: float = 0.5):
  """Values >= threshold become 1 - value (BYOL's threshold 0.5)."""
  return jnp.where(image < threshold, image, 1.0 - image)


def blur_radius(size: int) -> int:
  """Half-width of the blur kernel for views of side `size`.

  BYOL and SimCLR use a kernel of ~10 % of the view, int(size / 10 / 2) taps
  each side: 23 taps at 224 px, 9 at 80-96 px. At least 1.
  """
  return max(1, int(size / 20))


def gaussian_blur(image, sigma):
  """Separable Gaussian blur of float [S, S, 3] with ZERO padding.

  The zero padding is the references' ('SAME' depthwise conv in BYOL and
  SimCLR): pixels within blur_radius(S) of the border darken, as in the
  papers' training. A weighted sum of shifted slices, which XLA fuses.
  Args:
    image: float [S, S, 3]; sigma: scalar std in pixels.
  Returns:
    float [S, S, 3].
  """
  h, w = image.shape[0], image.shape[1]
  radius = blur_radius(h)
  x = jnp.arange(-radius, radius + 1, dtype=jnp.float32)
  kernel = jnp.exp(-jnp.square(x) / (2.0 * jnp.square(sigma)))
  kernel = (kernel / jnp.sum(kernel)).astype(image.dtype)
  padded = jnp.pad(image, ((radius, radius), (radius, radius), (0, 0)))
  taps = range(2 * radius + 1)
  rows = sum(kernel[i] * padded[:, i:i + w] for i in taps)
  return sum(kernel[i] * rows[i:i + h] for i in taps)


# --- Parameters and the recipe ----------------------------------------------

def params_from_draws(config, view: int, apply_u, jitter_u, order_u, sigma_u,
                      argsort) -> dict:
  """One view's colour parameters from uniform [0, 1) draws: the recipe's
  probabilities and ranges in one place, for jnp (sample_params) and for
  TensorFlow (host_color.sample_color_params) alike.

  Args:
    config: full config or its augment sub-config.
    view: 0 or 1, selects blur_prob[view] and solarize_prob[view].
    apply_u: [4] draws deciding jitter, grayscale, blur, solarise.
    jitter_u: 4 scalar draws for brightness, contrast, saturation, hue.
    order_u: [4] draws whose argsort orders the jitter ops.
    sigma_u: scalar draw of the blur's std.
    argsort: jnp.argsort or tf.argsort.
  Returns:
    dict of scalars: jitter, grayscale, blur, solarize (bool: apply the op);
    brightness (additive delta ~ U[-b, b]), contrast and saturation
    (factors ~ U[max(0, 1 - c), 1 + c]), hue (delta ~ U[-h, h]), order
    (int32 [4], a uniform permutation of the jitter ops brightness,
    contrast, saturation, hue = 0..3), sigma (blur std ~ U[min, max]).
  """
  a = _aug(config)
  span = lambda u, lo, hi: u * (hi - lo) + lo
  factor = lambda u, m: span(u, max(0.0, 1.0 - m), 1.0 + m)
  return {
      "jitter": apply_u[0] < a.color_jitter_prob,
      "grayscale": apply_u[1] < a.grayscale_prob,
      "blur": apply_u[2] < float(a.blur_prob[view]),
      "solarize": apply_u[3] < float(a.solarize_prob[view]),
      "brightness": span(jitter_u[0], -a.brightness, a.brightness),
      "contrast": factor(jitter_u[1], a.contrast),
      "saturation": factor(jitter_u[2], a.saturation),
      "hue": span(jitter_u[3], -a.hue, a.hue),
      "order": argsort(order_u),
      "sigma": span(sigma_u, a.blur_sigma_min, a.blur_sigma_max),
  }


def sample_params(key, config, view: int) -> dict:
  """Every random draw of one view's colour augmentation (params_from_draws'
  dict), from a PRNG key (key(p, v) of the module docstring)."""
  k_apply, k_jitter, k_sigma = jax.random.split(key, 3)
  j = jax.random.split(k_jitter, 5)
  params = params_from_draws(
      config, view, jax.random.uniform(k_apply, (4,)),
      [jax.random.uniform(k) for k in j[:4]], jax.random.uniform(j[4], (4,)),
      jax.random.uniform(k_sigma), jnp.argsort)
  params["order"] = params["order"].astype(jnp.int32)
  return params


def color_jitter(image, params):
  """The 4 jitter ops of float [S, S, 3] in params['order'], each clipped to
  [0, 1] (as BYOL and SimCLR do). params: sample_params' dict."""
  # Under vmap (one draw per example) lax.switch computes every branch and
  # selects: 4 steps x 4 ops per view, which is why the ops avoid needless
  # colour-space round trips.
  ops = (lambda x: adjust_brightness(x, params["brightness"]),
         lambda x: adjust_contrast(x, params["contrast"]),
         lambda x: adjust_saturation(x, params["saturation"]),
         lambda x: adjust_hue(x, params["hue"]))

  def body(i, x):
    return jnp.clip(jax.lax.switch(params["order"][i], ops, x), 0.0, 1.0)

  return jax.lax.fori_loop(0, 4, body, image)


def apply_color(image, params):
  """Jitter -> grayscale -> blur -> solarise, each where params say, clipped.

  Args:
    image: float32 [S, S, 3] in [0, 1].
    params: sample_params' dict (scalars).
  Returns:
    float32 [S, S, 3] in [0, 1].
  """
  image = jnp.where(params["jitter"], color_jitter(image, params), image)
  image = jnp.where(params["grayscale"], to_grayscale(image), image)
  image = jnp.where(params["blur"], gaussian_blur(image, params["sigma"]),
                    image)
  image = jnp.where(params["solarize"], solarize(image), image)
  return jnp.clip(image, 0.0, 1.0)


def view_key(color_key, position, view: int):
  """key(p, v) = fold_in(fold_in(color_key, p), v) (module docstring)."""
  return jax.random.fold_in(jax.random.fold_in(color_key, position), view)


def augment_views(views, positions, color_key, config, view: int):
  """Colour-augments a batch of one view.

  Args:
    views: uint8 [B, S, S, 3] (geometry done on the host).
    positions: int [B] global stream positions p.
    color_key: the step's colour key.
    config: full config or its augment sub-config.
    view: 0 or 1.
  Returns:
    float32 [B, S, S, 3] in [0, 1].
  """
  def one(image, p):
    params = sample_params(view_key(color_key, p, view), config, view)
    return apply_color(to_float(image), params)
  return jax.vmap(one)(views, positions)


def to_float(image):
  """uint8 image (any shape) -> float32 in [0, 1]."""
  if image.dtype != jnp.uint8:
    raise TypeError(f"Expected a uint8 image from the input pipeline, got "
                    f"{image.dtype}: views and spanning views cross to the "
                    "device as uint8 (data/color.py).")
  return image.astype(jnp.float32) / 255.0


def prepare(batch: dict, color_key, config) -> dict:
  """The pipeline's batch as the step's networks read it.

  view1, view2: uint8 [B, S, S, 3] -> colour-augmented float32 in [0, 1]
  (view v with config.augment's view-v probabilities); span (Odin/R2O's
  spanning view, never colour-augmented): uint8 -> float32 in [0, 1];
  mask1, mask2, span_mask: any integer type -> int32. 'index' (int [B], the
  stream positions) is read and dropped; every other entry passes through.
  """
  out = {k: v for k, v in batch.items() if k != "index"}
  for v, name in enumerate(("view1", "view2")):
    out[name] = augment_views(batch[name], batch["index"], color_key, config,
                              v)
  if "span" in batch:
    out["span"] = to_float(batch["span"])
  for name in MASK_KEYS:
    if name in batch:
      out[name] = batch[name].astype(jnp.int32)
  return out
