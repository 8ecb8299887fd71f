"""Region hierarchies (ultrametric contour maps) from scikit-image primitives.

The hierarchical-grouping method (Zhang & Maire 2020, §3) samples pixel pairs
by the distance between their regions in a region tree T: the height at
which the two regions merge (an ultrametric contour map, UCM). The paper uses
structured-forest edges and OWT-UCM; neither ships with a maintained Python
library, so this module builds the same kind of object from scikit-image:

  1. edge strength E [H, W]: Gaussian-smoothed image -> CIELAB -> Sobel
     gradient magnitude of each channel, combined (L2) and scaled to [0, 1];
  2. superpixels: watershed of E from a regular grid of markers
     (skimage.segmentation.watershed(E, markers=n, compactness=c); c > 0
     gives the compact watershed);
  3. greedy agglomeration: repeatedly merge the adjacent pair of regions
     whose common boundary has the weakest mean edge strength (the
     boundary of a merged region with a neighbour is the union of its
     parts' boundaries, so its mean is the count-weighted mean: exactly the
     UCM merging rule of Arbeláez 2006). Merges are first run silently down
     to at most `max_leaves` regions (the tree's leaves, paper: 40), none
     smaller than `min_leaf_area` of the image (small regions merge first);
     from there every merge is recorded with its height;
  4. d_T(R_a, R_b) = height of the merge that first joins leaf a and leaf
     b (their lowest common ancestor), divided by the root's height so that
     d_T is in [0, 1] with the root at 1.

Heights are monotone: a merged region's boundary means are convex
combinations of boundaries that were all >= the merge just made, so the
weakest remaining boundary never decreases (enforced with a running max
against rounding anyway). Hence d_T is an ultrametric:
d_T(a, c) <= max(d_T(a, b), d_T(b, c)) for all leaves a, b, c.

Everything is deterministic: fixed-order numpy, a heap whose ties break on
region ids, and leaf ids ordered by each leaf's first pixel in raster order.

Output of `region_hierarchy(image)` (a `Hierarchy`):
  leaves     int32   [H, W]                      leaf id of every pixel, 0..L-1
  distances  float32 [max_leaves, max_leaves]    d_T between leaves; 0 on the
                                                 diagonal; rows/columns >= L
                                                 are padding (PAD_DISTANCE)
  num_leaves int                                 L <= max_leaves
"""

from __future__ import annotations

import dataclasses
import heapq

import numpy as np
from skimage import color, filters, segmentation

MAX_LEAVES = 40          # the paper's finest level has at most 40 regions
PAD_DISTANCE = 1.0       # d_T of padded (absent) leaves: as far as the root


@dataclasses.dataclass(frozen=True, eq=False)
class Hierarchy:
  """A region tree: leaf map + ultrametric between leaves (module docstring).

  merges: float64 [L-1, 3] rows (cluster_a < cluster_b, height) in merge
  order, scipy-linkage style: clusters 0..L-1 are the leaves, merge k
  creates cluster L + k. Heights are the raw (unnormalised) boundary means.
  """
  leaves: np.ndarray
  distances: np.ndarray
  num_leaves: int
  merges: np.ndarray


def edge_strength(image, sigma: float = 1.0) -> np.ndarray:
  """Colour gradient magnitude of one image, scaled to [0, 1].

  Args:
    image: uint8 [H, W, 3] RGB (or [H, W] grayscale, or float in [0, 1]).
    sigma: Gaussian pre-smoothing width in pixels (suppresses texture and
      JPEG noise, which would otherwise fragment the watershed).
  Returns:
    float32 [H, W] in [0, 1]; all zeros for a constant image.
  """
  image = np.asarray(image)
  if image.ndim == 2:
    image = np.repeat(image[..., None], 3, axis=-1)
  if image.ndim != 3 or image.shape[-1] < 3:
    raise ValueError(f"Expected an image [H, W, 3], got {image.shape}.")
  rgb = image[..., :3]
  rgb = rgb.astype(np.float64) / 255.0 if rgb.dtype == np.uint8 else \
      rgb.astype(np.float64)
  if sigma > 0:
    rgb = filters.gaussian(rgb, sigma=sigma, channel_axis=-1)
  # Lab: gradients are closer to perceived colour differences than in RGB.
  lab = color.rgb2lab(np.clip(rgb, 0.0, 1.0))
  grad = np.sqrt(sum(np.square(filters.sobel(lab[..., c])) for c in range(3)))
  peak = grad.max()
  return (grad / peak if peak > 0 else grad).astype(np.float32)


def superpixels(edges: np.ndarray, num_markers: int = 400,
                compactness: float = 0.0) -> np.ndarray:
  """Compact watershed of an edge map from a regular grid of markers.

  Args:
    edges: float [H, W] edge strength in [0, 1].
    num_markers: markers placed on a regular grid (about as many regions).
    compactness: weight of the distance to the marker against the edge
      strength (0: plain watershed; larger: more regular, grid-like cells).
      0 by default: on the demo scenes the plain watershed followed object
      outlines as well (leaf purity 0.980 vs 0.972 at 1e-3) at less cost.
  Returns:
    int32 [H, W] region ids 0..N-1 (contiguous, raster order of first pixel).
  """
  labels = segmentation.watershed(edges, markers=int(num_markers),
                                  compactness=float(compactness))
  return _relabel_by_first_pixel(labels)


def _relabel_by_first_pixel(labels: np.ndarray) -> np.ndarray:
  """Any label map -> int32 ids 0..N-1 ordered by first raster pixel."""
  flat = labels.ravel()
  values, first = np.unique(flat, return_index=True)
  rank = np.empty(len(values), np.int64)
  rank[np.argsort(first, kind="stable")] = np.arange(len(values))
  return rank[np.searchsorted(values, flat)].reshape(labels.shape).astype(
      np.int32)


def boundary_strengths(labels: np.ndarray, edges: np.ndarray):
  """Adjacent region pairs and the edge strength summed along their boundary.

  Every pair of 4-connected pixels (p, q) with different labels is one
  boundary element of strength max(E[p], E[q]) (the watershed line is on
  one side of the pair; max reads the ridge).

  Args:
    labels: int [H, W] region ids 0..N-1.
    edges: float [H, W] edge strength.
  Returns:
    pairs int64 [P, 2] (a < b, sorted), sums float64 [P], counts int64 [P].
  """
  a = np.concatenate([labels[:, :-1].ravel(), labels[:-1, :].ravel()])
  b = np.concatenate([labels[:, 1:].ravel(), labels[1:, :].ravel()])
  s = np.concatenate([np.maximum(edges[:, :-1], edges[:, 1:]).ravel(),
                      np.maximum(edges[:-1, :], edges[1:, :]).ravel()])
  cross = a != b
  lo = np.minimum(a, b)[cross].astype(np.int64)
  hi = np.maximum(a, b)[cross].astype(np.int64)
  s = s[cross].astype(np.float64)
  n = int(labels.max()) + 1 if labels.size else 0
  keys, inverse = np.unique(lo * n + hi, return_inverse=True)
  sums = np.bincount(inverse, weights=s, minlength=len(keys))
  counts = np.bincount(inverse, minlength=len(keys)).astype(np.int64)
  pairs = np.stack([keys // max(n, 1), keys % max(n, 1)], axis=1)
  return pairs, sums, counts


def agglomerate(num_regions: int, pairs, sums, counts,
                max_leaves: int = MAX_LEAVES, areas=None, min_area: int = 0):
  """Greedy merging by weakest mean boundary: leaves + recorded merge tree.

  Args:
    num_regions: N initial regions 0..N-1.
    pairs, sums, counts: boundary_strengths' output.
    max_leaves: merges are unrecorded until at most this many regions remain
      and no region is smaller than min_area.
    areas: int [N] pixels per initial region (needed when min_area > 0).
    min_area: before the leaves are fixed, a pair with a region smaller than
      this is merged before any pair of larger regions (weakest boundary
      first among them). Without it, mean-boundary merging keeps specks with
      a strong outline as leaves, which vanish on a stride-4 feature grid.
  Returns:
    leaf_of: int64 [N] the leaf cluster (0..L-1, in order of the smallest
      initial region id it contains) of every initial region;
    merges: float64 [L-1, 3] (cluster_a, cluster_b, height) as in Hierarchy.
    If the adjacency graph is disconnected, the remaining components are
    joined last at the largest height seen (they share no boundary).
  """
  if num_regions < 1:
    raise ValueError("agglomerate needs at least one region.")
  # Clusters are never modified in place: a merge creates a new id, so an
  # edge's statistics are fixed while both its ends are alive and a heap
  # entry is stale exactly when one of its ends has died.
  adj: dict[int, dict[int, list]] = {i: {} for i in range(num_regions)}
  area = {i: 0 for i in range(num_regions)}
  if min_area > 0:
    if areas is None:
      raise ValueError("agglomerate: min_area > 0 needs areas.")
    area = dict(enumerate(np.asarray(areas).tolist()))
  small = lambda k: area[k] < min_area            # noqa: E731

  def entry(s, c, a, b):
    # Heap order: pairs touching a small region first (only while the
    # leaves are not fixed), then weakest mean boundary, then ids (ties).
    urgent = leaf_of is None and (small(a) or small(b))
    return (0 if urgent else 1, s / c, min(a, b), max(a, b))

  leaf_of = None
  heap = []
  for (a, b), s, c in zip(np.asarray(pairs).tolist(), np.asarray(sums).tolist(),
                          np.asarray(counts).tolist()):
    adj[a][b] = adj[b][a] = (s, c)
    heap.append(entry(s, c, a, b))
  heapq.heapify(heap)
  members = {i: [i] for i in range(num_regions)}   # initial regions
  alive, next_id = num_regions, num_regions
  cluster_leaf: dict[int, int] = {}
  merges, last = [], 0.0

  def snapshot():
    # Leaves = the clusters alive now, numbered by their smallest region.
    nonlocal leaf_of
    order = sorted(adj, key=lambda k: min(members[k]))
    leaf_of = np.empty(num_regions, np.int64)
    for leaf, k in enumerate(order):
      leaf_of[members[k]] = leaf
      cluster_leaf[k] = leaf

  def leaves_ready():
    return alive <= max_leaves and not any(small(k) for k in adj)

  if leaves_ready():
    snapshot()
  while alive > 1:
    if heap:
      _, height, a, b = heapq.heappop(heap)
      if a not in adj or b not in adj:
        continue                                   # stale entry
    else:                                          # disconnected components
      a, b = sorted(adj)[:2]
      height = last
    new = next_id
    next_id += 1
    neighbours = {}
    for old in (a, b):
      for other, (s, c) in adj.pop(old).items():
        if other in (a, b):
          continue
        del adj[other][old]
        ps, pc = neighbours.get(other, (0.0, 0))
        neighbours[other] = (ps + s, pc + c)
    adj[new] = neighbours
    area[new] = area.pop(a) + area.pop(b)
    for other, (s, c) in neighbours.items():
      adj[other][new] = (s, c)
      heapq.heappush(heap, entry(s, c, other, new))
    members[new] = members.pop(a) + members.pop(b)
    alive -= 1
    if leaf_of is not None:                        # a recorded merge
      last = max(last, height)                     # monotone despite rounding
      cluster_leaf[new] = len(cluster_leaf)
      pair = sorted((cluster_leaf[a], cluster_leaf[b]))
      merges.append((*pair, last))
    elif leaves_ready():
      snapshot()
  return leaf_of, np.asarray(merges, np.float64).reshape(-1, 3)


def ultrametric(num_leaves: int, merges, size: int | None = None,
                normalize: bool = True) -> np.ndarray:
  """Dense d_T between leaves from a merge list (scipy-linkage layout).

  Args:
    num_leaves: L.
    merges: [L-1, 3] (cluster_a, cluster_b, height); clusters 0..L-1 are
      leaves, merge k creates cluster L + k. Heights must be non-decreasing.
    size: side of the output (>= L); rows/columns >= L are PAD_DISTANCE.
    normalize: divide heights by the root's (last) height, so the root is 1
      (no-op when that height is 0).
  Returns:
    float32 [size, size]: d[i, j] = height of the merge joining leaves i and
    j (their lowest common ancestor), 0 on the diagonal.
  """
  size = num_leaves if size is None else int(size)
  if size < num_leaves:
    raise ValueError(f"size {size} < num_leaves {num_leaves}.")
  merges = np.asarray(merges, np.float64).reshape(-1, 3)
  if len(merges) != max(num_leaves - 1, 0):
    raise ValueError(f"{num_leaves} leaves need {num_leaves - 1} merges, got "
                     f"{len(merges)}.")
  heights = merges[:, 2]
  if np.any(np.diff(heights) < 0):
    raise ValueError("Merge heights must be non-decreasing (an ultrametric).")
  scale = heights[-1] if len(heights) and heights[-1] > 0 else 1.0
  if not normalize:
    scale = 1.0
  d = np.full((size, size), PAD_DISTANCE, np.float64)
  d[:num_leaves, :num_leaves] = 0.0
  members = {i: [i] for i in range(num_leaves)}
  for k, (a, b, h) in enumerate(merges):
    ma, mb = members.pop(int(a)), members.pop(int(b))
    d[np.ix_(ma, mb)] = h / scale
    d[np.ix_(mb, ma)] = h / scale
    members[num_leaves + k] = ma + mb
  return d.astype(np.float32)


def region_hierarchy(image, max_leaves: int = MAX_LEAVES,
                     num_superpixels: int = 400, compactness: float = 0.0,
                     sigma: float = 1.0, min_leaf_area: float = 0.005
                     ) -> Hierarchy:
  """The region tree of one image (module docstring, steps 1-4).

  Args:
    image: uint8 [H, W, 3] (or [H, W]).
    max_leaves: at most this many leaf regions (paper: 40); also the side of
      the padded distance matrix.
    num_superpixels: watershed markers (initial regions before merging).
    compactness: watershed compactness (see `superpixels`).
    sigma: Gaussian smoothing of the edge map (see `edge_strength`).
    min_leaf_area: no leaf smaller than this fraction of the image (small
      regions are merged into a neighbour first; see `agglomerate`).
  Returns:
    Hierarchy(leaves int32 [H, W], distances float32 [max_leaves,
    max_leaves], num_leaves, merges).
  """
  edges = edge_strength(image, sigma)
  regions = superpixels(edges, num_superpixels, compactness)
  pairs, sums, counts = boundary_strengths(regions, edges)
  n = int(regions.max()) + 1
  leaf_of, merges = agglomerate(
      n, pairs, sums, counts, max_leaves,
      areas=np.bincount(regions.ravel(), minlength=n),
      min_area=int(np.ceil(min_leaf_area * regions.size)))
  # superpixels() numbers regions by first raster pixel and agglomerate()
  # numbers leaves by their smallest region, so leaf ids are in raster order
  # of each leaf's first pixel too.
  leaves = leaf_of[regions].astype(np.int32)
  num_leaves = int(leaves.max()) + 1
  return Hierarchy(leaves, ultrametric(num_leaves, merges, max_leaves),
                   num_leaves, merges)


def hierarchy_from_config(image, mask_config) -> Hierarchy:
  """region_hierarchy with config.masks' hier_* fields (masks.py names)."""
  return region_hierarchy(
      image, max_leaves=int(mask_config.hier_max_leaves),
      num_superpixels=int(mask_config.hier_superpixels),
      compactness=float(mask_config.hier_compactness),
      sigma=float(mask_config.hier_sigma),
      min_leaf_area=float(mask_config.hier_min_leaf_area))
