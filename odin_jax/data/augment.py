"""Two-view geometry for one example, in TensorFlow, on the host.

The host does the geometry: the random resized crop and the flip, the same
for the image and its masks, and the resize; the views leave as uint8 and
the masks as the narrowest integer type that holds their ids. The colour
half of each recipe (BYOL's asymmetric one for DetCon-B, BYOL, Odin A.1 and
R2O; SimCLR's symmetric one for DetCon-S and SimCLR) runs inside the jitted
step on the accelerator: data/color.py, which also says how its randomness
follows each example's stream position.

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
  transport the view rounded to uint8; the masks cast by narrow_masks.

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


# --- Transport ---------------------------------------------------------------
# Views cross to the device as uint8 and masks as the narrowest unsigned type
# that holds their ids; the colour augmentation runs there (data/color.py).

def to_uint8(image):
  """float image in [0, 1] (any shape) -> uint8, rounded to nearest."""
  return tf.cast(tf.round(tf.clip_by_value(image, 0.0, 1.0) * 255.0),
                 tf.uint8)


def mask_dtype(config) -> tf.DType:
  """uint8 where the mask method bounds the ids below 256 (grids of up to
  16 x 16 cells), else uint16. Full config or its masks sub-config."""
  m = config.masks if "masks" in config else config
  if m.method == "grid" and int(m.grid_size) ** 2 <= 256:
    return tf.uint8
  return tf.uint16


def narrow_masks(views: dict, config, keys=("mask1", "mask2", "span_mask")
                 ) -> dict:
  """views with its segment maps cast to mask_dtype(config), ids kept.

  Ids are the source's segment ids (FH / SLIC labels, instance ids), which
  are far below 2^16 in practice. An example whose largest id does not fit
  is relabelled 0, 1, ... in order of first appearance, jointly over its
  maps, so equal ids stay equal across views (which is all the step reads
  from them), never wrapping. Hierarchy leaf ids index the example's tree
  distances and are never relabelled (they are < masks.hier_max_leaves).
  """
  present = [k for k in keys if k in views]
  if not present:
    return views
  dtype = mask_dtype(config)
  limit = dtype.max
  maps = [tf.cast(views[k], tf.int32) for k in present]
  flat = tf.concat([tf.reshape(m, [-1]) for m in maps], 0)

  def relabel():
    _, dense = tf.unique(flat)
    sizes = [tf.size(m) for m in maps]
    return [tf.reshape(d, tf.shape(m))
            for d, m in zip(tf.split(dense, sizes), maps)]

  if "hierarchy" not in views:
    maps = tf.cond(tf.reduce_max(flat) > limit, relabel, lambda: maps)
  out = dict(views)
  for k, m in zip(present, maps):
    out[k] = tf.cast(m, dtype)
  return out


def one_view(image, segments, seed, config):
  """One view's geometry: the same crop, resize and flip of image and mask.

  Returns uint8 [S, S, 3] and int32 [S, S] (S = image_size). The seed's
  second half was the host's colour draw before that moved to the device
  (data/color.py); the split is kept so the geometry of every seed, and so
  every view's crop, is unchanged.
  """
  size = int(config.image_size)
  s = _split(seed, 2)
  shape = tf.shape(image)
  box, flip = sample_geometry(s[0], shape[0], shape[1], config.augment)
  out, mask = crop_resize_flip(image, segments, box, flip, size)
  out.set_shape([size, size, 3])
  mask.set_shape([size, size])
  return to_uint8(out), mask


def two_views(image, segments, seed, config):
  """Two independently augmented views of one example.

  Args:
    image: uint8 [H, W, 3].
    segments: int32 [H, W] segment ids (>= 0) aligned with image.
    seed: int32/int64 [2] stateless seed; output is a pure function of it.
    config: full config (image_size, augment.*).
  Returns:
    dict view1, view2: uint8 [S, S, 3], before colour augmentation (the
    step applies it: data/color.py); mask1, mask2: int32 [S, S], the
    source segment ids carried through each view's geometry.
  """
  seeds = _split(tf.convert_to_tensor(seed), 2)
  view1, mask1 = one_view(image, segments, seeds[0], config)
  view2, mask2 = one_view(image, segments, seeds[1], config)
  return {"view1": view1, "view2": view2, "mask1": mask1, "mask2": mask2}
