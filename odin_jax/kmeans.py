"""Batched k-means in jnp: one independent clustering per image (Odin §3.1).

The discovery network's per-pixel projections z [B, N, D] (N = h·w cells of
the spanning view's feature grid, L2-normalised by the caller) are clustered
into K segments per image inside the jitted train step. Everything here is
per image (a `jax.vmap` over B), so with B sharded over the mesh axis 'data'
XLA partitions the work without any cross-device traffic, and there is no
data-dependent early exit (a batched convergence test would need an
all-reduce across devices): Lloyd runs a fixed `num_iters` iterations.

Algorithm (kmeans_lloyd.py, which describes it in full): k-means++ seeding
with scikit-learn's local trials ('kmeans++', the default) or K distinct
random valid points ('random'), or `init_centroids` [B, K, D]; then
`num_iters` Lloyd iterations with scikit-learn's re-seeding of empty
clusters; then a final assignment. Started from the same centres, the
result is scikit-learn's `KMeans(algorithm='lloyd')`. Points are not
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

from odin_jax import kmeans_lloyd
from odin_jax import numerics
from odin_jax import sharding

_INITS = ("kmeans++", "random")


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
  one = functools.partial(kmeans_lloyd.cluster, active=active,
                          num_iters=num_iters, init=init, precision=precision)
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
    return kmeans_lloyd.assign(x, jnp.sum(x * x, axis=-1), c, v, active,
                               precision)[0]

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
