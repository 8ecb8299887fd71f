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

Metrics (DAVIS, Perazzi et al. 2016; used by Odin Table 5):
  * J: region similarity = IoU of the predicted and true mask of an object
    in a frame (1 when both are empty).
  * F: boundary F-measure, the rule of the DAVIS 2017 toolkit
    (davisvideochallenge/davis2017-evaluation, `f_measure` / `_seg2bmap`),
    re-implemented from its description: precision / recall of the boundary
    pixels of the prediction / truth, a boundary pixel matching when the
    other boundary is within a disk of radius ceil(0.008 * image diagonal)
    pixels. Both boundaries empty -> 1; one empty -> 0. A boundary pixel is
    any pixel (inside OR outside the mask) whose right, lower or lower-right
    neighbour has the other value (`mask_boundary`); the image border is not
    a boundary. (Before, boundaries were mask pixels with a 4-neighbour
    outside: on small noisy masks the two rules differ by ~0.07 in F.)
  * Per object, J and F are averaged over the evaluated frames (the first
    and last frames are excluded by default, the DAVIS 2017 toolkit's
    semi-supervised convention), then over all objects of all videos;
    J&F = (J + F) / 2.

`make_clip` generates clips of textured shapes (cut from the photos bundled
with scikit-image) moving at constant velocity over a textured background,
with exact visible-pixel masks: a DAVIS stand-in that needs no download.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from scipy import ndimage

from odin_jax.evaluate import discovery

VOID_LABEL = 255
# DAVIS: boundary tolerance as a fraction of the image diagonal.
BOUNDARY_TOLERANCE = 0.008


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
    grid = discovery.resize_nearest(np.moveaxis(onehot, -1, 0), (h, w))
    return np.moveaxis(grid, 0, -1).astype(np.float32)
  if mode == "area":
    rows = discovery.area_matrix(h, label_map.shape[0])
    cols = discovery.area_matrix(w, label_map.shape[1])
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
  feats = features / jnp.maximum(
      jnp.linalg.norm(features, axis=-1, keepdims=True), 1e-12)
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


def region_similarity(pred, gt, void=None) -> float:
  """J: IoU of two binary masks [H, W] (void pixels removed); 1 if both
  are empty."""
  pred, gt = np.asarray(pred, bool), np.asarray(gt, bool)
  if void is not None:
    keep = ~np.asarray(void, bool)
    pred, gt = pred & keep, gt & keep
  union = np.count_nonzero(pred | gt)
  return 1.0 if union == 0 else np.count_nonzero(pred & gt) / union


def mask_boundary(mask) -> np.ndarray:
  """One-pixel-wide boundary map of the DAVIS toolkit (`_seg2bmap`).

  A pixel is a boundary pixel when its right, lower or lower-right neighbour
  has the other value, so the boundary sits half a pixel towards the origin
  from the true edge and includes background pixels left of / above the
  mask. Outside the image the map is extended by replicating its last row
  and column, so the last row compares only rightwards, the last column only
  downwards and the image border itself is never a boundary (the toolkit's
  special cases).

  bool [H, W] -> bool [H, W].
  """
  mask = np.asarray(mask, bool)
  padded = np.pad(mask, ((0, 1), (0, 1)), mode="edge")
  right, down, diag = padded[:-1, 1:], padded[1:, :-1], padded[1:, 1:]
  return (mask ^ right) | (mask ^ down) | (mask ^ diag)


def _disk(radius: int) -> np.ndarray:
  yy, xx = np.mgrid[-radius:radius + 1, -radius:radius + 1]
  return yy * yy + xx * xx <= radius * radius


def boundary_f_measure(pred, gt, tolerance: float = BOUNDARY_TOLERANCE,
                       void=None) -> float:
  """F: boundary F-measure of two binary masks [H, W].

  Args:
    pred, gt: bool [H, W].
    tolerance: < 1: fraction of the image diagonal (DAVIS: 0.008), rounded
      up to pixels; >= 1: pixels.
    void: optional bool [H, W] removed from both masks first.
  Returns:
    float in [0, 1].
  """
  pred, gt = np.asarray(pred, bool), np.asarray(gt, bool)
  if void is not None:
    keep = ~np.asarray(void, bool)
    pred, gt = pred & keep, gt & keep
  if tolerance < 1:
    tolerance = math.ceil(tolerance * math.hypot(*gt.shape))
  disk = _disk(int(tolerance))
  pred_b, gt_b = mask_boundary(pred), mask_boundary(gt)
  n_pred, n_gt = np.count_nonzero(pred_b), np.count_nonzero(gt_b)
  if n_pred == 0 and n_gt == 0:
    return 1.0
  if n_pred == 0 or n_gt == 0:
    return 0.0
  precision = np.count_nonzero(
      pred_b & ndimage.binary_dilation(gt_b, disk)) / n_pred
  recall = np.count_nonzero(gt_b & ndimage.binary_dilation(pred_b, disk)) / n_gt
  if precision + recall == 0:
    return 0.0
  return 2 * precision * recall / (precision + recall)


def evaluate_video(pred_labels, gt_labels, object_ids=None, *,
                   exclude_first: bool = True, exclude_last: bool = True,
                   void_label: int = VOID_LABEL,
                   tolerance: float = BOUNDARY_TOLERANCE) -> dict:
  """Per-object J and F of one video.

  Args:
    pred_labels: int [T, H, W] predicted labels.
    gt_labels: int [T, H, W] true labels (0 background, void_label void).
    object_ids: objects to score; default the non-zero, non-void labels of
      the first frame (the objects given to the method).
    exclude_first, exclude_last: skip those frames (DAVIS convention).
    void_label: ignored ground-truth pixels.
    tolerance: boundary tolerance (`boundary_f_measure`).
  Returns:
    {'object_ids' int [O], 'J' float [O], 'F' float [O] (means over
    frames), 'J_mean', 'F_mean', 'JF_mean' (means over objects)}.
  """
  pred_labels, gt_labels = np.asarray(pred_labels), np.asarray(gt_labels)
  if pred_labels.shape != gt_labels.shape or pred_labels.ndim != 3:
    raise ValueError(f"pred {pred_labels.shape} and gt {gt_labels.shape} "
                     "must both be [T, H, W]")
  num_frames = gt_labels.shape[0]
  frames = range(1 if exclude_first else 0,
                 num_frames - 1 if exclude_last else num_frames)
  if len(frames) == 0:
    raise ValueError(f"no frame left to evaluate out of {num_frames}")
  if object_ids is None:
    object_ids = np.unique(gt_labels[0])
    object_ids = object_ids[(object_ids != 0) & (object_ids != void_label)]
  object_ids = np.asarray(object_ids).reshape(-1)
  j = np.zeros(len(object_ids))
  f = np.zeros(len(object_ids))
  for o, obj in enumerate(object_ids):
    js, fs = [], []
    for t in frames:
      void = gt_labels[t] == void_label
      js.append(region_similarity(pred_labels[t] == obj, gt_labels[t] == obj,
                                  void))
      fs.append(boundary_f_measure(pred_labels[t] == obj,
                                   gt_labels[t] == obj, tolerance, void))
    j[o], f[o] = np.mean(js), np.mean(fs)
  j_mean = float(j.mean()) if len(j) else math.nan
  f_mean = float(f.mean()) if len(f) else math.nan
  return {"object_ids": object_ids, "J": j, "F": f, "J_mean": j_mean,
          "F_mean": f_mean, "JF_mean": (j_mean + f_mean) / 2}


class VideoAccumulator:
  """Means of per-object J and F over all objects of all videos (DAVIS)."""

  def __init__(self):
    self._j: list[float] = []
    self._f: list[float] = []

  def add(self, result: dict) -> None:
    """Adds one `evaluate_video` result."""
    self._j.extend(np.asarray(result["J"], float).tolist())
    self._f.extend(np.asarray(result["F"], float).tolist())

  def result(self) -> dict:
    """{'J_mean', 'F_mean', 'JF_mean' (NaN if empty), 'num_objects'}."""
    if not self._j:
      return {"J_mean": math.nan, "F_mean": math.nan, "JF_mean": math.nan,
              "num_objects": 0}
    j, f = float(np.mean(self._j)), float(np.mean(self._f))
    return {"J_mean": j, "F_mean": f, "JF_mean": (j + f) / 2,
            "num_objects": len(self._j)}


# --- Generated clips ----------------------------------------------------

# Photos bundled with scikit-image (load offline).
CLIP_PHOTOS = ("astronaut", "coffee", "chelsea", "rocket",
               "immunohistochemistry", "camera", "coins", "moon", "brick",
               "grass", "gravel")
SHAPES = ("ellipse", "rectangle", "triangle")


@dataclasses.dataclass(frozen=True, eq=False)
class Clip:
  """A generated clip.

  frames: uint8 [T, H, W, 3].
  masks: int32 [T, H, W]; 0 = background, j = object j (visible pixels;
    later objects occlude earlier ones).
  velocities: float [N, 2] (dy, dx) pixels per frame of objects 1..N.
  """
  frames: np.ndarray
  masks: np.ndarray
  velocities: np.ndarray


@functools.lru_cache(maxsize=None)
def _photo(name: str) -> np.ndarray:
  """A bundled photo as float32 RGB [H, W, 3] in [0, 1]."""
  from skimage import data as skdata
  image = np.asarray(getattr(skdata, name)())
  if image.ndim == 2:
    image = np.repeat(image[..., None], 3, axis=-1)
  return image[..., :3].astype(np.float32) / 255.0


def _crop(rng, photo: np.ndarray, out_hw) -> np.ndarray:
  """A random square-ish crop of a photo resized to out_hw, float [h, w, 3]."""
  from skimage import transform
  h, w = photo.shape[:2]
  side = int(rng.integers(min(h, w) // 3, min(h, w) + 1))
  y = int(rng.integers(0, h - side + 1))
  x = int(rng.integers(0, w - side + 1))
  return transform.resize(photo[y:y + side, x:x + side], tuple(out_hw),
                          order=1, anti_aliasing=True).astype(np.float32)


def _shape_mask(rng, shape: str, size: int) -> np.ndarray:
  """bool [size, size] shape filling most of its box."""
  yy, xx = np.mgrid[0:size, 0:size] + 0.5
  c = size / 2
  if shape == "ellipse":
    ry, rx = c * rng.uniform(0.7, 1.0), c * rng.uniform(0.7, 1.0)
    return ((yy - c) / ry) ** 2 + ((xx - c) / rx) ** 2 <= 1.0
  if shape == "rectangle":
    hy, hx = c * rng.uniform(0.6, 1.0), c * rng.uniform(0.6, 1.0)
    return (np.abs(yy - c) <= hy) & (np.abs(xx - c) <= hx)
  # Triangle: apex at the top, base at the bottom (half-plane tests).
  top, bottom = size * 0.05, size * 0.95
  frac = np.clip((yy - top) / (bottom - top), 0.0, 1.0)
  return (yy >= top) & (yy <= bottom) & (np.abs(xx - c) <= frac * c * 0.95)


def make_clip(seed: int = 0, num_frames: int = 8, image_size: int = 64,
              num_objects: int = 2,
              object_size: tuple[float, float] = (0.3, 0.45),
              max_speed: float = 2.0) -> Clip:
  """Clip of textured shapes moving at constant velocity (exact masks).

  Background: a crop of one bundled photo. Each object: an ellipse,
  rectangle or triangle cut from a crop of another photo (with a random
  colour gain, so it differs from the background), moving in a straight
  line at a constant velocity (|v| <= max_speed px/frame per axis) chosen so
  the object's box stays inside the image for all frames. Later objects
  are drawn over earlier ones. Deterministic given the arguments.

  Args:
    seed: numpy seed.
    num_frames: T.
    image_size: H = W.
    num_objects: N.
    object_size: range of object box side as a fraction of image_size.
    max_speed: largest |velocity| component, pixels per frame.
  Returns:
    `Clip`.
  """
  rng = np.random.default_rng(seed)
  size = int(image_size)
  photo_order = rng.permutation(len(CLIP_PHOTOS))
  background = _crop(rng, _photo(CLIP_PHOTOS[photo_order[0]]), (size, size))
  objects = []
  for j in range(num_objects):
    side = int(round(size * rng.uniform(*object_size)))
    side = max(2, min(side, size))
    photo = _photo(CLIP_PHOTOS[photo_order[(j + 1) % len(CLIP_PHOTOS)]])
    texture = _crop(rng, photo, (side, side))
    texture = np.clip(texture * rng.uniform(0.6, 1.4, size=3), 0.0, 1.0)
    shape = _shape_mask(rng, SHAPES[int(rng.integers(len(SHAPES)))], side)
    travel_max = (size - side) / max(num_frames - 1, 1)
    velocity = rng.uniform(-1.0, 1.0, size=2) * min(max_speed, travel_max)
    span = velocity * (num_frames - 1)
    low = np.maximum(0.0, -span)
    high = np.maximum(low, (size - side) - np.maximum(0.0, span))
    start = rng.uniform(low, high)
    objects.append((side, texture, shape, velocity, start))
  frames = np.empty((num_frames, size, size, 3), np.float32)
  masks = np.zeros((num_frames, size, size), np.int32)
  for t in range(num_frames):
    canvas = background.copy()
    for j, (side, texture, shape, velocity, start) in enumerate(objects):
      y, x = np.round(start + velocity * t).astype(int)
      y0, x0 = max(y, 0), max(x, 0)
      y1, x1 = min(y + side, size), min(x + side, size)
      if y1 <= y0 or x1 <= x0:
        continue
      sub = shape[y0 - y:y1 - y, x0 - x:x1 - x]
      canvas[y0:y1, x0:x1][sub] = texture[y0 - y:y1 - y, x0 - x:x1 - x][sub]
      masks[t, y0:y1, x0:x1][sub] = j + 1
    frames[t] = canvas
  frames = np.round(frames * 255.0).astype(np.uint8)
  velocities = np.array([o[3] for o in objects], np.float64).reshape(-1, 2)
  return Clip(frames=frames, masks=masks, velocities=velocities)
