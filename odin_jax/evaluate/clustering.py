"""Proposal generators: k-means and spectral clusterings of feature grids.

What the evaluations run and what the tests check is this one code path.
Every image and every K is clustered by `odin_jax.kmeans.kmeans`
compiled once per (batch, cells, K_max): smaller K run as `num_active`
(traced), the last batch is padded (`kmeans_label_maps`).
  * Object discovery (Odin App. A.4, evaluate/abo.py): k-means of
    L2-normalised features for each K (`kmeans_segmentations`), every
    cluster a proposal.
  * Instance recall (evaluate/instances.py): Ng-Jordan-Weiss spectral
    clustering of the cosine affinity (negative cosines clipped to 0, or
    'shift': (1 + cos) / 2), rows L2-normalised, k-means per K; one
    eigendecomposition serves all K, the K-column embedding is zero-padded
    to K_max columns (zero columns change no distance). Segments with
    non-connected components are split at feature resolution
    (8-connectivity) before nearest upsampling (`instance_segmentations`).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
from scipy import linalg as sp_linalg
from scipy import ndimage

from odin_jax import numerics
from odin_jax.evaluate import settings as settings_lib

# Odin App. A.4: K in {1, 2, 4, ..., 128} -> 255 proposals.
DISCOVERY_KS = settings_lib.EvalSettings.discovery_ks
# Instance-segmentation analysis paper, App. A.2.1: K in {2, 3, 4, 5}.
SPECTRAL_KS = settings_lib.EvalSettings.spectral_ks


def kmeans_label_maps(points, ks: Sequence[int], key,
                      batch_size: int | None = None,
                      k_max: int | None = None,
                      num_iters: int = 20) -> np.ndarray:
  """k-means of every image for every K with one compiled program.

  Args:
    points: float [N, P, D] (N images of P points).
    ks: numbers of clusters, each <= k_max.
    key: jax PRNG key; K number i uses fold_in(key, i), its batch starting
      at image b fold_in(fold_in(key, i), b).
    batch_size: images per k-means call (default N: one batch).
    k_max: the K the program is compiled for (default max(ks)).
    num_iters: Lloyd iterations.
  Returns:
    int32 [N, len(ks), P], labels of map i in [0, ks[i]). Deterministic
    given (points, ks, key, batch_size, k_max).
  """
  import jax  # Local: the rest of this module is numpy / scipy.
  from odin_jax.kmeans import kmeans
  points = np.asarray(points, np.float32)
  n = len(points)
  batch_size = n if batch_size is None else int(batch_size)
  k_max = max(int(k) for k in ks) if k_max is None else int(k_max)
  if max(int(k) for k in ks) > k_max:
    raise ValueError(f"K {max(ks)} > k_max {k_max}")
  out = np.zeros((n, len(ks), points.shape[1]), np.int32)
  for i, k in enumerate(ks):
    key_i = jax.random.fold_in(key, i)
    for start in range(0, n, batch_size):
      batch = points[start:start + batch_size]
      m = len(batch)
      if m < batch_size:
        batch = np.concatenate([batch, np.repeat(batch[-1:], batch_size - m,
                                                 axis=0)])
      assign, _ = kmeans(batch, k_max, jax.random.fold_in(key_i, start),
                         num_iters=num_iters, num_active=int(k))
      out[start:start + m, i] = np.asarray(assign)[:m]
  return out


def kmeans_segmentations(features, ks: Sequence[int] = DISCOVERY_KS, *, key,
                         image_hw: Sequence[int] | None = None,
                         num_iters: int = 20, batch_size: int | None = None,
                         k_max: int | None = None) -> np.ndarray:
  """k-means segmentations of L2-normalised features, one per K.

  Args:
    features: float [h, w, D] or a batch [B, h, w, D].
    ks: numbers of clusters (Odin App. A.4: 1, 2, 4, ..., 128); K larger
      than the number of cells is clipped to it.
    key: jax PRNG key (`kmeans_label_maps`).
    image_hw: (H, W) to resize the maps to (nearest); None keeps (h, w).
    num_iters: Lloyd iterations.
    batch_size, k_max: as `kmeans_label_maps` (the runner passes
      eval.batch_size and the grid's largest usable K, so one program
      serves every K, image and picture).
  Returns:
    int32 [S, H, W] (or [B, S, H, W]) label maps, S = len(ks), labels of map
    s in [0, ks[s]).
  """
  features = np.asarray(features, np.float32)
  single = features.ndim == 3
  if single:
    features = features[None]
  batch, h, w, dim = features.shape
  ks = tuple(min(int(k), h * w) for k in ks)
  points = numerics.l2_normalize(features.reshape(batch, h * w, dim))
  maps = kmeans_label_maps(points, ks, key, batch_size, k_max, num_iters)
  maps = maps.reshape(batch, len(ks), h, w)
  if image_hw is not None:
    maps = numerics.resize_nearest(maps, image_hw)
  return maps[0] if single else maps


def kmeans_proposals(features, ks: Sequence[int] = DISCOVERY_KS, *, key,
                     image_hw: Sequence[int] | None = None,
                     num_iters: int = 20) -> np.ndarray:
  """Odin App. A.4 proposals: every cluster of k-means for every K.

  Args:
    features: float [h, w, D] (the caller picks the layer / projections).
    ks: numbers of clusters; the default gives 255 proposals.
    key: jax PRNG key.
    image_hw: (H, W) image resolution (nearest upsampling); None = (h, w).
    num_iters: Lloyd iterations.
  Returns:
    bool [sum(min(K, h*w)), H, W]: for each K in order, its K cluster masks
    (a cluster left empty gives an empty mask, so the count is fixed).
    For memory-light scoring use `kmeans_segmentations` + `segment_maps=`.
  """
  maps = kmeans_segmentations(features, ks, key=key, image_hw=image_hw,
                              num_iters=num_iters)
  h, w = np.asarray(features).shape[:2]
  return np.concatenate([
      segments_to_proposals(m, min(int(k), h * w)) for m, k in zip(maps, ks)])


def segments_to_proposals(segment_map, num_segments: int | None = None):
  """One binary proposal per segment of a label map.

  Args:
    segment_map: int [H, W]; negative labels are unlabelled.
    num_segments: if given, labels 0..num_segments-1 each give a mask (empty
      ones included, so the count is fixed); otherwise the distinct
      non-negative labels present, ascending.
  Returns:
    bool [P, H, W].
  """
  segment_map = np.asarray(segment_map)
  if num_segments is None:
    labels = np.unique(segment_map)
    labels = labels[labels >= 0]
  else:
    labels = np.arange(num_segments)
  return segment_map[None] == labels[:, None, None]


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
  x = numerics.l2_normalize(x)
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


def spectral_segmentations(features, ks: Sequence[int] = SPECTRAL_KS, *,
                           key, affinity: str = "clip", num_iters: int = 30,
                           batch_size: int | None = None) -> np.ndarray:
  """K-way spectral clusterings of feature maps for several K.

  Args:
    features: float [h, w, D] or a batch [N, h, w, D].
    ks: numbers of clusters (paper: 2, 3, 4, 5); clipped to the cells.
    key: jax PRNG key; K number i clusters all images with
      `kmeans_label_maps(..., (K,), fold_in(key, i), k_max=max(ks))`.
    affinity: 'clip' or 'shift' (`cosine_affinity`).
    num_iters: Lloyd iterations.
    batch_size: images per k-means call (default: all).
  Returns:
    int32 [len(ks), h, w] (or [N, len(ks), h, w]), map i with labels in
    [0, ks[i]).
  """
  import jax  # Local: only needed for the PRNG keys.
  features = np.asarray(features, np.float32)
  single = features.ndim == 3
  if single:
    features = features[None]
  n, h, w, _ = features.shape
  ks = [min(int(k), h * w) for k in ks]
  k_max = max(ks)
  rows = np.zeros((n, len(ks), h * w, k_max), np.float32)
  for b in range(n):
    emb = spectral_embedding(cosine_affinity(features[b], affinity), k_max)
    for i, k in enumerate(ks):
      rows[b, i, :, :k] = numerics.l2_normalize(emb[:, :k])
  maps = np.zeros((n, len(ks), h, w), np.int32)
  for i, k in enumerate(ks):
    assign = kmeans_label_maps(rows[:, i], (k,), jax.random.fold_in(key, i),
                               batch_size, k_max, num_iters=num_iters)
    maps[:, i] = assign[:, 0].reshape(n, h, w)
  return maps[0] if single else maps


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


def instance_segmentations(features, ks: Sequence[int] = SPECTRAL_KS, *,
                           key, image_hw: Sequence[int] | None = None,
                           affinity: str = "clip", split: bool = True,
                           connectivity: int = 2, num_iters: int = 30,
                           batch_size: int | None = None) -> np.ndarray:
  """Spectral clusterings, components split, at image resolution.

  Every label of every returned map is one proposal (score them with
  `discovery.best_overlaps_from_segmentations` or `instances.
  instance_recall`).

  Args:
    features: float [h, w, D] or [N, h, w, D].
    ks, key, affinity, num_iters, batch_size: `spectral_segmentations`.
    image_hw: (H, W) for nearest upsampling; None keeps (h, w).
    split: split non-connected segments into components (paper: yes).
    connectivity: 1 or 2 (8-neighbours, default).
  Returns:
    int32 [len(ks), H, W] (or [N, len(ks), H, W]).
  """
  maps = spectral_segmentations(features, ks, key=key, affinity=affinity,
                                num_iters=num_iters, batch_size=batch_size)
  if split:
    maps = np.stack([split_components(m, connectivity)
                     for m in maps.reshape(-1, *maps.shape[-2:])]
                    ).reshape(maps.shape)
  if image_hw is not None:
    maps = numerics.resize_nearest(maps, image_hw)
  return maps
