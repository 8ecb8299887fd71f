"""Tests of the evaluation metric library (odin_jax/evaluate/*)."""

from __future__ import annotations

import math

import jax
import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

from odin_jax import numerics
from odin_jax.evaluate import clips
from odin_jax.evaluate import clustering
from odin_jax.evaluate import abo as discovery
from odin_jax.evaluate import grids
from odin_jax.evaluate import instances
from odin_jax.evaluate import knn
from odin_jax.evaluate import pictures
from odin_jax.evaluate import probes
from odin_jax.evaluate import video
from odin_jax.evaluate import video_metrics


def _box(h, w, y0, y1, x0, x1):
  m = np.zeros((h, w), bool)
  m[y0:y1, x0:x1] = True
  return m


# --- Object discovery ---------------------------------------------------


def test_best_overlaps_hand_computed():
  gt = np.stack([_box(4, 4, 0, 2, 0, 2),    # top-left 2x2, 4 px
                 _box(4, 4, 0, 4, 2, 4)])   # right half, 8 px
  proposals = np.stack([
      _box(4, 4, 0, 1, 0, 4),  # top row: IoU 2/6 with gt0, 2/10 with gt1
      _box(4, 4, 0, 4, 0, 2),  # left half: IoU 4/8 with gt0, 0 with gt1
      _box(4, 4, 0, 3, 2, 4),  # 3x2 on the right: 0 with gt0, 6/8 with gt1
  ])
  np.testing.assert_allclose(
      discovery.iou_matrix(gt, proposals),
      [[1 / 3, 0.5, 0.0], [0.2, 0.0, 0.75]])
  np.testing.assert_allclose(discovery.best_overlaps(gt, proposals),
                             [0.5, 0.75])
  # Chunking must not change anything.
  np.testing.assert_allclose(
      discovery.best_overlaps(gt, proposals, chunk_size=1), [0.5, 0.75])
  m = discovery.discovery_metrics(gt, np.array([1, 2]), proposals)
  assert m["abo_instance"] == pytest.approx(0.625)
  # OR counts BO > 0.5 strictly (Odin eq. 11): gt0's BO of exactly 0.5 fails.
  assert m["or_instance"] == pytest.approx(0.5)
  assert m["num_instances"] == 2 and m["num_classes"] == 2


def test_segmentation_overlaps_match_explicit_proposals():
  rng = np.random.default_rng(0)
  gt = rng.random((5, 24, 20)) < 0.3
  gt[4] = False  # an empty segment
  maps = rng.integers(-1, 6, size=(3, 24, 20))
  proposals = np.concatenate([clustering.segments_to_proposals(m)
                              for m in maps])
  np.testing.assert_allclose(
      discovery.best_overlaps_from_segmentations(gt, maps),
      discovery.best_overlaps(gt, proposals))
  assert discovery.best_overlaps_from_segmentations(gt, maps)[4] == 0.0


def test_perfect_proposals_score_one():
  rng = np.random.default_rng(1)
  instance_map = np.zeros((32, 32), np.int64)
  instance_map[2:12, 3:15] = 1
  instance_map[15:30, 5:12] = 2
  instance_map[18:28, 16:30] = 3
  masks, classes = discovery.instance_masks_from_maps(instance_map)
  classes = np.array([1, 2, 3])
  junk = rng.random((10, 32, 32)) < 0.5
  metrics = discovery.discovery_metrics(
      masks, classes, np.concatenate([junk, masks]))
  for key in discovery.METRIC_KEYS:
    assert metrics[key] == pytest.approx(1.0), key
  # The same through segment maps: the instance map itself is a proposal set.
  metrics = discovery.discovery_metrics(masks, classes,
                                        segment_maps=instance_map[None])
  assert metrics["abo_instance"] == pytest.approx(1.0)


def test_abo_class_merges_same_class_instances():
  left = _box(8, 16, 0, 4, 0, 4)     # class 1, 16 px
  right = _box(8, 16, 0, 4, 12, 16)  # class 1, 16 px
  other = _box(8, 16, 5, 8, 0, 16)   # class 2
  gt = np.stack([left, right, other])
  classes = np.array([1, 1, 2])
  class_masks, class_ids = discovery.merge_by_class(gt, classes)
  np.testing.assert_array_equal(class_ids, [1, 2])
  np.testing.assert_array_equal(class_masks[0], left | right)
  np.testing.assert_array_equal(class_masks[1], other)
  # Instance-exact proposals: perfect ABO^i; the merged class-1 segment is
  # only half covered by its best proposal (IoU 16/32).
  m = discovery.discovery_metrics(gt, classes, gt)
  assert m["abo_instance"] == pytest.approx(1.0)
  assert m["abo_class"] == pytest.approx((0.5 + 1.0) / 2)
  assert m["or_class"] == pytest.approx(0.5)
  # Class-exact proposals: the reverse.
  m = discovery.discovery_metrics(gt, classes, class_masks)
  assert m["abo_class"] == pytest.approx(1.0)
  assert m["abo_instance"] == pytest.approx((0.5 + 0.5 + 1.0) / 3)


def test_accumulator_averages_per_image_then_over_images():
  acc = discovery.DiscoveryAccumulator()
  one = _box(4, 4, 0, 2, 0, 2)
  acc.update(one[None], [1], one[None])  # ABO 1
  gts = np.stack([_box(4, 4, 0, 1, 0, 1), _box(4, 4, 3, 4, 3, 4),
                  _box(4, 4, 2, 3, 0, 1)])
  acc.update(gts, [1, 2, 3], gts[:1])  # ABO 1/3
  # An image without (non-empty) ground truth is skipped, not counted as 0.
  m = acc.update(np.zeros((1, 4, 4), bool), [1], one[None])
  assert math.isnan(m["abo_instance"])
  res = acc.result()
  assert res["num_images"] == 2
  # Per image then over images: (1 + 1/3) / 2, not pooled (1 + 1) / 4.
  assert res["abo_instance"] == pytest.approx(2 / 3)
  assert res["or_instance"] == pytest.approx(2 / 3)


def test_segments_to_proposals_and_resize():
  seg = np.array([[0, 0, 2], [-1, 2, 2]])
  props = clustering.segments_to_proposals(seg)
  assert props.shape == (2, 2, 3)
  np.testing.assert_array_equal(props[1], seg == 2)
  fixed = clustering.segments_to_proposals(seg, num_segments=3)
  assert fixed.shape == (3, 2, 3) and not fixed[1].any()
  up = numerics.resize_nearest(np.array([[1, 2], [3, 4]]), (4, 6))
  np.testing.assert_array_equal(up, np.kron([[1, 2], [3, 4]],
                                            np.ones((2, 3), int)))
  np.testing.assert_allclose(grids.area_matrix(2, 3),
                             [[2 / 3, 1 / 3, 0], [0, 1 / 3, 2 / 3]])


def test_kmeans_proposals_recover_feature_blobs():
  rng = np.random.default_rng(2)
  feats = np.zeros((4, 4, 8), np.float32)
  feats[:, :2, 0] = 1.0
  feats[:, 2:, 1] = 1.0
  feats += 0.01 * rng.normal(size=feats.shape).astype(np.float32)
  props = clustering.kmeans_proposals(feats, (1, 2), key=jax.random.PRNGKey(0),
                                     image_hw=(8, 8))
  assert props.shape == (3, 8, 8) and props.dtype == bool
  assert props[0].all()  # K = 1: the whole image
  assert (props[1] ^ props[2]).all()  # K = 2: a partition ...
  left = _box(8, 8, 0, 8, 0, 4)
  gt = np.stack([left, ~left])
  # ... into exactly the two blobs (in either order).
  np.testing.assert_allclose(discovery.best_overlaps(gt, props), [1.0, 1.0])


def test_kmeans_clusters_directions_not_norms():
  # Odin App. A.4 clusters L2-normalised vectors: a long and a short vector
  # in the same direction belong together.
  feats = np.zeros((4, 4, 8), np.float32)
  feats[:, 0, 0] = 0.1   # direction e0, short
  feats[:, 1, 1] = 0.1   # direction e1, short
  feats[:, 2:, 0] = 10.0  # direction e0, long
  maps = clustering.kmeans_segmentations(feats, (2,),
                                        key=jax.random.PRNGKey(3))
  assert maps.shape == (1, 4, 4)
  seg = maps[0]
  assert len(np.unique(seg[:, [0, 2, 3]])) == 1
  assert np.unique(seg[:, 1]).tolist() != np.unique(seg[:, 0]).tolist()


def test_batched_kmeans_one_program_for_every_k_and_batch():
  """What the evaluations run: every image and K by one k-means compiled
  for (batch, points, K_max); K < K_max runs as num_active, so map i has
  exactly ks[i] clusters on separable data, and the padded last batch
  leaves the real images' labels alone (deterministic given the key)."""
  rng = np.random.default_rng(0)
  centres = 20.0 * np.eye(8, dtype=np.float32)[:5]
  points = np.stack([centres[np.arange(20) % 5] + rng.standard_normal(
      (20, 8)).astype(np.float32) for _ in range(5)])      # [5, 20, 8]
  ks = (1, 3, 5)
  maps = clustering.kmeans_label_maps(points, ks, jax.random.PRNGKey(0),
                                      batch_size=2, k_max=5)
  assert maps.shape == (5, 3, 20) and maps.dtype == np.int32
  for i, k in enumerate(ks):
    assert maps[:, i].max() < k
  # K = 5 recovers the five blobs in every image, padded one included.
  for image in maps[:, 2]:
    assert len(np.unique(image)) == 5
    assert len({(c, l) for c, l in zip(np.arange(20) % 5, image)}) == 5
  again = clustering.kmeans_label_maps(points, ks, jax.random.PRNGKey(0),
                                       batch_size=2, k_max=5)
  np.testing.assert_array_equal(maps, again)
  with pytest.raises(ValueError, match="k_max"):
    clustering.kmeans_label_maps(points, (6,), jax.random.PRNGKey(0),
                                 k_max=5)


# --- Instance-recall analysis -------------------------------------------


def test_spectral_clustering_separates_two_blobs():
  rng = np.random.default_rng(3)
  feats = rng.normal(scale=0.1, size=(6, 6, 16)).astype(np.float32)
  blob = np.zeros((6, 6), bool)
  blob[1:4, 1:5] = True  # an irregular region, not a half-plane
  feats[blob, 0] += 1.0
  feats[~blob, 1] += 1.0
  maps = clustering.spectral_segmentations(feats, (2,),
                                          key=jax.random.PRNGKey(1))
  assert maps.shape == (1, 6, 6)
  inside = np.unique(maps[0][blob])
  outside = np.unique(maps[0][~blob])
  assert len(inside) == 1 and len(outside) == 1 and inside[0] != outside[0]


def test_cosine_affinity_clip_and_shift():
  x = np.array([[2.0, 0.0], [-1.0, 0.0], [0.0, 3.0]])
  np.testing.assert_allclose(clustering.cosine_affinity(x, "clip"), np.eye(3))
  np.testing.assert_allclose(
      clustering.cosine_affinity(x, "shift"),
      [[1.0, 0.0, 0.5], [0.0, 1.0, 0.5], [0.5, 0.5, 1.0]])


def test_spectral_embedding_of_disconnected_graph():
  affinity = np.zeros((6, 6))
  affinity[:3, :3] = 1.0
  affinity[3:, 3:] = 1.0
  vectors = clustering.spectral_embedding(affinity, 2)
  # Both leading eigenvectors (eigenvalue 1) are constant on each component.
  for v in vectors.T:
    assert np.ptp(v[:3]) < 1e-9 and np.ptp(v[3:]) < 1e-9
  rows = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
  assert np.abs(rows[0] @ rows[4]) < 1e-9  # the two groups are orthogonal
  # Connected graph: the first column is the top eigenvector D^1/2 1 / norm
  # (eigenvalue 1 of D^-1/2 W D^-1/2, the Laplacian's null vector).
  rng = np.random.default_rng(9)
  x = rng.random((10, 3))
  affinity = clustering.cosine_affinity(x)
  vectors = clustering.spectral_embedding(affinity, 3)
  root_degree = np.sqrt(affinity.sum(1))
  np.testing.assert_allclose(np.abs(vectors[:, 0]),
                             root_degree / np.linalg.norm(root_degree),
                             atol=1e-8)
  np.testing.assert_allclose(vectors.T @ vectors, np.eye(3), atol=1e-8)


def test_component_splitting_splits_disconnected_blobs():
  seg = np.zeros((8, 8), np.int64)
  seg[1:3, 1:3] = 1
  seg[5:7, 4:7] = 1  # the same label, not connected to the first blob
  out = clustering.split_components(seg)
  assert len(np.unique(out)) == 3  # background + two blobs
  assert len(np.unique(out[1:3, 1:3])) == 1
  assert out[1, 1] != out[5, 4]
  assert len(np.unique(out[seg == 0])) == 1
  # Diagonal contact: one component with 8-connectivity, two with 4.
  diag = np.eye(3, dtype=bool)
  assert clustering.split_mask_components(diag, connectivity=2).shape[0] == 1
  comps = clustering.split_mask_components(diag, connectivity=1)
  assert comps.shape == (3, 3, 3)
  np.testing.assert_array_equal(comps.sum(0), diag)


def test_split_components_recover_same_class_instances():
  # Two instances with identical features: K=2 spectral clustering groups
  # them; only component splitting separates them (the paper's App. A.3).
  rng = np.random.default_rng(10)
  feats = rng.normal(scale=0.05, size=(6, 6, 8)).astype(np.float32)
  a = _box(6, 6, 0, 2, 0, 2)  # 4 cells
  b = _box(6, 6, 3, 5, 2, 5)  # 6 cells
  feats[a | b, 0] += 1.0
  feats[~(a | b), 1] += 1.0
  gt = np.stack([np.kron(m, np.ones((2, 2), bool)) for m in (a, b)])
  key = jax.random.PRNGKey(2)
  whole = clustering.instance_segmentations(feats, (2,), key=key,
                                           image_hw=(12, 12), split=False)
  split = clustering.instance_segmentations(feats, (2,), key=key,
                                           image_hw=(12, 12))
  assert whole.shape == split.shape == (1, 12, 12)
  assert len(np.unique(whole)) == 2 and len(np.unique(split)) == 3
  hits, totals = instances.instance_recall(gt, [1, 1], segment_maps=whole)
  assert totals[1] == 2 and hits[1] == 1  # only b: IoU 24/40 >= 0.5
  hits, _ = instances.instance_recall(gt, [1, 1], segment_maps=split)
  assert hits[1] == 2


def test_instance_recall_by_co_occurrence():
  a = _box(10, 10, 0, 3, 0, 3)
  b = _box(10, 10, 0, 3, 6, 9)
  c = _box(10, 10, 6, 10, 0, 10)
  gt = np.stack([a, b, c])
  classes = np.array([7, 7, 4])  # two of class 7, one of class 4
  np.testing.assert_array_equal(instances.co_occurrence_bins(classes),
                                [1, 1, 0])
  # The mask spanning both class-7 instances recalls neither (IoU 9/30);
  # `a` is also proposed exactly, `b` is missed; `c` is exact.
  merged = _box(10, 10, 0, 3, 0, 10)
  acc = instances.InstanceRecallAccumulator()
  hits, totals = acc.update(gt, classes, np.stack([merged, c, a]))
  np.testing.assert_array_equal(totals, [1, 2, 0, 0, 0, 0])
  np.testing.assert_allclose(hits, [1, 1, 0, 0, 0, 0])
  res = acc.result()
  assert res["recall_1"] == 1.0 and res["recall_2"] == 0.5
  assert math.isnan(res["recall_3"]) and res["count_2"] == 2
  assert res["recall_all"] == pytest.approx(2 / 3)
  # Seven instances of one class land in the 6+ column.
  np.testing.assert_array_equal(instances.co_occurrence_bins([3] * 7),
                                [5] * 7)


def test_instance_average_recall_matches_a_loop():
  """AR (mean over IoU 0.50:0.05:0.95 of recall, best IoU per instance) and
  R@0.5 per co-occurrence column = an explicit loop over images, instances,
  proposals and thresholds."""
  rng = np.random.default_rng(3)
  h = w = 12
  acc = instances.InstanceRecallAccumulator()
  ar_hits, r50_hits, counts = np.zeros(6), np.zeros(6), np.zeros(6)
  for _ in range(5):
    gts, classes = [], []
    for _ in range(int(rng.integers(1, 5))):
      y, x = rng.integers(0, 8, size=2)
      gts.append(_box(h, w, y, y + int(rng.integers(2, 5)), x,
                      x + int(rng.integers(2, 5))))
      classes.append(int(rng.integers(0, 2)))
    # Proposals: jittered copies of the instances (IoU spread over the
    # grid) and random boxes.
    props = []
    for g in gts:
      ys, xs = np.nonzero(g)
      dy, dx = rng.integers(-1, 2, size=2)
      props.append(_box(h, w, max(ys.min() + dy, 0), ys.max() + 1,
                         xs.min(), max(xs.max() + 1 + dx, xs.min() + 1)))
    for _ in range(3):
      y, x = rng.integers(0, 9, size=2)
      props.append(_box(h, w, y, y + 3, x, x + 3))
    acc.update(np.stack(gts), classes, np.stack(props))
    for g, c in zip(gts, classes):
      col = min(classes.count(c), 6) - 1
      best = max(np.sum(g & p) / np.sum(g | p) for p in props)
      ar_hits[col] += np.mean([best >= t - 1e-12 for t in
                               np.linspace(0.5, 0.95, 10)])
      r50_hits[col] += best >= 0.5
      counts[col] += 1
  res = acc.result()
  for i, name in enumerate(instances.CO_OCCURRENCE_BINS):
    if counts[i]:
      assert res[f"ar_{name}"] == pytest.approx(ar_hits[i] / counts[i])
      assert res[f"recall_{name}"] == pytest.approx(r50_hits[i] / counts[i])
    else:
      assert math.isnan(res[f"ar_{name}"])
    assert res[f"count_{name}"] == counts[i]
  assert res["ar_all"] == pytest.approx(ar_hits.sum() / counts.sum())
  assert res["recall_all"] == pytest.approx(r50_hits.sum() / counts.sum())
  # The jittered proposals make AR a strict fraction of R@0.5 here.
  assert 0 < res["ar_all"] < res["recall_all"]


def test_vit_keys_are_the_last_blocks_key_projections():
  """The ViT's 'keys' map (eval.instance_feature='auto' for a ViT, the
  paper's features) = LN1(x) @ W_k + b_k of the last block, computed here
  from its parameters and its input x, patch tokens only (no CLS)."""
  from odin_jax.models import vit
  model = vit.ViT(patch_size=4, depth=2, width=16, num_heads=2, pos_size=16)
  images = jax.random.uniform(jax.random.PRNGKey(0), (2, 16, 20, 3))
  variables = model.init(jax.random.PRNGKey(1), images)
  out, state = model.apply(
      variables, images,
      capture_intermediates=lambda mdl, _: mdl.name == "block0")
  assert out["keys"].shape == out["tokens"].shape == (2, 4, 5, 16)
  x = np.asarray(state["intermediates"]["block0"]["__call__"][0])  # [2,21,16]
  p = jax.tree.map(np.asarray, variables["params"]["block1"])
  mean = x.mean(-1, keepdims=True)
  var = ((x - mean) ** 2).mean(-1, keepdims=True)
  ln = ((x - mean) / np.sqrt(var + 1e-6) * p["norm1"]["scale"]
        + p["norm1"]["bias"])
  qkv = ln @ p["attn"]["qkv"]["kernel"] + p["attn"]["qkv"]["bias"]
  keys = qkv[..., 16:32]          # fused layout (q | k | v, head, channel)
  np.testing.assert_allclose(np.asarray(out["keys"]),
                             keys[:, 1:].reshape(2, 4, 5, 16),
                             rtol=1e-4, atol=1e-5)


def test_instance_feature_defaults_to_vit_keys():
  """eval.instance_feature='auto': a ViT's last-block keys (the paper's
  features); a named map otherwise wins."""
  from configs import detcon_b
  from odin_jax.evaluate import context, settings
  config = detcon_b.get_config("vit_test")
  ctx = context.Context(config, settings.settings_from_config(config))
  assert instances.instance_feature(ctx) == "keys"
  ctx = context.Context(config, settings.settings_from_config(
      config, instance_feature="tokens"))
  assert instances.instance_feature(ctx) == "tokens"


def test_run_on_ground_truth_masks():
  """The evaluations' run(ctx) on a mask source (no network): discovery of
  the ground-truth instance maps is perfect, instance recall of their
  connected components recovers every connected instance, the panel has
  one row per scene, and the feature-only evaluations skip."""
  from configs import detcon_b
  from odin_jax.evaluate import context, settings
  config = detcon_b.get_config("test")
  s = settings.settings_from_config(config, num_images=3, picture_images=2)
  ctx = context.Context(config, s, features=None, mask_method="gt")
  out = discovery.run(ctx)
  assert out.metrics["discovery/abo_instance"] == 1.0
  assert out.metrics["discovery/or_instance"] == 1.0
  assert out.info["discovery/num_images"] == 3
  assert instances.run(ctx).metrics["instances/recall_all"] > 0.5
  size = config.dataset.demo_image_size
  assert pictures.run(ctx).pictures["discovery"].shape == (
      2 * size + 2, 4 * size, 3)
  assert video.run(ctx) is None and probes.run(ctx) is None
  assert knn.run(ctx) is None


# --- Video label propagation --------------------------------------------


def _davis_boundary_loop(mask):
  """The DAVIS 2017 toolkit's boundary rule, written pixel by pixel from its
  description: a pixel differs from its right, lower or lower-right
  neighbour; the last row looks only right, the last column only down, the
  bottom-right corner is never a boundary."""
  h, w = mask.shape
  out = np.zeros((h, w), bool)
  for y in range(h):
    for x in range(w):
      if y == h - 1 and x == w - 1:
        continue
      if y == h - 1:
        out[y, x] = mask[y, x] != mask[y, x + 1]
      elif x == w - 1:
        out[y, x] = mask[y, x] != mask[y + 1, x]
      else:
        out[y, x] = (mask[y, x] != mask[y, x + 1] or
                     mask[y, x] != mask[y + 1, x] or
                     mask[y, x] != mask[y + 1, x + 1])
  return out


def _f_from_boundaries(pred_b, gt_b, radius):
  """F of two boundary maps: a pixel matches within Euclidean distance
  <= radius of the other boundary (explicit pairwise distances)."""
  pp, gg = np.argwhere(pred_b), np.argwhere(gt_b)
  if len(pp) == 0 and len(gg) == 0:
    return 1.0
  if len(pp) == 0 or len(gg) == 0:
    return 0.0
  d2 = ((pp[:, None] - gg[None]) ** 2).sum(-1)
  precision = (d2.min(1) <= radius ** 2).mean()
  recall = (d2.min(0) <= radius ** 2).mean()
  if precision + recall == 0:
    return 0.0
  return 2 * precision * recall / (precision + recall)


def test_boundary_f_follows_the_davis_toolkit():
  """F = the toolkit's rule (boundary of `_seg2bmap`, disk of radius
  ceil(0.008 * diagonal)) on small noisy masks, where the old rule (mask
  pixels with a 4-neighbour outside) gives a clearly different F."""
  # Hand case: a lone pixel's boundary is itself and its up / left /
  # up-left neighbours (they see it to their right / below / lower-right).
  dot = np.zeros((5, 5), bool)
  dot[2, 2] = True
  want = np.zeros((5, 5), bool)
  want[1:3, 1:3] = True
  np.testing.assert_array_equal(video_metrics.mask_boundary(dot), want)
  # A mask touching the image border: the border is no boundary.
  full = np.zeros((4, 6), bool)
  full[:, 3:] = True
  np.testing.assert_array_equal(video_metrics.mask_boundary(full),
                                _davis_boundary_loop(full))
  assert not video_metrics.mask_boundary(full)[:, 3:].any()
  h, w = 24, 32
  radius = math.ceil(0.008 * math.hypot(h, w))   # 1 px here
  gt = _box(h, w, 6, 18, 8, 22)
  cross = ndimage.generate_binary_structure(2, 1)
  gaps = []
  for seed in range(3):
    pred = gt ^ (np.random.default_rng(seed).random((h, w)) < 0.08)
    np.testing.assert_array_equal(video_metrics.mask_boundary(pred),
                                  _davis_boundary_loop(pred))
    want = _f_from_boundaries(_davis_boundary_loop(pred),
                              _davis_boundary_loop(gt), radius)
    assert video_metrics.boundary_f_measure(pred, gt) == pytest.approx(want,
                                                               abs=1e-12)
    old = _f_from_boundaries(
        pred & ~ndimage.binary_erosion(pred, cross, border_value=1),
        gt & ~ndimage.binary_erosion(gt, cross, border_value=1), radius)
    gaps.append(abs(old - want))
  assert min(gaps) > 0.05, gaps   # the two rules do differ on these masks


def test_make_clip_is_deterministic_and_moving():
  clip = clips.make_clip(seed=5, num_frames=6, image_size=48, num_objects=2)
  again = clips.make_clip(seed=5, num_frames=6, image_size=48, num_objects=2)
  assert clip.frames.shape == (6, 48, 48, 3) and clip.frames.dtype == np.uint8
  assert clip.masks.shape == (6, 48, 48)
  np.testing.assert_array_equal(clip.frames, again.frames)
  np.testing.assert_array_equal(clip.masks, again.masks)
  assert set(np.unique(clip.masks[0])) == {0, 1, 2}
  other = clips.make_clip(seed=6, num_frames=6, image_size=48)
  assert not np.array_equal(other.frames, clip.frames)
  if np.abs(clip.velocities).max() >= 1.0:
    assert not np.array_equal(clip.masks[0], clip.masks[-1])


def test_make_clip_moves_objects_at_constant_velocity():
  clip = clips.make_clip(seed=2, num_frames=7, image_size=48, num_objects=1,
                         max_speed=3.0)
  (vy, vx), = clip.velocities
  assert max(abs(vy), abs(vx)) > 0.5
  first = clip.masks[0] == 1
  y0, x0 = np.argwhere(first).min(axis=0)
  for t in range(1, 7):
    mask = clip.masks[t] == 1
    dy, dx = np.argwhere(mask).min(axis=0) - (y0, x0)
    assert abs(dy - vy * t) <= 1.0 and abs(dx - vx * t) <= 1.0
    # The shape and its texture move rigidly, exactly.
    np.testing.assert_array_equal(mask, np.roll(first, (dy, dx), (0, 1)))
    np.testing.assert_array_equal(clip.frames[t][mask], clip.frames[0][first])


def test_jf_is_one_on_identical_masks():
  clip = clips.make_clip(seed=0, num_frames=5, image_size=40)
  res = video_metrics.evaluate_video(clip.masks, clip.masks)
  np.testing.assert_allclose(res["J"], 1.0)
  np.testing.assert_allclose(res["F"], 1.0)
  assert res["JF_mean"] == 1.0 and len(res["object_ids"]) == 2


def test_j_and_f_on_a_known_shift():
  gt = _box(32, 32, 10, 20, 10, 20)
  shifted = _box(32, 32, 10, 20, 12, 22)
  # Intersection 10x8 = 80, union 120.
  assert video_metrics.region_similarity(shifted, gt) == pytest.approx(80 / 120)
  assert video_metrics.boundary_f_measure(shifted, gt, tolerance=2) == 1.0
  f1 = video_metrics.boundary_f_measure(shifted, gt, tolerance=1)
  assert 0.3 < f1 < 1.0
  # Empty masks: both -> 1, one -> 0.
  empty = np.zeros((32, 32), bool)
  assert video_metrics.region_similarity(empty, empty) == 1.0
  assert video_metrics.boundary_f_measure(empty, empty) == 1.0
  assert video_metrics.boundary_f_measure(empty, gt) == 0.0
  # evaluate_video over a 3-frame clip scores the middle frame only.
  labels_gt = np.stack([gt, gt, gt]).astype(np.int64)
  labels_pred = np.stack([gt, shifted, empty]).astype(np.int64)
  res = video_metrics.evaluate_video(labels_pred, labels_gt)
  assert res["J_mean"] == pytest.approx(80 / 120)
  acc = video_metrics.VideoAccumulator()
  acc.add(res)
  acc.add(video_metrics.evaluate_video(labels_gt, labels_gt))
  assert acc.result()["J_mean"] == pytest.approx((80 / 120 + 1) / 2)
  assert acc.result()["num_objects"] == 2


def test_propagation_on_a_static_clip_reproduces_first_frame():
  rng = np.random.default_rng(4)
  # Block-aligned objects on a 12x12 grid at stride 4.
  cells = np.zeros((12, 12), np.int64)
  cells[1:7, 2:10] = 1
  cells[8:12, 0:6] = 2
  first = np.kron(cells, np.ones((4, 4), np.int64))
  feats = np.repeat(rng.normal(size=(1, 12, 12, 32)), 5, axis=0)
  # On the feature grid every frame gets exactly the first frame's labels.
  grid = video.labels_to_grid(first, 3, (12, 12))
  probs = np.asarray(video.propagate_labels(feats, grid))
  assert probs.shape == (5, 12, 12, 3)
  for t in range(5):
    np.testing.assert_array_equal(probs[t].argmax(-1), cells)
  # At full resolution only the bilinear upsampling rounds object corners.
  pred = video.propagate_video(feats, first)
  assert pred.shape == (5, 48, 48)
  masks = np.repeat(first[None], 5, axis=0)
  res = video_metrics.evaluate_video(pred, masks, exclude_first=False,
                             exclude_last=False)
  assert res["J_mean"] >= 0.99 and res["F_mean"] >= 0.99


def test_spatial_neighbourhood_restricts_matches():
  # 1x4 grid; the labelled cell's feature moves from column 0 to column 3.
  e = np.eye(4, dtype=np.float32)
  frame0 = e[None, [0, 1, 2, 3]]
  frame1 = e[None, [1, 2, 3, 0]]
  feats = np.stack([frame0, frame1])  # [2, 1, 4, 4]
  first = np.zeros((1, 4, 2), np.float32)
  first[0, :, 0] = 1.0
  first[0, 0] = [0.0, 1.0]  # label 1 on column 0
  free = video.PropagationConfig(n_last_frames=0, topk=1, radius=None)
  near = video.PropagationConfig(n_last_frames=0, topk=1, radius=1)
  pred_free = np.asarray(video.propagate_labels(feats, first, free))
  pred_near = np.asarray(video.propagate_labels(feats, first, near))
  np.testing.assert_array_equal(pred_free[1].argmax(-1), [[0, 0, 0, 1]])
  np.testing.assert_array_equal(pred_near[1].argmax(-1), [[0, 0, 0, 0]])


def _reference_propagation(feats, first, n_last, topk, radius, temperature):
  """Plain-loop label propagation (the protocol of odin_jax/evaluate/video)."""
  num_frames, h, w, _ = feats.shape
  f = feats / np.linalg.norm(feats, axis=-1, keepdims=True)
  r = max(h, w) if radius is None else radius
  probs = [first]
  for t in range(1, num_frames):
    context = [0] + list(range(max(1, t - n_last), t))
    out = np.zeros_like(first)
    for i in range(h):
      for j in range(w):
        cands = [(f[t, i, j] @ f[c, y, x], probs[c][y, x])
                 for c in context
                 for y in range(max(0, i - r), min(h, i + r + 1))
                 for x in range(max(0, j - r), min(w, j + r + 1))]
        cands.sort(key=lambda sl: -sl[0])
        sims = np.array([s for s, _ in cands[:topk]])
        weights = np.exp((sims - sims.max()) / temperature)
        weights /= weights.sum()
        out[i, j] = sum(wt * lab for wt, (_, lab) in zip(weights, cands))
    probs.append(out)
  return np.stack(probs)


@pytest.mark.parametrize("n_last,topk,radius,band_rows", [
    (0, 1, 1, 2), (2, 3, 1, 2), (2, 4, None, 3), (7, 5, 2, 8)])
def test_propagation_matches_reference(n_last, topk, radius, band_rows):
  rng = np.random.default_rng(8)
  feats = rng.normal(size=(5, 5, 6, 4)).astype(np.float32)
  first = rng.dirichlet(np.ones(3), size=(5, 6)).astype(np.float32)
  config = video.PropagationConfig(n_last_frames=n_last, topk=topk,
                                   radius=radius, temperature=0.2,
                                   band_rows=band_rows)
  got = np.asarray(video.propagate_labels(feats, first, config))
  want = _reference_propagation(feats.astype(np.float64), first, n_last,
                                topk, radius, 0.2)
  np.testing.assert_allclose(got, want, atol=1e-5)


def test_propagation_follows_moving_objects():
  clip = clips.make_clip(seed=3, num_frames=8, image_size=64, num_objects=2,
                         max_speed=3.0)
  grid = (16, 16)
  # Oracle features: each cell's object fractions (+ noise) per frame.
  feats = np.stack([video.labels_to_grid(m, 3, grid, mode="area")
                    for m in clip.masks])
  feats = feats + 0.05 * np.random.default_rng(0).normal(size=feats.shape)
  config = video.PropagationConfig(radius=4, band_rows=5)
  pred = video.propagate_video(feats, clip.masks[0], config=config)
  res = video_metrics.evaluate_video(pred, clip.masks)
  copied = np.repeat(clip.masks[:1], len(clip.masks), axis=0)
  baseline = video_metrics.evaluate_video(copied, clip.masks)
  assert res["J_mean"] > 0.75
  assert res["J_mean"] > baseline["J_mean"] + 0.1


def test_labels_to_grid_modes():
  label_map = np.array([[0, 0, 1, 1], [0, 255, 1, 1]])
  area = video.labels_to_grid(label_map, 2, (1, 2), mode="area")
  np.testing.assert_allclose(area[0, 0], [0.75, 0.0])  # void counts for none
  np.testing.assert_allclose(area[0, 1], [0.0, 1.0])
  nearest = video.labels_to_grid(label_map, 2, (2, 2), mode="nearest")
  np.testing.assert_allclose(nearest[..., 1], [[0, 1], [0, 1]])


# --- Frozen-feature probes ----------------------------------------------


def _separable_scenes(rng, n, centres):
  """Features [n, 8, 8, D] whose class (one per image quadrant) is linear in
  the feature, and labels at stride 4: (labels [n, 32, 32], cells [n, 8, 8])."""
  quadrants = rng.integers(0, len(centres), size=(n, 2, 2))
  cells = np.kron(quadrants, np.ones((1, 4, 4), np.int64))
  feats = centres[cells] + 0.3 * rng.normal(size=cells.shape + (8,))
  labels = np.kron(cells, np.ones((1, 4, 4), np.int64))
  return feats.astype(np.float32), labels, cells


def test_linear_probe_separable_features():
  rng = np.random.default_rng(5)
  centres = rng.normal(size=(3, 8)) * 3.0
  train_x, train_y, _ = _separable_scenes(rng, 12, centres)
  train_y[:, 0, :] = probes.IGNORE_LABEL  # ignored pixels are skipped
  test_x, test_y, test_cells = _separable_scenes(rng, 4, centres)
  key = jax.random.PRNGKey(0)
  # On the feature grid the probe is exact; at full resolution the bilinear
  # upsampling of logits may move a boundary by a pixel.
  grid = probes.linear_probe_miou(train_x, train_y, test_x, test_cells, 3,
                                  key=key, num_steps=200)
  assert grid["miou"] == 1.0
  full = probes.linear_probe_miou(train_x, train_y, test_x, test_y, 3,
                                  key=key, num_steps=200)
  assert full["miou"] > 0.99 and full["pixel_accuracy"] > 0.99
  assert full["final_loss"] < 0.05
  minibatch = probes.linear_probe_miou(train_x, train_y, test_x, test_y, 3,
                                       key=key, num_steps=200, batch_size=64,
                                       weight_decay=1e-4)
  assert minibatch["miou"] > 0.99
  # Labels unrelated to the features cannot be learned.
  shuffled = rng.permutation(train_y.reshape(-1)).reshape(train_y.shape)
  bad = probes.linear_probe_miou(train_x, shuffled, test_x, test_y, 3,
                                 key=key, num_steps=200)
  assert bad["miou"] < 0.6


def test_downsample_labels_and_miou():
  labels = np.array([[[0, 0], [1, 255]]])
  targets, weights = probes.downsample_labels(labels, (1, 1), 2)
  np.testing.assert_allclose(targets[0, 0, 0], [2 / 3, 1 / 3], rtol=1e-6)
  np.testing.assert_allclose(weights[0, 0, 0], 0.75, rtol=1e-6)
  pred = np.array([0, 0, 1, 1, 2])
  truth = np.array([0, 1, 1, 255, 2])
  conf = probes.confusion_matrix(pred, truth, 4)
  miou, per_class = probes.miou_from_confusion(conf)
  # Class 0: 1 / 2; class 1: 1 / 2; class 2: 1; class 3 absent (NaN).
  np.testing.assert_allclose(per_class[:3], [0.5, 0.5, 1.0])
  assert math.isnan(per_class[3]) and miou == pytest.approx(2 / 3)


def test_knn_on_separable_data():
  rng = np.random.default_rng(6)
  centres = rng.normal(size=(3, 16)) * 4.0
  train_y = np.repeat(np.arange(3), 30)
  train_x = centres[train_y] + rng.normal(size=(90, 16))
  test_y = np.tile(np.arange(3), 10)
  test_x = centres[test_y] + rng.normal(size=(30, 16))
  assert knn.knn_accuracy(train_x, train_y, test_x, test_y, 3) == 1.0
  # k = 1 returns the label of the most similar (cosine) training point.
  pred, scores = knn.knn_classify(train_x, train_y, train_x[[5, 40, 70]],
                                     3, k=1)
  np.testing.assert_array_equal(pred, train_y[[5, 40, 70]])
  assert scores.shape == (3, 3)
  pooled = knn.pool_features(np.ones((2, 3, 3, 4)) * np.arange(4))
  np.testing.assert_allclose(pooled, np.tile(np.arange(4.0), (2, 1)))


# --- Pictures ------------------------------------------------------------


def test_discovery_panel_and_png(tmp_path):
  rng = np.random.default_rng(7)
  image = rng.random((24, 32, 3))
  gt = np.zeros((24, 32), np.int64)
  gt[4:12, 4:20] = 1
  gt[0, 0] = 255
  segments = rng.integers(0, 4, size=(6, 8))
  features = rng.normal(size=(6, 8, 10))
  panel = pictures.discovery_panel(image, gt, segments, features)
  assert panel.shape == (24, 128, 3) and panel.dtype == np.uint8
  np.testing.assert_array_equal(panel[:, :32],
                                np.round(image * 255).astype(np.uint8))
  gt_part = panel[:, 32:64]
  assert (gt_part[5, 5] != gt_part[20, 25]).any()  # object vs background
  np.testing.assert_array_equal(gt_part[0, 0], [0, 0, 0])  # ignore label
  pca_part = panel[:, 96:]
  assert pca_part.min() == 0 and pca_part.max() == 255
  colors = pictures.palette(24)
  assert len({tuple(c) for c in colors}) == 24
  np.testing.assert_array_equal(pictures.colorize(np.arange(24)[None]),
                                colors[None])
  path = tmp_path / "sub" / "panel.png"
  pictures.save_png(str(path), pictures.stack_rows([panel, panel]))
  loaded = np.asarray(Image.open(path))
  assert loaded.shape == (50, 128, 3)
  np.testing.assert_array_equal(loaded[:24], panel)
