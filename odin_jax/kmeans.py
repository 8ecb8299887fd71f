"""Batched k-means in jnp: one independent clustering per image (Odin §3.1).

The discovery network's per-pixel projections z [B, N, D] (N = h·w cells of
the spanning view's feature grid, L2-normalised by the caller) are clustered
into K segments per image inside the jitted train step. Everything here is
per image (a `jax.vmap` over B), so with B sharded over the mesh axis 'data'
XLA partitions the work without any cross-device traffic, and there is no
data-dependent early exit (a batched convergence test would need an
all-reduce across devices): Lloyd runs a fixed `num_iters` iterations.

Algorithm (the one scikit-learn's `KMeans(algorithm='lloyd')` runs, so the
two agree when started from the same centres):
  1. Initialisation
     'kmeans++': greedy k-means++ (Arthur & Vassilvitskii 2007, with
       scikit-learn's local trials): the first centre is a uniformly chosen
       valid point; each further centre is the best, by the resulting
       potential sum_n min_k ||x_n - c_k||^2, of `num_local_trials`
       candidates drawn with probability proportional to the squared
       distance to the nearest centre chosen so far (D^2 sampling).
       Plain random init gives 1.7-2.4x the inertia on clustered data.
     'random': K distinct valid points drawn uniformly.
     `init_centroids` [B, K, D] overrides both.
  2. `num_iters` Lloyd iterations: assign every valid point to its nearest
     centre, then move each centre to the mean of its points.
     Empty clusters are re-seeded (keeping the old centre costs ~10 %
     inertia): if E clusters are empty after an assignment, the E valid
     points farthest from their assigned centre (distinct points, farthest
     first) become the new centres of the empty clusters (in increasing
     cluster index), and each such point is removed from the cluster it was
     assigned to before that cluster's mean is taken. This is scikit-learn's
     rule. (A cluster can only stay empty when the image has fewer than K
     distinct valid points, or when its only point was just taken by this
     rule; it then keeps its previous centre.)
  3. A final assignment to the returned centres.

Distances are squared euclidean, computed as ||x||^2 - 2 x·c + ||c||^2 with
one einsum in float32 (clamped at 0); the assignment's argmin compares
||c||^2 - 2 x·c only, as scikit-learn's Lloyd does. Points are not
normalised here unless `normalize=True`.

Cost per image (N points, D dims, K clusters, L local trials): k-means++
takes K-1 passes of N·L·D multiply-adds, each Lloyd iteration two of N·K·D
(the distances, and the sums as a one-hot [K, N] x [N, D] matmul); the
k-means++ seeding keeps track of each point's nearest centre, so the first
Lloyd update needs no assignment pass. On CPU the batch is clustered in
cache-sized chunks of images one after the other (`_CPU_CHUNK_BYTES`);
other platforms get the whole batch in one go.

Validity: `valid [B, N]` (bool) marks the points that count. Invalid points
are never chosen as initial or re-seeded centres, do not contribute to any
centroid or to the inertia, and get assignment -1.

Active clusters: K is static (it fixes shapes), but R2O's curriculum lowers
the number of clusters during training, i.e. with a traced value. With
`num_active` = m (an int scalar, may be traced, 1 <= m <= K) only clusters
0..m-1 exist: k-means++ seeds m centres (drawing the same random numbers as
a K = m run), no point is assigned to a cluster >= m, those are never
re-seeded, and their returned centroids are zero.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

from odin_jax import numerics
from odin_jax import sharding

_INITS = ("kmeans++", "random")


def _sq_distances(x, x_sq, c, precision):
  """Squared euclidean distances of one image's points to some centres.

  x [N, D], x_sq [N] (= ||x||^2), c [M, D] -> [N, M] float32, >= 0.
  """
  c_sq = jnp.sum(c * c, axis=-1)
  cross = jnp.einsum("nd,md->nm", x, c, precision=precision)
  return jnp.maximum(x_sq[:, None] - 2.0 * cross + c_sq[None, :], 0.0)


def _largest(values, k: int):
  """Indices of the k largest of values [N], largest first (ties: lower index).

  k rounds of argmax rather than `lax.top_k` or a sort: XLA's SPMD
  partitioner all-gathers the batch dimension of a vmapped top_k (still so
  in jax 0.10), and a sort is ~10x slower on CPU; k argmax passes are cheap
  for k << N. The rounds are unrolled up to 16 at a time: a loop iteration
  costs more than the argmax itself on CPU (and a host sync on GPU).
  """
  def body(r, carry):
    values, idx = carry
    i = jnp.argmax(values).astype(jnp.int32)
    return values.at[i].set(-jnp.inf), idx.at[r].set(i)

  return jax.lax.fori_loop(0, k, body, (values, jnp.zeros((k,), jnp.int32)),
                           unroll=min(k, 16))[1]


def _sample(u, weights):
  """Indices drawn with probability ∝ weights [N] >= 0, one per u [L] in [0, 1).

  Inverse-CDF sampling (one uniform per draw, as scikit-learn does) rather
  than `jax.random.categorical`, which draws N Gumbels per sample: ~15x
  faster on CPU. An index of zero weight is never drawn.
  """
  cdf = jnp.cumsum(weights)
  idx = jnp.sum(cdf[None, :] <= (u * cdf[-1])[:, None], axis=-1)
  return jnp.minimum(idx, weights.shape[0] - 1).astype(jnp.int32)


def _init_random(u, x, valid, num_clusters):
  """K distinct valid points, uniformly. u [N] uniforms, x [N, D], valid [N]
  -> [K, D]."""
  score = jnp.where(valid, u, -1.0)
  return x[_largest(score, num_clusters)]


def _init_kmeans_pp(u, x, x_sq, valid, active, precision):
  """Greedy k-means++ seeding of the active clusters.

  u [K, L] uniforms (row 0 draws the first centre, row k the L candidates
  for centre k), x [N, D], x_sq [N], valid [N], active [K] bool (a prefix)
  -> (centres [K, D] (inactive rows zero), and, as `_assign` returns them,
  each point's nearest centre [N] int32 and its squared distance [N]).

  The nearest centre is tracked while seeding (a strictly closer new centre
  takes the point, so ties keep the lower index, as argmin does): the first
  Lloyd step then needs no assignment pass of its own.
  """
  num_clusters = active.shape[0]
  uniform = valid.astype(jnp.float32)
  first = _sample(u[0, :1], uniform)[0]
  centres = jnp.zeros((num_clusters, x.shape[1]), x.dtype).at[0].set(x[first])
  # Squared distance of every point to its nearest centre so far (0 if
  # invalid, so invalid points never carry sampling mass or potential).
  closest = jnp.where(
      valid, _sq_distances(x, x_sq, x[first][None], precision)[:, 0], 0.0)
  nearest = jnp.zeros(x.shape[:1], jnp.int32)

  def body(k, carry):
    centres, closest, nearest = carry
    # D^2 sampling; when every valid point already sits on a centre
    # (fewer distinct points than K) fall back to uniform over valid points.
    weights = jnp.where(jnp.sum(closest) > 0, closest, uniform)
    cand = _sample(u[k], weights)
    cand_d = _sq_distances(x, x_sq, x[cand], precision)          # [N, L]
    new_closest = jnp.where(valid[:, None],
                            jnp.minimum(closest[:, None], cand_d), 0.0)
    best = jnp.argmin(jnp.sum(new_closest, axis=0))
    centres = centres.at[k].set(jnp.where(active[k], x[cand[best]], 0.0))
    nearest = jnp.where(active[k] & (cand_d[:, best] < closest), k, nearest)
    closest = jnp.where(active[k], new_closest[:, best], closest)
    return centres, closest, nearest

  centres, closest, nearest = jax.lax.fori_loop(
      1, num_clusters, body, (centres, closest, nearest))
  return centres, (jnp.where(valid, nearest, -1),
                   jnp.where(valid, closest, -jnp.inf))


def _assign(x, x_sq, centres, valid, active, precision):
  """Nearest active centre. x [N, D], centres [K, D], active [K] ->
  (assignment [N] int32, -1 if invalid; its sq. distance [N], -inf if
  invalid).

  The argmin is over ||c||^2 - 2 x·c (||x||^2 is the same for every centre;
  scikit-learn's Lloyd compares the same quantity), ||x||^2 is added to the
  minimum only.
  """
  c_sq = jnp.sum(centres * centres, axis=-1)
  cross = jnp.einsum("nd,kd->nk", x, centres, precision=precision)
  score = jnp.where(active[None, :], c_sq[None, :] - 2.0 * cross, jnp.inf)
  a = jnp.argmin(score, axis=-1).astype(jnp.int32)
  dmin = jnp.maximum(x_sq + jnp.min(score, axis=-1), 0.0)
  return jnp.where(valid, a, -1), jnp.where(valid, dmin, -jnp.inf)


def _update(x, centres, assign, dmin, active, precision):
  """Means of the clusters, empty ones re-seeded (module docstring rule).

  x [N, D], centres [K, D] (used for the assignment), assign [N] (-1 for
  invalid), dmin [N] (-inf for invalid), active [K] -> new centres [K, D].
  The sums are one [K, N] x [N, D] matmul with the one-hot assignment (a
  scatter-add is ~3x slower on CPU and serialises on TPU).
  """
  k = centres.shape[0]
  onehot = (jnp.arange(k)[:, None] == assign[None, :]).astype(x.dtype)  # [K,N]
  counts = jnp.sum(onehot, axis=1)
  sums = jnp.einsum("kn,nd->kd", onehot, x, precision=precision)
  empty = (counts == 0) & active
  # The r-th empty cluster (by index) takes the r-th farthest valid point.
  far_idx = _largest(dmin, k)
  far_d = dmin[far_idx]
  rank = jnp.clip(jnp.cumsum(empty) - 1, 0, k - 1)
  src = far_idx[rank]                                     # [K]
  reseed = empty & jnp.isfinite(far_d[rank])              # a valid point left
  moved = jnp.where(reseed[:, None],
                    jax.nn.one_hot(assign[src], k, dtype=x.dtype), 0.0)
  sums = sums - jnp.einsum("jk,jd->kd", moved, x[src], precision=precision)
  counts = counts - jnp.sum(moved, axis=0)
  sums = jnp.where(reseed[:, None], x[src], sums)
  counts = jnp.where(reseed, 1.0, counts)
  means = sums / jnp.maximum(counts, 1.0)[:, None]
  return jnp.where((counts > 0)[:, None], means, centres)


def _kmeans_one(u, x, valid, init_centres, active, *, num_iters, init,
                precision):
  """k-means of one image. u: the init's uniforms ([K, L] for k-means++, [N]
  for random), x [N, D], valid [N], active [K] -> ([N] int32, [K, D])."""
  x_sq = jnp.sum(x * x, axis=-1)
  assign = functools.partial(_assign, x, x_sq, valid=valid, active=active,
                             precision=precision)
  if init_centres is not None:
    centres = init_centres
    nearest = assign(centres)
  elif init == "kmeans++":
    centres, nearest = _init_kmeans_pp(u, x, x_sq, valid, active, precision)
  else:
    centres = _init_random(u, x, valid, active.shape[0])
    nearest = assign(centres)

  def lloyd(_, carry):     # update, then the assignment to the new centres
    centres, (a, dmin) = carry
    centres = _update(x, centres, a, dmin, active, precision)
    return centres, assign(centres)

  centres, (a, _) = jax.lax.fori_loop(0, num_iters, lloyd, (centres, nearest))
  return a, jnp.where(active[:, None], centres, 0.0)


def _active(num_clusters: int, num_active):
  """bool [K]: clusters 0..num_active-1 (all K when num_active is None)."""
  if num_active is None:
    return jnp.ones((num_clusters,), bool)
  return jnp.arange(num_clusters) < jnp.clip(num_active, 1, num_clusters)


@functools.partial(jax.jit, static_argnames=(
    "num_clusters", "num_iters", "init", "num_local_trials", "normalize",
    "precision"))
def kmeans(points, num_clusters: int, key, num_iters: int = 10, valid=None,
           init: str = "kmeans++", init_centroids=None,
           num_local_trials: int | None = None, normalize: bool = False,
           precision: str = "highest", num_active=None):
  """Independent k-means clustering of each image's points.

  Args:
    points: float [B, N, D] (cast to float32).
    num_clusters: K (static).
    key: one PRNG key; all the init's random numbers are drawn from it in
      one call ([K, B, L] or [B, N] uniforms), which with JAX's
      partitionable threefry (the default) gives the same numbers however B
      is sharded, without communication.
    num_iters: Lloyd iterations (static); no early exit (module docstring).
    valid: optional bool [B, N]; False points are ignored (assignment -1).
    init: 'kmeans++' (greedy D^2 seeding) or 'random' (static).
    init_centroids: optional float [B, K, D] starting centres (overrides
      `init`), e.g. to compare with scikit-learn from the same start.
    num_local_trials: k-means++ candidates per centre; None -> scikit-learn's
      2 + floor(ln K).
    normalize: L2-normalise the points first (callers normally pass
      normalised vectors and leave this False).
    precision: matmul precision of the distance/mean einsums ('highest' keeps
      float32 on TPU/GPU; 'default' allows bf16/tf32 passes).
    num_active: optional int scalar m (may be traced; clipped to [1, K]):
      only clusters 0..m-1 are used (module docstring).
  Returns:
    assignments int32 [B, N] in [0, m) (-1 for invalid points),
    centroids float32 [B, K, D] (rows >= m zero).
  """
  if init not in _INITS:
    raise ValueError(f"kmeans init must be one of {_INITS}, got {init!r}.")
  points = jnp.asarray(points, jnp.float32)
  if points.ndim != 3:
    raise ValueError(f"kmeans expects points [B, N, D], got {points.shape}.")
  batch, num_points, _ = points.shape
  if num_points < num_clusters:
    raise ValueError(f"kmeans needs at least num_clusters={num_clusters} "
                     f"points per image, got {num_points}.")
  if normalize:
    points = numerics.l2_normalize(points)
  if valid is None:
    valid = jnp.ones((batch, num_points), bool)
  valid = jnp.asarray(valid, bool)
  if num_local_trials is None:
    num_local_trials = 2 + int(math.log(num_clusters))
  active = _active(num_clusters, num_active)
  one = functools.partial(_kmeans_one, active=active, num_iters=num_iters,
                          init=init, precision=precision)
  if init_centroids is not None:
    u = jnp.zeros((batch,))              # unused
  elif init == "kmeans++":
    # Drawn K-major so that the first m rows, hence a run with num_active=m,
    # are the numbers a K=m run draws (partitionable threefry counts
    # elements in row-major order).
    u = jax.random.uniform(key, (num_clusters, batch, num_local_trials))
    u = jnp.swapaxes(u, 0, 1)
  else:
    u = jax.random.uniform(key, (batch, num_points))
  if init_centroids is None:
    fn = jax.vmap(lambda u, x, v: one(u, x, v, None))
    args = (u, points, valid)
  else:
    init_centroids = jnp.asarray(init_centroids, jnp.float32)
    if init_centroids.shape != (batch, num_clusters, points.shape[-1]):
      raise ValueError(f"init_centroids must be [B, K, D] = "
                       f"{(batch, num_clusters, points.shape[-1])}, got "
                       f"{init_centroids.shape}.")
    fn = jax.vmap(one)
    args = (u, points, valid, init_centroids)
  # The same per-image computation either way: on CPU in cache-sized chunks
  # of images one after the other, elsewhere the whole batch at once (an
  # accelerator wants the batch; the choice is made when lowering).
  chunks = _cpu_chunks(batch, points[0].size * points.dtype.itemsize,
                       jax.device_count())
  if chunks == 1:
    return fn(*args)
  return jax.lax.platform_dependent(
      *args, cpu=functools.partial(_in_chunks, fn, chunks), default=fn)


# Bytes of points a CPU clusters at once. k-means makes ~35 passes over each
# image's points (k-means++ steps, Lloyd's assignments and sums); a whole
# batch (51 MB at 32 x 3136 x 128) is streamed from memory on every pass, a
# few images' worth stays in cache between passes. Measured on a 2-core EPYC
# (32 MB L3, loaded): 2 images at a time (3.2 MB) took 10-20 % less time
# than the whole batch at once, 4-8 images at a time less gain.
_CPU_CHUNK_BYTES = 4 << 20


def _cpu_chunks(batch: int, image_bytes: int, devices: int = 1) -> int:
  """How many sequential chunks a CPU splits the batch into (1: none).

  The fewest chunks of <= _CPU_CHUNK_BYTES that divide `batch`, but never
  fewer than 2 images a chunk (one image leaves a core idle; a batch with no
  such divisor is not split). When `batch` is a multiple of `devices`, so
  is every chunk's image count: a batch
  sharded in contiguous blocks then keeps each chunk spread evenly over the
  devices (`_in_chunks`), and the partitioner adds no communication.
  """
  granule = devices if batch % devices == 0 else 1
  for chunks in range(1, batch // 2 + 1):
    size = batch // chunks
    if batch % chunks or size % granule:
      continue
    if size * image_bytes <= _CPU_CHUNK_BYTES or size <= max(2, granule):
      return chunks
  return 1


def _in_chunks(fn, chunks: int, *args):
  """fn (batched over axis 0) on `chunks` sequential chunks of the batch.

  Chunk t holds images t, t + chunks, t + 2·chunks, ...: with the batch
  sharded in contiguous blocks over devices, and the chunk's image count a
  multiple of their number, each chunk is spread evenly over all of them and
  the loop runs over a local axis (no communication).
  """
  out = jax.lax.map(lambda a: fn(*a),
                    tuple(sharding.strided_split(a, chunks) for a in args))
  return jax.tree.map(sharding.strided_merge, out)


@functools.partial(jax.jit, static_argnames=("precision",))
def nearest_centre(points, centroids, num_active=None, valid=None,
                   precision: str = "highest"):
  """Index of each point's nearest centroid (among the first num_active).

  points [B, N, D], centroids [B, K, D], num_active optional int scalar
  (may be traced), valid optional bool [B, N] -> int32 [B, N] (-1 invalid).
  Used to paint a segmentation from centres fitted on other points.
  """
  points = jnp.asarray(points, jnp.float32)
  centroids = jnp.asarray(centroids, jnp.float32)
  if valid is None:
    valid = jnp.ones(points.shape[:2], bool)
  active = _active(centroids.shape[1], num_active)

  def one(x, c, v):
    return _assign(x, jnp.sum(x * x, axis=-1), c, v, active, precision)[0]

  return jax.vmap(one)(points, centroids, jnp.asarray(valid, bool))


def inertia(points, centroids, assignments, valid=None):
  """Sum of squared distances of the valid points to their centroid.

  points [B, N, D], centroids [B, K, D], assignments int [B, N] (-1 allowed
  for invalid points), valid optional bool [B, N] -> float32 [B].
  """
  points = jnp.asarray(points, jnp.float32)
  assignments = jnp.asarray(assignments)
  mask = assignments >= 0
  if valid is not None:
    mask = mask & jnp.asarray(valid, bool)
  c = jnp.take_along_axis(jnp.asarray(centroids, jnp.float32),
                          jnp.maximum(assignments, 0)[..., None], axis=1)
  d = jnp.sum((points - c) ** 2, axis=-1)
  return jnp.sum(jnp.where(mask, d, 0.0), axis=-1)
