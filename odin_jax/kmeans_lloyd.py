"""The k-means of one image: k-means++ seeding and Lloyd's iterations.

`cluster` is what kmeans.kmeans vmaps over the batch (and `assign` what
kmeans.nearest_centre does): plain jnp on one image's points x [N, D], with
valid [N] and the active clusters active [K] (bool, a prefix: R2O's traced
cluster count; inactive clusters get no point, no seeding, zero centres).
The algorithm is the one scikit-learn's `KMeans(algorithm='lloyd')` runs, so
the two agree when started from the same centres:

  1. Initialisation
     'kmeans++': greedy k-means++ (Arthur & Vassilvitskii 2007, with
       scikit-learn's local trials): the first centre is a uniformly chosen
       valid point; each further centre is the best, by the resulting
       potential sum_n min_k ||x_n - c_k||^2, of `num_local_trials`
       candidates drawn with probability proportional to the squared
       distance to the nearest centre chosen so far (D^2 sampling).
       Plain random init gives 1.7-2.4x the inertia on clustered data.
     'random': K distinct valid points drawn uniformly.
     Given initial centres [K, D] override both.
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
||c||^2 - 2 x·c only, as scikit-learn's Lloyd does. Invalid points are
never chosen as initial or re-seeded centres, do not contribute to any
centroid and get assignment -1.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp


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
  -> (centres [K, D] (inactive rows zero), and, as `assign` returns them,
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


def assign(x, x_sq, centres, valid, active, precision):
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


def cluster(u, x, valid, init_centres, active, *, num_iters, init,
            precision):
  """k-means of one image. u: the init's uniforms ([K, L] for k-means++, [N]
  for random), x [N, D], valid [N], init_centres [K, D] or None (use
  `init`: 'kmeans++' or 'random'), active [K] -> ([N] int32, [K, D])."""
  x_sq = jnp.sum(x * x, axis=-1)
  assign_to = functools.partial(assign, x, x_sq, valid=valid, active=active,
                                precision=precision)
  if init_centres is not None:
    centres = init_centres
    nearest = assign_to(centres)
  elif init == "kmeans++":
    centres, nearest = _init_kmeans_pp(u, x, x_sq, valid, active, precision)
  else:
    centres = _init_random(u, x, valid, active.shape[0])
    nearest = assign_to(centres)

  def lloyd(_, carry):     # update, then the assignment to the new centres
    centres, (a, dmin) = carry
    centres = _update(x, centres, a, dmin, active, precision)
    return centres, assign_to(centres)

  centres, (a, _) = jax.lax.fori_loop(0, num_iters, lloyd, (centres, nearest))
  return a, jnp.where(active[:, None], centres, 0.0)

