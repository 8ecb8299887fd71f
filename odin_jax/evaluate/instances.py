"""Instance-recall analysis: which instances can a feature map separate?

Protocol of the instance-segmentation analysis paper ("Understanding
Self-Supervised Features for Learning Unsupervised Instance Segmentation"),
§3 and App. A.2.1:
  1. Affinity between the cells of one image's feature map = cosine
     similarity of their features.
  2. K-way spectral clustering of that affinity, for several K, all masks
     accumulated. The paper uses K in {2, 3, 4, 5} ("14 overlapping masks per
     image", App. A.2.1 and Table 4 of its appendix) -> `DEFAULT_KS`.
  3. Masks with non-connected components are split into one mask per
     component (App. A.3 "Non-connected component splitting").
  4. "Mean average recall" of the ground-truth instances (§3, Table 1),
     grouped by how many instances of the same class co-occur in the image:
     1, 2, 3, 4, 5, 6+. E.g. in an image with two dogs and one cat, the dogs
     count in column 2 and the cat in column 1. Pooled over all instances of
     a column across the dataset.

Choices the paper leaves open, made here:
  * Negative cosine similarities are clipped to 0 (`affinity='clip'`, as in
    deep spectral methods); `affinity='shift'` uses (1 + cos) / 2 instead.
  * Spectral clustering is Ng-Jordan-Weiss: with W the affinity and D its
    degrees, the K eigenvectors of D^-1/2 W D^-1/2 with the largest
    eigenvalues (= the K smallest of the normalised Laplacian
    I - D^-1/2 W D^-1/2), rows L2-normalised, then k-means
    (`odin_jax.discovery.kmeans`). One eigendecomposition serves all K.
  * Components are found at feature resolution with 8-connectivity and then
    upsampled (nearest upsampling preserves 8-connectivity), so tiny
    components are not created by the upsampling itself.
  * The paper does not define its "mean average recall" further; we use
    COCO's IoU grid: AR = mean over t in {0.50, 0.55, ..., 0.95}
    (`AR_THRESHOLDS`) of recall@t, an instance being recalled at t when its
    best overlap (max IoU over all proposals, as Hosang et al.'s proposal
    recall; the masks carry no score to rank a one-to-one matching by) is
    >= t. AR is the headline ('ar_*'); recall at IoU >= 0.5 is reported
    beside it ('recall_*'), the number this module reported before.
  * Features: whatever the caller clusters. The paper clusters the keys of
    the last attention block of ViTs (the evaluation's 'keys' map,
    eval.instance_feature='auto' for a ViT); other backbones: the discovery
    features (eval.feature).

Cost: the affinity is dense, (h*w)^2 floats: fine up to ~64x64 grids
(4096 cells: 64 MB and a partial eigendecomposition of a 4096x4096 matrix).
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
from scipy import linalg as sp_linalg
from scipy import ndimage

from odin_jax.evaluate import discovery

DEFAULT_KS = (2, 3, 4, 5)
IOU_THRESHOLD = 0.5
# COCO's AR grid: IoU 0.50, 0.55, ..., 0.95.
AR_THRESHOLDS = tuple(round(0.5 + 0.05 * i, 2) for i in range(10))
# Table 1's columns: 1, 2, 3, 4, 5 and 6+ same-class instances in the image.
CO_OCCURRENCE_BINS = ("1", "2", "3", "4", "5", "6+")


def cosine_affinity(features, affinity: str = "clip") -> np.ndarray:
  """Cosine-similarity affinity of the cells of one feature map.

  Args:
    features: float [h, w, D] or [N, D].
    affinity: 'clip' (max(cos, 0)) or 'shift' ((1 + cos) / 2).
  Returns:
    float64 [N, N], N = h*w, symmetric, non-negative, diagonal 1 (for
    non-zero features).
  """
  x = np.asarray(features, np.float64)
  x = x.reshape(-1, x.shape[-1])
  x = x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)
  cos = x @ x.T
  if affinity == "clip":
    return np.maximum(cos, 0.0)
  if affinity == "shift":
    return (1.0 + cos) / 2.0
  raise ValueError(f"affinity must be 'clip' or 'shift', got {affinity!r}")


def spectral_embedding(affinity_matrix, num_vectors: int) -> np.ndarray:
  """Leading eigenvectors of the normalised affinity D^-1/2 W D^-1/2.

  Args:
    affinity_matrix: float [N, N] symmetric, non-negative.
    num_vectors: how many eigenvectors (<= N).
  Returns:
    float64 [N, num_vectors], columns ordered by decreasing eigenvalue
    (column j = the j-th smallest eigenvector of the normalised Laplacian).
  """
  w = np.asarray(affinity_matrix, np.float64)
  n = w.shape[0]
  num_vectors = min(int(num_vectors), n)
  inv_sqrt_degree = 1.0 / np.sqrt(np.maximum(w.sum(axis=1), 1e-12))
  m = w * inv_sqrt_degree[:, None] * inv_sqrt_degree[None, :]
  _, vectors = sp_linalg.eigh(m, subset_by_index=[n - num_vectors, n - 1])
  vectors = vectors[:, ::-1]
  # Deterministic signs: the largest-magnitude entry of each vector > 0.
  pivot = np.argmax(np.abs(vectors), axis=0)
  signs = np.sign(vectors[pivot, np.arange(vectors.shape[1])])
  return vectors * np.where(signs == 0, 1.0, signs)


def spectral_segmentations(features, ks: Sequence[int] = DEFAULT_KS, *, key,
                           affinity: str = "clip",
                           num_iters: int = 30) -> np.ndarray:
  """K-way spectral clusterings of one feature map for several K.

  Args:
    features: float [h, w, D].
    ks: numbers of clusters (paper: 2, 3, 4, 5).
    key: jax PRNG key for k-means (K number i uses fold_in(key, i)).
    affinity: 'clip' or 'shift' (`cosine_affinity`).
    num_iters: Lloyd iterations.
  Returns:
    int32 [len(ks), h, w] label maps, map i with labels in [0, ks[i]).
  """
  import jax  # Local: only needed for the k-means.
  from odin_jax.discovery.kmeans import kmeans

  features = np.asarray(features)
  h, w = features.shape[:2]
  n = h * w
  ks = [min(int(k), n) for k in ks]
  embedding = spectral_embedding(cosine_affinity(features, affinity), max(ks))
  maps = []
  for i, k in enumerate(ks):
    rows = embedding[:, :k]
    rows = rows / np.maximum(np.linalg.norm(rows, axis=1, keepdims=True),
                             1e-12)
    assign, _ = kmeans(rows[None].astype(np.float32), k,
                       jax.random.fold_in(key, i), num_iters=num_iters)
    maps.append(np.asarray(assign[0], np.int32).reshape(h, w))
  return np.stack(maps)


def split_components(segment_map, connectivity: int = 2) -> np.ndarray:
  """Relabels a segmentation so that every connected component is a segment.

  Args:
    segment_map: int [H, W]; negative = unlabelled (stays -1).
    connectivity: 1 (4-neighbours) or 2 (8-neighbours).
  Returns:
    int32 [H, W] with labels 0..C-1, one per connected component of each
    original segment (components numbered segment by segment, in raster
    order within a segment).
  """
  segment_map = np.asarray(segment_map)
  structure = ndimage.generate_binary_structure(2, connectivity)
  out = np.full(segment_map.shape, -1, np.int32)
  offset = 0
  for label in np.unique(segment_map):
    if label < 0:
      continue
    mask = segment_map == label
    components, count = ndimage.label(mask, structure=structure)
    out[mask] = components[mask] - 1 + offset
    offset += count
  return out


def split_mask_components(mask, connectivity: int = 2) -> np.ndarray:
  """Connected components of one binary mask, as separate masks.

  Args:
    mask: bool [H, W].
    connectivity: 1 (4-neighbours) or 2 (8-neighbours).
  Returns:
    bool [C, H, W] (C = 0 for an empty mask).
  """
  structure = ndimage.generate_binary_structure(2, connectivity)
  components, count = ndimage.label(np.asarray(mask, bool),
                                    structure=structure)
  return components[None] == np.arange(1, count + 1)[:, None, None]


def instance_segmentations(features, ks: Sequence[int] = DEFAULT_KS, *, key,
                           image_hw: Sequence[int] | None = None,
                           affinity: str = "clip", split: bool = True,
                           connectivity: int = 2,
                           num_iters: int = 30) -> np.ndarray:
  """Spectral clusterings, components split, at image resolution.

  Every label of every returned map is one proposal (use them with
  `discovery.best_overlaps_from_segmentations` or `instance_recall`).

  Args:
    features: float [h, w, D].
    ks, key, affinity, num_iters: as in `spectral_segmentations`.
    image_hw: (H, W) for nearest upsampling; None keeps (h, w).
    split: split non-connected segments into components (paper: yes).
    connectivity: 1 or 2 (8-neighbours, default).
  Returns:
    int32 [len(ks), H, W].
  """
  maps = spectral_segmentations(features, ks, key=key, affinity=affinity,
                                num_iters=num_iters)
  if split:
    maps = np.stack([split_components(m, connectivity) for m in maps])
  if image_hw is not None:
    maps = discovery.resize_nearest(maps, image_hw)
  return maps


def co_occurrence_bins(gt_classes) -> np.ndarray:
  """Table 1 column of each instance: same-class instances in the image.

  Args:
    gt_classes: int [G].
  Returns:
    int [G] in 0..5, index into `CO_OCCURRENCE_BINS` (5 = '6+').
  """
  gt_classes = np.asarray(gt_classes).reshape(-1)
  _, inverse, counts = np.unique(gt_classes, return_inverse=True,
                                 return_counts=True)
  return np.minimum(counts[inverse.reshape(-1)], 6) - 1


def instance_best_overlaps(gt_instance_masks, gt_classes, proposals=None, *,
                           segment_maps=None):
  """Best overlap and co-occurrence column of each of one image's instances.

  Args:
    gt_instance_masks: bool [G, H, W] (empty masks are dropped).
    gt_classes: int [G].
    proposals: bool [P, H, W], or
    segment_maps: int [S, H, W] (every label a proposal); exactly one.
  Returns:
    (best float64 [G'] = max IoU over the proposals, bins int [G'] index
    into `CO_OCCURRENCE_BINS`), G' = the non-empty instances.
  """
  if (proposals is None) == (segment_maps is None):
    raise ValueError("pass exactly one of proposals and segment_maps")
  masks = np.asarray(gt_instance_masks, bool)
  classes = np.asarray(gt_classes).reshape(-1)
  nonempty = masks.reshape(masks.shape[0], -1).any(axis=1)
  masks, classes = masks[nonempty], classes[nonempty]
  if masks.shape[0] == 0:
    return np.zeros(0, np.float64), np.zeros(0, np.int64)
  if proposals is not None:
    best = discovery.best_overlaps(masks, proposals)
  else:
    best = discovery.best_overlaps_from_segmentations(masks, segment_maps)
  # Co-occurrence counts only the instances that are scored.
  return best, co_occurrence_bins(classes)


def _hits_by_bin(best, bins, thresholds) -> np.ndarray:
  """float64 [T, 6]: instances of each column recalled at each threshold."""
  hits = np.zeros((len(thresholds), len(CO_OCCURRENCE_BINS)), np.float64)
  for i, t in enumerate(thresholds):
    np.add.at(hits[i], bins, (best >= t).astype(np.float64))
  return hits


def instance_recall(gt_instance_masks, gt_classes, proposals=None, *,
                    segment_maps=None,
                    iou_thresholds: Sequence[float] = (IOU_THRESHOLD,)):
  """Recall hits of one image's instances, by co-occurrence column.

  Args:
    gt_instance_masks, gt_classes, proposals, segment_maps: as in
      `instance_best_overlaps`.
    iou_thresholds: an instance is recalled at threshold t if its best
      overlap >= t; hits are averaged over the thresholds (`AR_THRESHOLDS`
      gives each instance's contribution to AR).
  Returns:
    (hits float [6], totals int [6]) per column of `CO_OCCURRENCE_BINS`.
  """
  best, bins = instance_best_overlaps(gt_instance_masks, gt_classes,
                                      proposals, segment_maps=segment_maps)
  thresholds = np.asarray(iou_thresholds, np.float64)
  hits = _hits_by_bin(best, bins, thresholds).mean(axis=0)
  totals = np.bincount(bins, minlength=len(CO_OCCURRENCE_BINS)).astype(
      np.int64)
  return hits, totals


class InstanceRecallAccumulator:
  """Pools instance recall over a dataset, per co-occurrence column.

  Keeps hits at every threshold of `iou_thresholds` (default
  `AR_THRESHOLDS`) and at IoU 0.5, so one pass gives AR and R@0.5.
  """

  def __init__(self, iou_thresholds: Sequence[float] = AR_THRESHOLDS):
    self.iou_thresholds = tuple(float(t) for t in iou_thresholds)
    self._thresholds = self.iou_thresholds + (IOU_THRESHOLD,)
    self.hits = np.zeros((len(self._thresholds), len(CO_OCCURRENCE_BINS)),
                         np.float64)
    self.totals = np.zeros(len(CO_OCCURRENCE_BINS), np.int64)

  def update(self, gt_instance_masks, gt_classes, proposals=None, *,
             segment_maps=None):
    """Scores one image and adds it.

    Returns its (hits at IoU >= 0.5 float [6], totals int [6]).
    """
    best, bins = instance_best_overlaps(gt_instance_masks, gt_classes,
                                        proposals, segment_maps=segment_maps)
    hits = _hits_by_bin(best, bins, self._thresholds)
    totals = np.bincount(bins, minlength=len(CO_OCCURRENCE_BINS))
    self.hits += hits
    self.totals += totals
    return hits[-1], totals.astype(np.int64)

  def result(self) -> dict:
    """Per column name in `CO_OCCURRENCE_BINS` and 'all' (NaN when empty):
    'ar_<col>' mean over `iou_thresholds` of recall (the headline),
    'recall_<col>' recall at IoU >= 0.5; and 'count_<col>' instances."""
    out = {}
    ar_hits = self.hits[:-1].mean(axis=0)   # [6], averaged over thresholds
    r50_hits = self.hits[-1]
    total = int(self.totals.sum())
    for i, name in enumerate(CO_OCCURRENCE_BINS):
      n = self.totals[i]
      out[f"ar_{name}"] = ar_hits[i] / n if n else math.nan
      out[f"recall_{name}"] = r50_hits[i] / n if n else math.nan
      out[f"count_{name}"] = int(n)
    out["ar_all"] = ar_hits.sum() / total if total else math.nan
    out["recall_all"] = r50_hits.sum() / total if total else math.nan
    return out
