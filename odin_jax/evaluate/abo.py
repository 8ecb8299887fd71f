"""Object discovery metrics: average best overlap (ABO) and object recovery.

Protocol (Odin §3.2 and App. A.4):
  * Features of an image (a 32x32 ResNet grid, 256x256 FPN projections z,
    ...) are L2-normalised and clustered with k-means for each K in
    {1, 2, 4, ..., 128}: 1 + 2 + ... + 128 = 255 object proposals, resized to
    the input image resolution (nearest neighbour here).
  * For a ground-truth segment g, the best overlap is
      BO(g) = max_m IoU(g, m)   over all proposals m          (App. A.4, (9))
    with IoU(g, m) = |g ∩ m| / |g ∪ m|                          ((8)).
  * Per image, ABO = mean of BO over the ground-truth segments ((10)) and
    OR = fraction of segments with BO > 0.5 ((11), strictly greater).
    ABO^i (and OR) use instance masks; ABO^c merges the instances of one
    class into one segment first. Table 4 reports OR for instances only;
    `or_class` is the same rule on merged masks, reported for completeness.
  * Metrics are averaged per image, then over images (`DiscoveryAccumulator`).

Ground-truth segments with no pixel (e.g. instances fully occluded after
cropping) are dropped; an image without any non-empty segment contributes
nothing (its metrics are NaN and the accumulator skips them).

Proposals can be given two ways:
  * `proposals` bool [P, H, W]: arbitrary, possibly overlapping masks
    (`best_overlaps`, intersections by matrix products over chunks of P).
  * `segment_maps` int [S, H, W]: S segmentations of the image, each a label
    map (labels >= 0; negative = unlabelled). Every label of every map is one
    proposal. This is how k-means / FH / SLIC / grid masks come, and it needs
    no [P, H, W] array: intersections are counted with one bincount per map
    (`best_overlaps_from_segmentations`). Both give identical numbers.

`run(ctx)` is the evaluation (k-means proposals from
`clustering.kmeans_segmentations`, or a mask source's own segmentation, on
the demo scenes, then COCO / a folder when configured); the mask sets of
eval.mask_baselines (FH / SLIC / grid, parameters from config.masks; a 1x1
grid becomes 5x5) are scored as proposals too: 'discovery/<m>/...' (DetCon
Fig. 7's axis).

Counting is exact: products run in float32 only while H*W < 2^24 (float32
integers are exact below that), in float64 otherwise.
"""

from __future__ import annotations

import math

import numpy as np

from odin_jax.evaluate import clustering
from odin_jax.evaluate import context as context_lib
# Odin App. A.4, eq. (11): a segment counts as recovered when BO > 0.5.
RECOVERY_THRESHOLD = 0.5

METRIC_KEYS = ("abo_instance", "abo_class", "or_instance", "or_class")


def _flat_float(masks: np.ndarray) -> np.ndarray:
  """bool [M, H, W] -> float [M, H*W] (float32 when counts stay exact)."""
  masks = np.asarray(masks)
  num_pixels = int(np.prod(masks.shape[1:]))
  dtype = np.float32 if num_pixels < 2**24 else np.float64
  return masks.reshape(masks.shape[0], num_pixels).astype(dtype)


def iou_matrix(masks_a, masks_b, chunk_size: int = 128) -> np.ndarray:
  """Pairwise IoU of two sets of binary masks.

  Args:
    masks_a: bool [A, H, W].
    masks_b: bool [B, H, W].
    chunk_size: masks of b processed per matrix product (bounds memory to
      chunk_size * H * W floats).
  Returns:
    float64 [A, B]; IoU of two empty masks is 0.
  """
  masks_a = np.asarray(masks_a, bool)
  masks_b = np.asarray(masks_b, bool)
  if masks_a.shape[1:] != masks_b.shape[1:]:
    raise ValueError(f"mask sizes differ: {masks_a.shape} vs {masks_b.shape}")
  flat_a = _flat_float(masks_a)
  area_a = flat_a.sum(axis=1, dtype=np.float64)
  out = np.zeros((masks_a.shape[0], masks_b.shape[0]), np.float64)
  for start in range(0, masks_b.shape[0], chunk_size):
    flat_b = _flat_float(masks_b[start:start + chunk_size])
    # [B, HW] @ [HW, A], transposed: OpenBLAS is ~100x slower on the
    # equivalent flat_a @ flat_b.T when A is small.
    inter = (flat_b @ flat_a.T).T.astype(np.float64)
    union = area_a[:, None] + flat_b.sum(axis=1, dtype=np.float64)[None] - inter
    out[:, start:start + flat_b.shape[0]] = np.where(
        union > 0, inter / np.maximum(union, 1.0), 0.0)
  return out


def best_overlaps(gt_masks, proposals, chunk_size: int = 128) -> np.ndarray:
  """Best overlap BO(g) = max over proposals of IoU(g, proposal).

  Args:
    gt_masks: bool [G, H, W] ground-truth segments.
    proposals: bool [P, H, W] proposals (P may be in the hundreds at 224^2
      or more; they are processed chunk_size at a time).
    chunk_size: proposals per matrix product.
  Returns:
    float64 [G] in [0, 1]; 0 for every g when P == 0.
  """
  gt_masks = np.asarray(gt_masks, bool)
  proposals = np.asarray(proposals, bool)
  if gt_masks.ndim != 3 or proposals.ndim != 3:
    raise ValueError(f"expected [G, H, W] and [P, H, W], got {gt_masks.shape} "
                     f"and {proposals.shape}")
  best = np.zeros(gt_masks.shape[0], np.float64)
  for start in range(0, proposals.shape[0], chunk_size):
    ious = iou_matrix(gt_masks, proposals[start:start + chunk_size],
                      chunk_size=chunk_size)
    if ious.size:
      best = np.maximum(best, ious.max(axis=1))
  return best


def best_overlaps_from_segmentations(gt_masks, segment_maps) -> np.ndarray:
  """Best overlaps when every label of every segmentation is a proposal.

  Equal to `best_overlaps(gt_masks, proposals)` with proposals = all the
  masks {segment_maps[s] == l}, without building them: per map, the
  intersections |g ∩ {label l}| of all g and l come from one bincount.

  Args:
    gt_masks: bool [G, H, W] (may overlap each other).
    segment_maps: int [S, H, W] or [H, W]; labels >= 0 are segments,
      negative labels are unlabelled pixels (in no proposal).
  Returns:
    float64 [G].
  """
  gt_masks = np.asarray(gt_masks, bool)
  segment_maps = np.asarray(segment_maps)
  if segment_maps.ndim == 2:
    segment_maps = segment_maps[None]
  if segment_maps.shape[1:] != gt_masks.shape[1:]:
    raise ValueError(f"segment maps {segment_maps.shape} do not match gt "
                     f"masks {gt_masks.shape}")
  num_gt = gt_masks.shape[0]
  flat_gt = gt_masks.reshape(num_gt, -1)
  gt_index, pixel_index = np.nonzero(flat_gt)
  gt_area = flat_gt.sum(axis=1).astype(np.float64)
  best = np.zeros(num_gt, np.float64)
  for seg in segment_maps:
    seg = seg.reshape(-1).astype(np.int64)
    if seg.size == 0 or seg.max(initial=-1) < 0:
      continue
    num_labels = int(seg.max()) + 1
    seg_area = np.bincount(seg[seg >= 0], minlength=num_labels)
    labels = seg[pixel_index]
    keep = labels >= 0
    inter = np.bincount(gt_index[keep] * num_labels + labels[keep],
                        minlength=num_gt * num_labels)
    inter = inter.reshape(num_gt, num_labels).astype(np.float64)
    union = gt_area[:, None] + seg_area[None].astype(np.float64) - inter
    iou = np.where(union > 0, inter / np.maximum(union, 1.0), 0.0)
    best = np.maximum(best, iou.max(axis=1))
  return best


def merge_by_class(instance_masks, classes):
  """Unions of the instance masks of each class (for ABO^c).

  Args:
    instance_masks: bool [G, H, W].
    classes: int [G], class of each instance.
  Returns:
    (class_masks bool [C, H, W], class_ids int [C]) with class_ids the sorted
    distinct classes.
  """
  instance_masks = np.asarray(instance_masks, bool)
  classes = np.asarray(classes).reshape(-1)
  if classes.shape[0] != instance_masks.shape[0]:
    raise ValueError(f"{classes.shape[0]} classes for "
                     f"{instance_masks.shape[0]} masks")
  class_ids = np.unique(classes)
  class_masks = np.stack(
      [instance_masks[classes == c].any(axis=0) for c in class_ids]
  ) if class_ids.size else np.zeros((0,) + instance_masks.shape[1:], bool)
  return class_masks, class_ids


def instance_masks_from_maps(instance_map, class_map=None, background: int = 0):
  """Instance masks from an instance-id map (e.g. the demo scenes').

  Args:
    instance_map: int [H, W], `background` for no object, other ids objects.
    class_map: optional int [H, W] class per pixel; an instance takes the
      most frequent class under it. Without it every instance is class 1.
    background: the id of background pixels.
  Returns:
    (masks bool [G, H, W], classes int [G]) over the ids present, ascending.
  """
  instance_map = np.asarray(instance_map)
  ids = np.unique(instance_map)
  ids = ids[ids != background]
  masks = instance_map[None] == ids[:, None, None]
  if class_map is None:
    classes = np.ones(len(ids), np.int64)
  else:
    class_map = np.asarray(class_map)
    classes = np.array([np.bincount(class_map[m].astype(np.int64)).argmax()
                        for m in masks], np.int64)
  return masks, classes


def _abo_or(best: np.ndarray, threshold: float) -> tuple[float, float]:
  if best.size == 0:
    return math.nan, math.nan
  return float(best.mean()), float((best > threshold).mean())


def discovery_metrics(gt_instance_masks, gt_classes, proposals=None, *,
                      segment_maps=None,
                      threshold: float = RECOVERY_THRESHOLD) -> dict:
  """ABO^i, ABO^c, OR^i, OR^c of one image (Odin App. A.4).

  Args:
    gt_instance_masks: bool [G, H, W] instance masks (empty ones dropped).
    gt_classes: int [G] class of each instance (for ABO^c).
    proposals: bool [P, H, W] proposals, or
    segment_maps: int [S, H, W] segmentations whose labels are the proposals
      (exactly one of the two).
    threshold: OR counts segments with BO > threshold.
  Returns:
    {'abo_instance', 'abo_class', 'or_instance', 'or_class'} floats in [0, 1]
    (NaN when the image has no non-empty segment), plus 'num_instances' and
    'num_classes' (ints).
  """
  if (proposals is None) == (segment_maps is None):
    raise ValueError("pass exactly one of proposals and segment_maps")
  gt_instance_masks = np.asarray(gt_instance_masks, bool)
  gt_classes = np.asarray(gt_classes).reshape(-1)
  nonempty = gt_instance_masks.reshape(gt_instance_masks.shape[0], -1).any(1)
  gt_instance_masks = gt_instance_masks[nonempty]
  gt_classes = gt_classes[nonempty]
  class_masks, _ = merge_by_class(gt_instance_masks, gt_classes)
  if proposals is not None:
    overlaps = lambda g: best_overlaps(g, proposals)
  else:
    overlaps = lambda g: best_overlaps_from_segmentations(g, segment_maps)
  abo_i, or_i = _abo_or(overlaps(gt_instance_masks), threshold)
  abo_c, or_c = _abo_or(overlaps(class_masks), threshold)
  return {"abo_instance": abo_i, "abo_class": abo_c, "or_instance": or_i,
          "or_class": or_c, "num_instances": int(gt_instance_masks.shape[0]),
          "num_classes": int(class_masks.shape[0])}


class DiscoveryAccumulator:
  """Averages per-image discovery metrics over images (Odin App. A.4).

  Each image counts once, whatever its number of segments; images whose
  metrics are NaN (no ground-truth segment) are skipped.
  """

  def __init__(self):
    self._sums = {k: 0.0 for k in METRIC_KEYS}
    self._counts = {k: 0 for k in METRIC_KEYS}

  def add(self, metrics: dict) -> None:
    """Adds one image's `discovery_metrics` output."""
    for k in METRIC_KEYS:
      value = float(metrics[k])
      if not math.isnan(value):
        self._sums[k] += value
        self._counts[k] += 1

  def update(self, gt_instance_masks, gt_classes, proposals=None, *,
             segment_maps=None, threshold: float = RECOVERY_THRESHOLD) -> dict:
    """Scores one image, adds it, and returns its metrics."""
    metrics = discovery_metrics(gt_instance_masks, gt_classes, proposals,
                                segment_maps=segment_maps, threshold=threshold)
    self.add(metrics)
    return metrics

  @property
  def num_images(self) -> int:
    return self._counts["abo_instance"]

  def result(self) -> dict:
    """Means over images ({key: float, NaN if none}) and 'num_images'."""
    out = {k: (self._sums[k] / self._counts[k] if self._counts[k] else math.nan)
           for k in METRIC_KEYS}
    out["num_images"] = self.num_images
    return out


def score(scenes, maps, acc: DiscoveryAccumulator | None = None) -> dict:
  """maps int [N, S', H, W] (S' segmentations of each of the N scenes) ->
  `DiscoveryAccumulator.result()` over these scenes (or over everything
  `acc` has seen when one is passed)."""
  acc = acc if acc is not None else DiscoveryAccumulator()
  for i in range(len(maps)):
    masks, classes = scenes.gt(i)
    acc.update(masks, classes, segment_maps=maps[i])
  return acc.result()


def _named(prefix: str, result: dict) -> context_lib.Output:
  return context_lib.Output(
      metrics={f"{prefix}/{k}": float(result[k]) for k in METRIC_KEYS},
      info={f"{prefix}/num_images": int(result["num_images"])})


def kmeans_maps(ctx, feats, key, image_hw, ks=None) -> np.ndarray:
  """Odin App. A.4 segmentations int32 [N, len(ks), H, W] of feats [N, h, w,
  D] (ks default: every usable eval.discovery_ks), by one k-means program
  per grid (K_max = the grid's largest usable K)."""
  usable = ctx.ks(feats.shape[1:3])
  return clustering.kmeans_segmentations(
      feats, usable if ks is None else ks, key=key, image_hw=image_hw,
      batch_size=ctx.settings.batch_size, k_max=max(usable))


def run(ctx) -> context_lib.Output:
  """Object discovery (Odin App. A.4) on the demo scenes (+ mask sets,
  COCO and a folder when configured)."""
  s = ctx.settings
  scenes = ctx.scenes(s.num_images)
  hw = scenes.instances.shape[1:]
  out = context_lib.Output()
  if ctx.features is not None:
    feats = ctx.scene_features(s.num_images)
    ks = ctx.ks(feats.shape[1:3])
    maps = kmeans_maps(ctx, feats, ctx.stream("discovery"), hw)
    out.info.update({"discovery/ks": list(ks),
                     "discovery/grid": list(feats.shape[1:3]),
                     "discovery/num_proposals": int(sum(ks)),
                     "discovery/feature": ctx.features.feature})
    baselines = tuple(s.mask_baselines)
  else:
    maps = scenes.segments(ctx.mask_method)[:, None]
    baselines = ()
  out.update(_named("discovery", score(scenes, maps)))
  for method in baselines:
    result = score(scenes, scenes.segments(method)[:, None])
    out.update(_named(f"discovery/{method}", result))
  accs = {}
  for prefix, c, chunk, feats in ctx.scene_chunks("discovery", out):
    maps = kmeans_maps(ctx, feats, ctx.stream("discovery", c),
                       chunk.instances.shape[1:])
    acc = accs.setdefault(prefix, DiscoveryAccumulator())
    out.update(_named(f"{prefix}/discovery", score(chunk, maps, acc)))
  return out

