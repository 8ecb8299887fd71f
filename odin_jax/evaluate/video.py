"""Semi-supervised video object segmentation by label propagation.

Odin §4.3 / Table 5 evaluates frozen features on DAVIS 2017 "following the
experimental setup and nonparametric inference method of DINO": given the
first frame's segmentation, labels are propagated from frame to frame by
nearest-neighbour matching of per-frame features. The protocol implemented
here (written from that description):

  * Features of every frame [T, h, w, D] are L2-normalised per cell.
  * First-frame labels: the full-resolution label map (0 = background,
    1..N = objects) resized to the feature grid, as one-hot vectors
    (`mode='nearest'`, as DINO does) or as per-cell label fractions
    (`mode='area'`), giving probabilities [h, w, L].
  * For frame t = 1..T-1 the context is the first frame (with its given
    labels) plus the last `n_last_frames` frames with their *predicted*
    label probabilities (soft, not argmaxed). For each cell q of frame t:
    cosine similarity to every context cell within a square spatial
    neighbourhood of radius `radius` cells (|dy| <= r and |dx| <= r; all
    context frames, the first included); the `topk` most similar context
    cells over all context frames jointly; weights
    softmax(similarity / temperature) over those k; predicted probabilities
    = the weighted mean of their label probabilities.
  * Probabilities are upsampled bilinearly to image resolution and the
    label is their argmax.

Defaults (`PropagationConfig`): n_last_frames=7, topk=5, radius=12 cells,
temperature=0.1 — the values of DINO's public DAVIS evaluation (not stated in
the papers in this repository; Odin says only that it follows DINO). Radius
is in feature cells, so at stride 32 (Odin's ResNet, Table 5 "Odin") it
spans more of the image than at stride 8 (ViT/8, or Odin' with FPN).

J, F and J&F are computed by evaluate/video_metrics.py; the generated
clips come from evaluate/clips.py. `run(ctx)` is the evaluation: the
generated clips at the demo resolution, then DAVIS 2017 val when
eval.tfds_video names it (prefix 'davis/', native resolution).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from odin_jax import numerics
from odin_jax.evaluate import clips
from odin_jax.evaluate import context as context_lib
from odin_jax.evaluate import datasets
from odin_jax.evaluate import grids
from odin_jax.evaluate import video_metrics

VOID_LABEL = video_metrics.VOID_LABEL


@dataclasses.dataclass(frozen=True)
class PropagationConfig:
  """Label propagation hyper-parameters (defaults: DINO's DAVIS protocol).

  n_last_frames: previous (predicted) frames in the context, besides the
    first frame.
  topk: neighbours whose labels are averaged.
  radius: spatial neighbourhood radius in feature cells (None = the whole
    frame).
  temperature: softmax temperature applied to cosine similarities.
  band_rows: query rows processed together (memory: band_rows * w queries
    against (1 + n_last_frames) * (band_rows + 2 radius) * w context cells).
  """
  n_last_frames: int = 7
  topk: int = 5
  radius: int | None = 12
  temperature: float = 0.1
  band_rows: int = 8


def labels_to_grid(label_map, num_labels: int, grid_hw: Sequence[int],
                   mode: str = "nearest",
                   void_label: int = VOID_LABEL) -> np.ndarray:
  """Label probabilities of a full-resolution label map on a feature grid.

  Args:
    label_map: int [H, W] in [0, num_labels) (void_label / out-of-range
      pixels count for no label).
    num_labels: L (background included).
    grid_hw: (h, w).
    mode: 'nearest' (one-hot of the pixel at each cell centre, DINO) or
      'area' (fraction of each label in each cell; exact box filter).
  Returns:
    float32 [h, w, L].
  """
  label_map = np.asarray(label_map).astype(np.int64)
  h, w = int(grid_hw[0]), int(grid_hw[1])
  valid = (label_map >= 0) & (label_map < num_labels) & (
      label_map != void_label)
  onehot = (label_map[..., None] == np.arange(num_labels)) & valid[..., None]
  onehot = onehot.astype(np.float32)
  if mode == "nearest":
    grid = numerics.resize_nearest(np.moveaxis(onehot, -1, 0), (h, w))
    return np.moveaxis(grid, 0, -1).astype(np.float32)
  if mode == "area":
    rows = grids.area_matrix(h, label_map.shape[0])
    cols = grids.area_matrix(w, label_map.shape[1])
    return np.einsum("iy,yxl,jx->ijl", rows, onehot, cols).astype(np.float32)
  raise ValueError(f"mode must be 'nearest' or 'area', got {mode!r}")


def _propagate_frame(query, ctx_feats, ctx_labels, ctx_valid, *, topk: int,
                     radius_rows: int, radius_cols: int, temperature: float,
                     band_rows: int):
  """Label probabilities of one frame from its context.

  query [h, w, D] (normalised), ctx_feats [C, h, w, D], ctx_labels
  [C, h, w, L], ctx_valid bool [C] -> [h, w, L].
  """
  h, w, dim = query.shape
  num_ctx, num_labels = ctx_feats.shape[0], ctx_labels.shape[-1]
  rows = min(band_rows, h)
  num_bands = -(-h // rows)
  padded_h = num_bands * rows
  r = radius_rows
  window = rows + 2 * r
  query = jnp.pad(query, ((0, padded_h - h), (0, 0), (0, 0)))
  pad = ((0, 0), (r, padded_h - h + r), (0, 0), (0, 0))
  ctx_feats = jnp.pad(ctx_feats, pad)
  ctx_labels = jnp.pad(ctx_labels, pad)
  row_valid = jnp.zeros(padded_h + 2 * r, bool).at[r:r + h].set(True)
  # Neighbourhood of query (qi, qj) in window row y (frame row i0 - r + y).
  dy = jnp.arange(window)[None, :] - r - jnp.arange(rows)[:, None]
  dx = jnp.arange(w)[None, :] - jnp.arange(w)[:, None]
  near = ((jnp.abs(dy) <= r)[:, None, None, :, None]
          & (jnp.abs(dx) <= radius_cols)[None, :, None, None, :])
  k = min(topk, num_ctx * window * w)

  def band(index):
    start = index * rows
    q = jax.lax.dynamic_slice(query, (start, 0, 0), (rows, w, dim))
    feats = jax.lax.dynamic_slice(ctx_feats, (0, start, 0, 0),
                                  (num_ctx, window, w, dim))
    labels = jax.lax.dynamic_slice(ctx_labels, (0, start, 0, 0),
                                   (num_ctx, window, w, num_labels))
    valid_rows = jax.lax.dynamic_slice(row_valid, (start,), (window,))
    sim = jnp.einsum("ijd,cyxd->ijcyx", q, feats,
                     precision=jax.lax.Precision.HIGHEST)
    mask = (near & ctx_valid[None, None, :, None, None]
            & valid_rows[None, None, None, :, None])
    sim = jnp.where(mask, sim, -jnp.inf).reshape(rows * w, -1)
    values, indices = jax.lax.top_k(sim, k)
    ok = jnp.isfinite(values)
    logits = jnp.where(ok, values / temperature, -jnp.inf)
    top = jnp.max(jnp.where(ok, logits, -1e30), axis=-1, keepdims=True)
    weights = jnp.where(ok, jnp.exp(logits - top), 0.0)
    weights = weights / jnp.maximum(weights.sum(-1, keepdims=True), 1e-30)
    gathered = labels.reshape(-1, num_labels)[indices]  # [rows*w, k, L]
    return jnp.einsum("qk,qkl->ql", weights, gathered).reshape(
        rows, w, num_labels)

  out = jax.lax.map(band, jnp.arange(num_bands))
  return out.reshape(padded_h, w, num_labels)[:h]


@functools.partial(jax.jit, static_argnames=("config",))
def _propagate(features, first_labels, config: PropagationConfig):
  t, h, w, dim = features.shape
  num_labels = first_labels.shape[-1]
  feats = numerics.l2_normalize(features)
  n = config.n_last_frames
  radius_rows = h - 1 if config.radius is None else min(config.radius, h - 1)
  radius_cols = w - 1 if config.radius is None else min(config.radius, w - 1)
  frame = functools.partial(
      _propagate_frame, topk=config.topk, radius_rows=radius_rows,
      radius_cols=radius_cols, temperature=config.temperature,
      band_rows=config.band_rows)
  first_f, first_l = feats[0][None], first_labels[None]

  def step(carry, feat):
    queue_f, queue_l, queue_v = carry
    ctx_f = jnp.concatenate([first_f, queue_f])
    ctx_l = jnp.concatenate([first_l, queue_l])
    ctx_v = jnp.concatenate([jnp.ones(1, bool), queue_v])
    pred = frame(feat, ctx_f, ctx_l, ctx_v)
    if n > 0:  # Oldest out, newest (this frame, predicted labels) in.
      carry = (jnp.concatenate([queue_f[1:], feat[None]]),
               jnp.concatenate([queue_l[1:], pred[None]]),
               jnp.concatenate([queue_v[1:], jnp.ones(1, bool)]))
    return carry, pred

  init = (jnp.zeros((n, h, w, dim), feats.dtype),
          jnp.zeros((n, h, w, num_labels), jnp.float32),
          jnp.zeros((n,), bool))
  _, preds = jax.lax.scan(step, init, feats[1:])
  return jnp.concatenate([first_l, preds])


def propagate_labels(features, first_labels,
                     config: PropagationConfig = PropagationConfig()):
  """Propagates first-frame label probabilities through a clip.

  Args:
    features: float [T, h, w, D] per-frame features (normalised here).
    first_labels: float [h, w, L] first-frame label probabilities (e.g.
      `labels_to_grid`).
    config: `PropagationConfig`.
  Returns:
    float32 [T, h, w, L] label probabilities; frame 0 is `first_labels`.
  """
  features = jnp.asarray(features, jnp.float32)
  first_labels = jnp.asarray(first_labels, jnp.float32)
  if features.ndim != 4 or first_labels.shape[:2] != features.shape[1:3]:
    raise ValueError(f"features [T, h, w, D] {features.shape} and "
                     f"first_labels [h, w, L] {first_labels.shape} mismatch")
  if config.topk < 1 or config.n_last_frames < 0 or config.band_rows < 1:
    raise ValueError(f"bad propagation config {config}")
  return _propagate(features, first_labels, config)


@functools.partial(jax.jit, static_argnames=("image_hw",))
def _upsample_argmax(probs, image_hw):
  up = jax.image.resize(probs, image_hw + probs.shape[-1:], "bilinear")
  return jnp.argmax(up, axis=-1).astype(jnp.int32)


def probabilities_to_labels(probs, image_hw: Sequence[int]) -> np.ndarray:
  """Bilinear upsampling of label probabilities, then argmax per pixel.

  Args:
    probs: float [T, h, w, L].
    image_hw: (H, W).
  Returns:
    int32 [T, H, W] (frame by frame, to bound memory).
  """
  hw = (int(image_hw[0]), int(image_hw[1]))
  return np.stack([np.asarray(_upsample_argmax(jnp.asarray(p), hw))
                   for p in np.asarray(probs, np.float32)])


def propagate_video(features, first_mask, num_labels: int | None = None,
                    image_hw: Sequence[int] | None = None,
                    config: PropagationConfig = PropagationConfig(),
                    mode: str = "nearest",
                    void_label: int = VOID_LABEL) -> np.ndarray:
  """Segments a clip from its first-frame mask (the full protocol).

  Args:
    features: float [T, h, w, D].
    first_mask: int [H, W] first-frame labels (0 = background, 1..N objects,
      void_label ignored).
    num_labels: L; default = largest non-void label + 1.
    image_hw: output (H, W); default first_mask's size.
    config: `PropagationConfig`.
    mode: first-frame downsampling, 'nearest' or 'area' (`labels_to_grid`).
  Returns:
    int32 [T, H, W] predicted labels (frame 0 = upsampled grid labels).
  """
  first_mask = np.asarray(first_mask)
  if num_labels is None:
    real = first_mask[first_mask != void_label]
    num_labels = int(real.max(initial=0)) + 1
  features = np.asarray(features)
  grid = labels_to_grid(first_mask, num_labels, features.shape[1:3], mode,
                        void_label)
  probs = propagate_labels(features, grid, config)
  return probabilities_to_labels(probs, image_hw or first_mask.shape)


def _scores(prefix: str, acc: video_metrics.VideoAccumulator
            ) -> context_lib.Output:
  result = acc.result()
  return context_lib.Output(
      metrics={f"{prefix}/{k}": float(result[k])
               for k in ("J_mean", "F_mean", "JF_mean")},
      info={f"{prefix}/num_objects": int(result["num_objects"])})


def run(ctx) -> context_lib.Output | None:
  """Label propagation J / F / J&F on generated clips (+ DAVIS if set)."""
  if ctx.no_features("video"):
    return None
  s = ctx.settings
  size = int(ctx.config.dataset.demo_image_size)
  if s.video_clips < 1:
    raise ValueError("video_clips must be >= 1")
  acc = video_metrics.VideoAccumulator()
  for c in range(s.video_clips):
    clip = clips.make_clip(seed=1000 * s.demo_seed + c,
                           num_frames=s.video_frames, image_size=size,
                           num_objects=s.video_objects,
                           max_speed=size / 32)
    feats = ctx.features(clip.frames)
    pred = propagate_video(feats, clip.masks[0],
                           num_labels=s.video_objects + 1,
                           image_hw=(size, size))
    acc.add(video_metrics.evaluate_video(pred, clip.masks))
  out = _scores("video", acc)
  out.info["video/grid"] = list(feats.shape[1:3])
  if s.tfds_video:
    davis = davis_scores(ctx)
    if davis is not None:
      out.update(davis)
  return out


def davis_scores(ctx) -> context_lib.Output | None:
  """DAVIS 2017 val label propagation (davis/ prefix), if prepared; at
  the clips' native resolution."""
  acc = video_metrics.VideoAccumulator()
  count = 0
  for frames, masks in datasets.davis_clips(ctx.settings):
    count += 1
    feats = ctx.features(frames, image_size=None)  # native resolution
    pred = propagate_video(feats, masks[0], image_hw=masks.shape[1:])
    acc.add(video_metrics.evaluate_video(pred, masks))
  return _scores("davis", acc) if count else None
