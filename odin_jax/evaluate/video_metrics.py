"""Video object segmentation scores: J, F and J&F (DAVIS).

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
"""

from __future__ import annotations

import math

import numpy as np
from scipy import ndimage

VOID_LABEL = 255
# DAVIS: boundary tolerance as a fraction of the image diagonal.
BOUNDARY_TOLERANCE = 0.008


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
