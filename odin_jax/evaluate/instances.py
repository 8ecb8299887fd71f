"""Instance-recall analysis: which instances can a feature map separate?

Protocol of the instance-segmentation analysis paper ("Understanding
Self-Supervised Features for Learning Unsupervised Instance Segmentation"),
§3 and App. A.2.1:
  1. Affinity between the cells of one image's feature map = cosine
     similarity of their features.
  2. K-way spectral clustering of that affinity, for several K, all masks
     accumulated. The paper uses K in {2, 3, 4, 5} ("14 overlapping masks per
     image", App. A.2.1 and Table 4 of its appendix) ->
     `clustering.SPECTRAL_KS`.
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
    (`odin_jax.kmeans`). One eigendecomposition serves all K.
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

The proposals come from `clustering.instance_segmentations` (all images
and K by one compiled k-means); `run(ctx)` is the evaluation on the demo
scenes (and COCO / a folder when configured). Grids with more than
eval.spectral_max_cells cells are area-pooled first (`grids.pool_cells`).

Cost: the affinity is dense, (h*w)^2 floats: fine up to ~64x64 grids
(4096 cells: 64 MB and a partial eigendecomposition of a 4096x4096 matrix).
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np

from odin_jax.evaluate import clustering
from odin_jax.evaluate import context as context_lib
from odin_jax.evaluate import abo as discovery
from odin_jax.evaluate import grids

IOU_THRESHOLD = 0.5
# COCO's AR grid: IoU 0.50, 0.55, ..., 0.95.
AR_THRESHOLDS = tuple(round(0.5 + 0.05 * i, 2) for i in range(10))
# Table 1's columns: 1, 2, 3, 4, 5 and 6+ same-class instances in the image.
CO_OCCURRENCE_BINS = ("1", "2", "3", "4", "5", "6+")


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


def score(prefix: str, scenes, maps_fn, acc=None) -> context_lib.Output:
  """Adds scenes' instances (proposals maps_fn(i) int [S', H, W]) to acc
  (default: a new one) and returns the metrics of everything acc holds:
  '<prefix>/ar_<col>' (AR over IoU 0.5:0.95, the headline) and
  '<prefix>/recall_<col>' (R@0.5), col in 1..5, 6+, all."""
  acc = acc if acc is not None else InstanceRecallAccumulator()
  for i in range(len(scenes)):
    masks, classes = scenes.gt(i)
    acc.update(masks, classes, segment_maps=maps_fn(i))
  result = acc.result()
  out = context_lib.Output()
  # Columns without any instance (NaN) go to info only, not to the curves.
  for kind in ("ar", "recall"):
    for name in CO_OCCURRENCE_BINS + ("all",):
      value = float(result[f"{kind}_{name}"])
      if math.isfinite(value):
        out.metrics[f"{prefix}/{kind}_{name}"] = value
  for name in CO_OCCURRENCE_BINS:
    out.info[f"{prefix}/count_{name}"] = int(result[f"count_{name}"])
  return out


def instance_feature(ctx) -> str:
  """The feature instance recall clusters (eval.instance_feature): 'auto' =
  a ViT's last-block attention keys ('keys', the paper's §3), else the
  discovery features."""
  name = ctx.settings.instance_feature
  if name != "auto":
    return name
  if ctx.config.model.get("backbone", "resnet") == "vit":
    return "keys"
  return ctx.features.feature


def _features(ctx, images, discovery_feats):
  """Features [N, h, w, D] for instance recall: discovery_feats when the
  feature is the same, else another pass of the same network."""
  feature = instance_feature(ctx)
  if feature == ctx.features.feature:
    return discovery_feats
  return ctx.features.with_feature(feature)(images)


def proposals(ctx, feats, key, image_hw):
  """Pooled spectral proposals int32 [N, len(spectral_ks), H, W] of feats
  [N, h, w, D], and the pooled grid (h', w')."""
  s = ctx.settings
  pooled = np.stack([grids.pool_cells(f, s.spectral_max_cells)
                     for f in feats])
  maps = clustering.instance_segmentations(
      pooled, s.spectral_ks, key=key, image_hw=image_hw,
      batch_size=s.batch_size)
  return maps, pooled.shape[1:3]


def run(ctx) -> context_lib.Output:
  """Instance recall by same-class co-occurrence (spectral clustering) on
  the demo scenes (+ COCO and a folder when configured)."""
  s = ctx.settings
  scenes = ctx.scenes(s.num_images)
  if ctx.features is None:
    segs = scenes.segments(ctx.mask_method)
    return score("instances", scenes,
                 lambda i: clustering.split_components(segs[i])[None])
  feats = _features(ctx, scenes.images, ctx.scene_features(s.num_images))
  maps, grid = proposals(ctx, feats, ctx.stream("instances"),
                         scenes.instances.shape[1:])
  out = score("instances", scenes, lambda i: maps[i])
  out.info["instances/grid"] = list(grid)
  out.info["instances/ks"] = list(s.spectral_ks)
  out.info["instances/feature"] = instance_feature(ctx)
  accs = {}
  for prefix, c, chunk, feats in ctx.scene_chunks("instances", out):
    maps, grid = proposals(ctx, _features(ctx, chunk.images, feats),
                           ctx.stream("instances", c),
                           chunk.instances.shape[1:])
    acc = accs.setdefault(prefix, InstanceRecallAccumulator())
    out.update(score(f"{prefix}/instances", chunk, lambda i: maps[i], acc))
    out.info[f"{prefix}/instances/grid"] = list(grid)
    out.info[f"{prefix}/instances/feature"] = instance_feature(ctx)
  return out
