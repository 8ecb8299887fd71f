"""Spanning-view segment maps -> each view's segment map, in jnp (Odin §3.1).

The discovery network segments the spanning view (odin_jax.data.spanning)
on its feature grid [Hs, Ws]. Inside the jitted train step each view's
masks are obtained from that one map by cropping it to the view's box
(given relative to the spanning view), mirroring it when the view was
flipped, and resizing it with nearest neighbour to the grid the view needs
(its feature grid, or its pixel grid). Because both views read the same map,
a segment id names the same image content in both.

Sampling convention (the one tf.image.resize(method='nearest') uses, and so
the one augment.crop_resize_flip uses for the views' masks): a map with n
cells spans [0, 1) of its frame, cell k covering [k / n, (k + 1) / n) with
its centre at (k + 0.5) / n. Output cell i of a view of n_out cells has its
centre at t = (i + 0.5) / n_out of the view box, i.e. at
y0 + t * (y1 - y0) of the spanning frame, and takes the spanning cell
floor(that * Hs) (clipped to [0, Hs - 1]). With Hs = image height and the
spanning box = the whole image this is exactly
floor(y0_px + (i + 0.5) * h_px / n_out), the source row that
tf.image.resize picks for the view's mask (tests/methods/test_spanning.py checks
equality). A centre falling exactly on a cell edge goes to the lower/right
cell, as TF's does except where its float32 scale happens to round down. A
flipped view's column j
is the unflipped column w - 1 - j (flip after resize, as in augment).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

# Pushes a cell centre that lies exactly on a source-cell edge (up to float32
# rounding of the relative box) to the lower/right cell, as tf.image.resize
# does for nearly all such ties; 1e-3 of a cell is far above float32 rounding
# of positions < 2^12 and far below any meaningful offset.
_TIE_EPS = 1e-3


def _source_indices(start, stop, n_out: int, n_src: int):
  """Nearest source cell of each output cell along one axis.

  Args:
    start, stop: float32 [B], the view's extent in the spanning frame [0, 1].
    n_out: output cells along this axis (static).
    n_src: spanning-map cells along this axis (static).
  Returns:
    int32 [B, n_out] in [0, n_src - 1].
  """
  centres = (jnp.arange(n_out, dtype=jnp.float32) + 0.5) / n_out
  pos = (start[:, None] * n_src
         + centres[None, :] * ((stop - start) * n_src)[:, None])
  idx = jnp.floor(pos + _TIE_EPS).astype(jnp.int32)
  return jnp.clip(idx, 0, n_src - 1)


@functools.partial(jax.jit, static_argnames="out_hw")
def crop_flip_resize(span_map, rel_box, flip, out_hw: tuple[int, int]):
  """Nearest-neighbour crop/flip/resize of any per-cell spanning-view map.

  Works for id maps and float maps alike (e.g. soft assignments or features
  for visualisation): values are copied, never interpolated.

  Args:
    span_map: [B, Hs, Ws, ...] values on the spanning view's grid.
    rel_box: float32 [B, 4], (y0, x0, y1, x1) of each view in the spanning
      view's normalised frame (spanning.relative_box).
    flip: bool [B], True where the view is mirrored left-right.
    out_hw: (h, w) static output grid.
  Returns:
    [B, h, w, ...], same dtype as span_map.
  """
  # Jitted (out_hw static) so that eager calls, e.g. from numpy in tests or
  # notebooks, compile once per shape instead of dispatching op by op.
  span_map = jnp.asarray(span_map)
  rel_box = jnp.asarray(rel_box, jnp.float32)
  flip = jnp.asarray(flip, bool)
  if span_map.ndim < 3:
    raise ValueError(f"span_map must be [B, Hs, Ws, ...], got shape "
                     f"{span_map.shape}.")
  b, hs, ws = span_map.shape[:3]
  if rel_box.shape != (b, 4):
    raise ValueError(f"rel_box must be [B={b}, 4] (y0, x0, y1, x1), got "
                     f"{rel_box.shape}.")
  if flip.shape != (b,):
    raise ValueError(f"flip must be [B={b}], got {flip.shape}.")
  h, w = (int(v) for v in out_hw)  # static
  if h <= 0 or w <= 0:
    raise ValueError(f"out_hw must be positive, got {out_hw}.")
  rows = _source_indices(rel_box[:, 0], rel_box[:, 2], h, hs)   # [B, h]
  cols = _source_indices(rel_box[:, 1], rel_box[:, 3], w, ws)   # [B, w]
  cols = jnp.where(flip[:, None], cols[:, ::-1], cols)
  return jax.vmap(lambda m, r, c: m[r[:, None], c[None, :]])(span_map, rows,
                                                             cols)


def map_segments(span_segments, rel_box, flip, out_hw: tuple[int, int]):
  """Each view's segment map from the spanning view's segment map.

  Args:
    span_segments: int [B, Hs, Ws] segment ids on the spanning view's grid
      (e.g. k-means cluster ids on the discovery net's 112 x 112 stride-4
      grid for a 448 px spanning view).
    rel_box: float32 [B, 4], (y0, x0, y1, x1) of the view in the spanning
      view's normalised frame (batch keys 'box1' / 'box2').
    flip: bool [B], whether the view was flipped ('flip1' / 'flip2').
    out_hw: (h, w) static, the view grid wanted: its feature grid (7 x 7 for
      stage4 at 224) or its pixel grid (224 x 224).
  Returns:
    int32 [B, h, w]: per output cell the id of the spanning cell under its
    centre (module docstring); ids are a subset of each image's input ids.
  """
  span_segments = jnp.asarray(span_segments)
  if span_segments.ndim != 3:
    raise ValueError(f"span_segments must be [B, Hs, Ws], got shape "
                     f"{span_segments.shape}.")
  if not jnp.issubdtype(span_segments.dtype, jnp.integer):
    raise ValueError(f"span_segments must hold integer ids, got "
                     f"{span_segments.dtype}; use crop_flip_resize for "
                     f"float maps.")
  return crop_flip_resize(span_segments.astype(jnp.int32), rel_box, flip,
                          tuple(int(v) for v in out_hw))


def views_from_span(span_segments, batch, out_hw: tuple[int, int]):
  """Both views' segment maps from a batch following the Odin contract.

  Args:
    span_segments: int [B, Hs, Ws] segment ids of batch['span'].
    batch: dict with 'box1', 'box2' float32 [B, 4] and 'flip1', 'flip2'
      bool [B] (spanning.two_views_with_span, batched).
    out_hw: (h, w) static output grid.
  Returns:
    (segments1, segments2), int32 [B, h, w] each.
  """
  return (map_segments(span_segments, batch["box1"], batch["flip1"], out_hw),
          map_segments(span_segments, batch["box2"], batch["flip2"], out_hw))
