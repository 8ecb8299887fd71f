"""Tests of Odin's spanning view (data.spanning) and mask mapping (discovery.mapping).

The key property: a segment map known on the spanning view, cropped, flipped
and resized into each view by map_segments, lands on the same image content
as the view's own crop of the true segments; ignoring the flip must not.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow as tf
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from configs import detcon_b
from configs import odin as odin_config
from odin_jax import methods, objects
from odin_jax.methods.base import SpanView
from odin_jax.data import augment, spanning
from odin_jax import span_mapping as mapping

H, W = 96, 80          # non-square source image
S = 64                 # view size; spanning view 2S = 128
NUM_SEEDS = 24


def _config():
  """The test preset at S px, with the full (colour) augmentation: the
  spanning view never sees colour transforms, so the alignment checks do not
  need them turned off, and two_views' colour draws must still match."""
  c = detcon_b.get_config("test")
  c.image_size = S
  return c


def _palette():
  """64 colours {0, 85, 170, 255}^3 in a fixed shuffled order, uint8 [64, 3]."""
  levels = np.array([0, 85, 170, 255], np.uint8)
  grid = np.stack(np.meshgrid(levels, levels, levels, indexing="ij"), -1)
  return np.random.RandomState(3).permutation(grid.reshape(-1, 3))


def _scene():
  """Piecewise-constant blocks (~20 px) with staircase edges; colour = id.

  Returns uint8 [H, W, 3] and int32 [H, W] ids in [1, 64); no symmetry, so a
  mirrored map disagrees with the true one.
  """
  yy, xx = np.mgrid[:H, :W]
  row = (yy + xx // 6) // 22
  col = (xx + yy // 8) // 18
  seg = (row * 8 + col + 1).astype(np.int32)
  assert seg.max() < 64
  return _palette()[seg], seg


def _decode(colours):
  """Id of the nearest palette colour, float [..., 3] in [0, 1] -> int32."""
  pal = _palette().astype(np.float32) / 255.0
  if colours.dtype == np.uint8:   # views and spans cross to the device so
    colours = colours.astype(np.float32) / 255.0
  d = ((colours[..., None, :] - pal) ** 2).sum(-1)
  return d.argmin(-1).astype(np.int32)


def _seed(i):
  return tf.constant([i, 2024], tf.int64)


@tf.function
def _geometry(seed):
  """Both views' pixel boxes [2, 4], flips [2] and the spanning box [4]."""
  (b1, f1), (b2, f2) = spanning.view_geometry(seed, H, W, _config())
  return tf.stack([tf.stack(b1), tf.stack(b2)]), tf.stack([f1, f2]), tf.stack(
      spanning.spanning_box(b1, b2))


_DUMMY_IMAGE = tf.zeros((H, W, 3), tf.uint8)


@tf.function
def _crop_fn(seg, box, flip, size):
  return augment.crop_resize_flip(_DUMMY_IMAGE, seg, tuple(tf.unstack(box)),
                                  flip, size)[1]


def _crop_ids(seg, box, flip, size):
  """Reference: the true ids cropped/flipped/resized like the views' masks."""
  return _crop_fn(tf.constant(seg, tf.int32), tf.constant(box, tf.int32),
                  tf.constant(bool(flip)), size).numpy()


@tf.function
def _crop_rect_fn(seg, box, flip, out_hw):
  """crop_resize_flip's mask path for a non-square output grid."""
  y0, x0, h, w = tf.unstack(box)
  crop = tf.slice(seg, tf.stack([y0, x0]), tf.stack([h, w]))
  out = tf.image.resize(crop[..., None], out_hw, method="nearest")[..., 0]
  return tf.cond(flip, lambda: tf.reverse(out, [1]), lambda: out)


def test_spanning_box_covers_both_and_is_minimal():
  rng = np.random.RandomState(0)
  for _ in range(50):
    boxes = []
    for _ in range(2):
      h, w = rng.randint(1, H + 1), rng.randint(1, W + 1)
      boxes.append((rng.randint(0, H - h + 1), rng.randint(0, W - w + 1), h,
                    w))
    y0, x0, h, w = (int(v) for v in spanning.spanning_box(*boxes))
    for by, bx, bh, bw in boxes:   # covers
      assert y0 <= by and x0 <= bx and by + bh <= y0 + h and bx + bw <= x0 + w
    # minimal: every edge is an edge of one of the boxes
    assert y0 == min(b[0] for b in boxes) and x0 == min(b[1] for b in boxes)
    assert y0 + h == max(b[0] + b[2] for b in boxes)
    assert x0 + w == max(b[1] + b[3] for b in boxes)
    for box in boxes:   # relative box maps back to the pixel box
      rel = spanning.relative_box(box, (y0, x0, h, w)).numpy()
      assert rel.dtype == np.float32 and (rel >= 0).all() and (rel <= 1).all()
      np.testing.assert_allclose(
          rel * [h, w, h, w] + [y0, x0, y0, x0],
          [box[0], box[1], box[0] + box[2], box[1] + box[3]], atol=1e-4)


@tf.function
def _with_span(segments, seed):
  """two_views_with_span of the test scene's image (traced once per module)."""
  return spanning.two_views_with_span(_scene()[0], segments, seed, _config(),
                                      SpanView(2 * S))


@tf.function
def _plain(segments, seed):
  return augment.two_views(_scene()[0], segments, seed, _config())


def test_two_views_with_span_matches_two_views_and_its_geometry():
  image, _ = _scene()
  # One id per pixel: a mask equal to a crop of it pins box and flip exactly.
  unique = tf.constant(np.arange(H * W, dtype=np.int32).reshape(H, W))
  fn = lambda s: _with_span(unique, s)
  ref_fn = lambda s: _plain(unique, s)
  flips = []
  for i in range(8):
    out, ref = fn(_seed(i)), ref_fn(_seed(i))
    assert set(ref) <= set(out)
    for k in ref:
      np.testing.assert_array_equal(out[k].numpy(), ref[k].numpy(), err_msg=k)
    boxes, fl, span_box = (t.numpy() for t in _geometry(_seed(i)))
    for v in range(2):
      np.testing.assert_array_equal(
          _crop_ids(unique, boxes[v], fl[v], S), out[f"mask{v + 1}"].numpy())
      assert bool(out[f"flip{v + 1}"]) == fl[v]
      np.testing.assert_allclose(
          out[f"box{v + 1}"].numpy(),
          spanning.relative_box(boxes[v], span_box).numpy())
      flips.append(bool(fl[v]))
    assert out["span"].shape == (2 * S, 2 * S, 3)
    assert out["span"].dtype == tf.uint8
    span = out["span"].numpy().astype(np.float32)
    # The spanning view is the plain (un-flipped, un-coloured) crop, rounded
    # to uint8 (the step scales it back to [0, 1]).
    y0, x0, h, w = span_box
    direct = tf.image.resize(image[y0:y0 + h, x0:x0 + w] / 255.0,
                             [2 * S, 2 * S], method="bicubic")
    np.testing.assert_allclose(span, np.clip(direct.numpy(), 0, 1) * 255,
                               atol=0.5 + 1e-3)
  assert any(flips) and not all(flips)

  odin = odin_config.get_config("test")
  odin.image_size = S
  assert methods.get(odin).span_view() == SpanView(2 * S)
  odin.odin.span_scale = 1.5
  assert methods.get(odin).span_view() == SpanView(96)
  assert spanning.spanning_view(image, (3, 4, 50, 40), 96).shape == (96, 96, 3)


def test_map_segments_reproduces_tf_nearest_crop_exactly():
  """Span = whole image at pixel resolution: mapping == the views' own masks."""
  _, seg = _scene()
  rng = np.random.RandomState(1)
  boxes, flips = [], []
  for _ in range(32):
    h, w = rng.randint(4, H + 1), rng.randint(4, W + 1)
    boxes.append((rng.randint(0, H - h + 1), rng.randint(0, W - w + 1), h, w))
    flips.append(rng.rand() < 0.5)
  boxes.append((32, 0, 32, 80))  # exact ties: (i + .5) * 32 / 80 integral
  flips.append(False)
  full = (0, 0, H, W)
  rel = np.stack([spanning.relative_box(b, full).numpy() for b in boxes])
  span = np.broadcast_to(seg, (len(boxes), H, W))
  for out_hw in [(S, S), (16, 16), (7, 7), (3, 5)]:
    got = np.asarray(mapping.map_segments(span, rel, np.array(flips), out_hw))
    assert got.shape == (len(boxes), *out_hw) and got.dtype == np.int32
    for b, (box, flip) in enumerate(zip(boxes, flips)):
      if out_hw[0] == out_hw[1]:
        want = _crop_ids(seg, box, flip, out_hw[0])
      else:  # crop_resize_flip is square: the same ops, rectangular
        want = _crop_rect_fn(tf.constant(seg), tf.constant(box, tf.int32),
                             tf.constant(flip), out_hw).numpy()
      np.testing.assert_array_equal(got[b], want,
                                    err_msg=f"{box} {flip} {out_hw}")


def _agreement(got, want):
  """Fraction of equal cells per view, [N, h, w] x2 -> [N]."""
  return (got == want).reshape(got.shape[0], -1).mean(-1)


def _interior(ids, r):
  """bool [..., h, w]: cells whose (2r+1)^2 neighbourhood holds a single id."""
  pad = [(0, 0)] * (ids.ndim - 2) + [(r, r), (r, r)]
  p = np.pad(ids, pad, mode="edge")
  h, w = ids.shape[-2:]
  same = np.ones(ids.shape, bool)
  for dy in range(2 * r + 1):
    for dx in range(2 * r + 1):
      same &= p[..., dy:dy + h, dx:dx + w] == ids
  return same


def _near_true_ids(mapped, seg, views, radii):
  """bool [N, g, g]: mapped id occurs in the true map near the cell centre.

  Args:
    mapped: int [N, g, g] ids mapped into each view's g x g grid.
    seg: int [H, W] true ids.
    views: N pairs ((y0, x0, h, w) pixel box, flip) of the views.
    radii: int [N, 2] tolerance in image pixels (y, x) per view.
  """
  g = mapped.shape[1]
  t = (np.arange(g) + 0.5) / g
  boxes = np.array([b for b, _ in views], np.float64)
  flips = np.array([f for _, f in views])
  cy = np.floor(boxes[:, :1] + t * boxes[:, 2:3]).astype(int)        # [N, g]
  tx = np.where(flips[:, None], t[::-1], t)   # flipped: column g-1-j
  cx = np.floor(boxes[:, 1:2] + tx * boxes[:, 3:4]).astype(int)
  big = int(radii.max())
  ok = np.zeros(mapped.shape, bool)
  for dy in range(-big, big + 1):
    for dx in range(-big, big + 1):
      use = (abs(dy) <= radii[:, 0]) & (abs(dx) <= radii[:, 1])
      rows = np.clip(cy + dy, 0, H - 1)
      cols = np.clip(cx + dx, 0, W - 1)
      ids = seg[rows[:, :, None], cols[:, None, :]]
      ok |= use[:, None, None] & (ids == mapped)
  return ok


def test_known_span_segments_land_on_the_right_view_pixels():
  """A segment map known on the spanning view, mapped into each view (crops
  and flips, many seeds), agrees with the view's own crop of the true ids."""
  _, seg = _scene()
  fn = lambda s: _with_span(tf.constant(seg), s)
  spans, span_boxes, rel, flip, views = [], [], [], [], []
  for i in range(NUM_SEEDS):
    out = fn(_seed(i))
    boxes, fl, span_box = (t.numpy() for t in _geometry(_seed(i)))
    # The known span map: the true ids cropped to the spanning box, nearest.
    known = _crop_ids(seg, span_box, False, 2 * S)
    # The spanning view shows exactly that content: its colours name the ids
    # away from id edges (bicubic mixes colours within ~2 px of an edge).
    decoded = _decode(out["span"].numpy())
    assert not (_interior(known, 2) & (decoded != known)).any()
    assert (decoded == known).mean() > 0.9
    for v in range(2):
      spans.append(known)
      span_boxes.append(span_box)
      rel.append(out[f"box{v + 1}"].numpy())
      flip.append(bool(out[f"flip{v + 1}"]))
      views.append((boxes[v], fl[v]))
  spans, span_boxes = np.stack(spans), np.stack(span_boxes)   # [N, ...]
  rel, flip = np.stack(rel), np.array(flip)
  assert 0.2 < flip.mean() < 0.8
  # The same map on the stride-4 grid the discovery net's k-means works on.
  coarse = np.asarray(objects.downsample_segments(jnp.asarray(spans),
                                                  (S // 2, S // 2)))
  whole = np.tile(np.array([[0, 0, 1, 1]], np.float32), (len(rel), 1))
  map_fn = jax.jit(mapping.map_segments, static_argnums=3)
  # (span map, view grid, min mean agreement): a coarse span grid (a cell ~3
  # image px) moves more cells across id edges than the full-res one.
  for span_map, side, threshold in [(spans, S, 0.96), (spans, S // 4, 0.96),
                                    (coarse, S // 4, 0.9), (coarse, 7, 0.9)]:
    msg = f"span grid {span_map.shape[1]} -> view grid {side}"
    want = np.stack([_crop_ids(seg, b, f, side) for b, f in views])
    # Tolerance: one spanning cell plus one pixel of nearest rounding.
    cell = span_boxes[:, 2:] / span_map.shape[1]
    radii = np.ceil(cell).astype(int) + 1
    got = np.asarray(map_fn(span_map, rel, flip, (side, side)))
    good = _agreement(got, want)
    assert good.mean() >= threshold, (msg, good.mean())
    assert good.min() >= threshold - 0.1, (msg, good.min())
    assert _near_true_ids(got, seg, views, radii).all(), msg
    # Deliberately wrong mappings fail: ignoring the flip ...
    no_flip = np.asarray(map_fn(span_map, rel, np.zeros_like(flip),
                                (side, side)))
    assert _agreement(no_flip, want)[flip].mean() < threshold - 0.4, msg
    assert _near_true_ids(no_flip, seg, views, radii)[flip].mean() < 0.7, msg
    # ... or ignoring the view's box within the spanning view.
    no_box = np.asarray(map_fn(span_map, whole, flip, (side, side)))
    assert _agreement(no_box, want).mean() < threshold - 0.3, msg
    assert not _near_true_ids(no_box, seg, views, radii).all(), msg


def test_map_segments_jits_on_a_sharded_batch_and_validates():
  rng = np.random.RandomState(2)
  b, hs, ws = 8, 12, 10
  span = rng.randint(0, 5, (b, hs, ws)).astype(np.int32)
  y0, x0 = rng.uniform(0, 0.5, (2, b))
  rel = np.stack([y0, x0, y0 + rng.uniform(0.2, 0.5, b),
                  x0 + rng.uniform(0.2, 0.5, b)], -1).astype(np.float32)
  flip = rng.rand(b) < 0.5
  mesh = Mesh(np.array(jax.devices()[:4]), ("data",))
  shard = NamedSharding(mesh, P("data"))
  fn = jax.jit(mapping.map_segments, static_argnums=3)
  got = fn(jax.device_put(span, shard), jax.device_put(rel, shard),
           jax.device_put(flip, shard), (6, 5))
  assert got.shape == (b, 6, 5) and got.dtype == jnp.int32
  # Independent per-element reference: explicit cell-centre loop.
  for i in range(b):
    for r in range(6):
      for c in range(5):
        cc = 4 - c if flip[i] else c
        y = rel[i, 0] + (r + 0.5) / 6 * (rel[i, 2] - rel[i, 0])
        x = rel[i, 1] + (cc + 0.5) / 5 * (rel[i, 3] - rel[i, 1])
        assert got[i, r, c] == span[i, min(int(y * hs), hs - 1),
                                    min(int(x * ws), ws - 1)]
  # Ids are a subset of the input ids; float maps go through the generic one.
  for i in range(b):
    assert set(np.unique(got[i])) <= set(np.unique(span[i]))
  feats = rng.randn(b, hs, ws, 3).astype(np.float32)
  fmap = mapping.crop_flip_resize(feats, rel, flip, (6, 5))
  assert fmap.shape == (b, 6, 5, 3) and fmap.dtype == jnp.float32
  seg1, seg2 = mapping.views_from_span(
      span, {"box1": rel, "flip1": flip, "box2": rel, "flip2": ~flip}, (6, 5))
  np.testing.assert_array_equal(seg1, got)
  np.testing.assert_array_equal(seg2, got[:, :, ::-1])
  with pytest.raises(ValueError, match="integer ids"):
    mapping.map_segments(feats[..., 0], rel, flip, (6, 5))
  with pytest.raises(ValueError, match="rel_box"):
    mapping.map_segments(span, rel[:, :3], flip, (6, 5))
