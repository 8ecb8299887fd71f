"""Odin's spanning view: the smallest crop covering both augmented views.

Odin (Hénaff et al. 2022, §3.1 and Appendix A) runs its object-discovery
network on a "spanning view" v0: the smallest box of the source image that
contains the crop boxes of both augmented views, cut from the UN-augmented
image (no colour transform, no flip) and resized to P x P (the method's
SpanView.size: 448 for 224 px views, i.e. odin.span_scale 2 x image_size). k-means on the discovery
network's feature grid segments v0; each view's masks are then obtained on
device by cropping that segment map to the view's box (expressed relative to
the spanning box), flipping it when the view was flipped and resizing it with
nearest neighbour (odin_jax.span_mapping.map_segments).

R2O instead clusters the whole un-augmented image (its "raw" view, resized
to 224 x 224 whatever its aspect): with r2o.cluster_view 'image' the span
box is the whole image, and the same contract (span, relative boxes,
flips) carries it (SpanView.whole_image, methods/r2o.py).

Everything here is TensorFlow in graph mode, for use inside a tf.data map.

Coordinates. Boxes in image pixels are (y0, x0, h, w) int32, covering rows
[y0, y0 + h) and columns [x0, x0 + w), exactly as augment.sample_crop_box
returns them. Relative boxes are float32 (y0, x0, y1, x1) in the spanning
view's normalised frame: 0 is the spanning box's top/left EDGE and 1 its
bottom/right edge (pixel edges, not pixel centres), so pixel row r of the
image lies in [(r - Y0) / H, (r + 1 - Y0) / H) for a spanning box (Y0, ., H, .).
"""

from __future__ import annotations

import tensorflow as tf

from odin_jax.data import augment


def spanning_box(box1, box2):
  """Smallest box covering two boxes.

  Args:
    box1, box2: (y0, x0, h, w), each an int32 scalar tensor (or int).
  Returns:
    (y0, x0, h, w) int32 scalars: y0 = min of the tops, y0 + h = max of the
    bottoms (same for x); it contains both boxes and no smaller box does.
  """
  a = [tf.cast(v, tf.int32) for v in box1]
  b = [tf.cast(v, tf.int32) for v in box2]
  y0 = tf.minimum(a[0], b[0])
  x0 = tf.minimum(a[1], b[1])
  y1 = tf.maximum(a[0] + a[2], b[0] + b[2])
  x1 = tf.maximum(a[1] + a[3], b[1] + b[3])
  return y0, x0, y1 - y0, x1 - x0


def spanning_view(image, box, size: int):
  """Crops box from the un-augmented image and resizes it to size x size.

  No flip and no colour transform: the discovery network sees the image as
  it is. Resampling is the same as the views' (bicubic, half-pixel centres,
  clipped), so the spanning view and the views sample one continuous image.

  Args:
    image: uint8 [H, W, 3] (scaled by 1/255) or float [H, W, 3] in [0, 1].
    box: (y0, x0, h, w) int32 scalars inside the image, e.g. spanning_box.
    size: output side (python int), e.g. 448.
  Returns:
    uint8 [size, size, 3] (the step scales it to [0, 1]: data/color.py).
  """
  span = augment.crop_resize_image(image, box, size)
  span.set_shape([size, size, 3])
  return augment.to_uint8(span)


def relative_box(view_box, span_box):
  """A view's box in the spanning view's normalised frame.

  Args:
    view_box: (y0, x0, h, w) int32 scalars, the view's crop in image pixels.
    span_box: (y0, x0, h, w) int32 scalars, a box containing view_box.
  Returns:
    float32 [4] = (y0, x0, y1, x1), pixel edges mapped to [0, 1] (see the
    module docstring); (0, 0, 1, 1) when the view box is the spanning box.
  """
  vy, vx, vh, vw = [tf.cast(v, tf.float32) for v in view_box]
  sy, sx, sh, sw = [tf.cast(v, tf.float32) for v in span_box]
  return tf.stack([(vy - sy) / sh, (vx - sx) / sw,
                   (vy + vh - sy) / sh, (vx + vw - sx) / sw])


def view_geometry(seed, height, width, config):
  """The crop boxes and flips that augment.two_views draws for this seed.

  Mirrors the seed tree of augment.two_views / augment.one_view:
  seed -> split 2 (one per view) -> split 2 (geometry, colour) -> geometry
  seed -> augment.sample_geometry. tests/methods/test_spanning.py checks that the
  boxes and flips returned here reproduce two_views' masks exactly, so a
  change to augment's seed tree cannot go unnoticed.

  Args:
    seed: int32/int64 [2] stateless seed, as given to two_views.
    height, width: scalar ints, the source image size.
    config: full config (augment.*).
  Returns:
    ((box1, flip1), (box2, flip2)), boxes (y0, x0, h, w) int32 scalars,
    flips bool scalars.
  """
  view_seeds = tf.random.experimental.stateless_split(
      tf.convert_to_tensor(seed), num=2)
  out = []
  for v in range(2):
    geometry_seed = tf.random.experimental.stateless_split(
        view_seeds[v], num=2)[0]
    out.append(augment.sample_geometry(geometry_seed, height, width,
                                       config.augment))
  return tuple(out)


def two_views_with_span(image, segments, seed, config, span):
  """augment.two_views plus Odin's spanning view and each view's geometry.

  With span.whole_image (R2O) the 'span' is the whole image (box (0, 0, H,
  W), squashed to P x P whatever its aspect, as R2O's raw view) and the
  boxes are relative to it; otherwise the spanning view.

  Args:
    image: uint8 [H, W, 3].
    segments: int32 [H, W] segment ids aligned with image.
    seed: int32/int64 [2] stateless seed; same seed, same views as two_views.
    config: full config (image_size, augment.*).
    span: the method's methods.base.SpanView (side P, whole image or not,
      with the segments or not).
  Returns:
    dict with, for S = image_size and P = span.size:
      view1, view2  uint8 [S, S, 3]    bit-identical to augment.two_views;
      mask1, mask2  int32 [S, S]       bit-identical to augment.two_views;
      span          uint8 [P, P, 3]    spanning view (or whole image), no
                                       colour augmentation, never flipped;
      box1, box2    float32 [4]        view boxes (y0, x0, y1, x1) relative
                                       to the span (spanning view or whole
                                       image), in [0, 1];
      flip1, flip2  bool []            whether each view was mirrored;
      span_mask     int32 [P, P]       (span.with_segments only) the source
                                       segments on the span.
  """
  out = augment.two_views(image, segments, seed, config)
  shape = tf.shape(image)
  (box1, flip1), (box2, flip2) = view_geometry(seed, shape[0], shape[1],
                                               config)
  if span.whole_image:
    span_box = (tf.constant(0), tf.constant(0), shape[0], shape[1])
  else:
    span_box = spanning_box(box1, box2)
  size = span.size
  out["span"] = spanning_view(image, span_box, size)
  if span.with_segments:
    # R2O clusters the source segments (superpixels) of the span box.
    y0, x0, h, w = span_box
    seg = tf.slice(tf.cast(segments, tf.int32), tf.stack([y0, x0]),
                   tf.stack([h, w]))
    out["span_mask"] = tf.image.resize(seg[..., None], [size, size],
                                       method="nearest")[..., 0]
  out["box1"] = relative_box(box1, span_box)
  out["box2"] = relative_box(box2, span_box)
  out["flip1"] = flip1
  out["flip2"] = flip2
  return out
