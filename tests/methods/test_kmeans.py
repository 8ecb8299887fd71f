"""jnp k-means vs scikit-learn, seeding, empty clusters, masks, mesh."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P
from sklearn import cluster as sklearn_cluster   # the 'test' extra

from odin_jax import kmeans as km


def blobs(rng, batch, n, dim, centres, spread):
  """Gaussian blobs of unequal sizes: [B, N, D] float32."""
  out = np.empty((batch, n, dim), np.float32)
  for b in range(batch):
    mu = rng.normal(size=(centres, dim)) * 4.0
    sizes = rng.dirichlet(np.ones(centres) * 2.0)
    lab = rng.choice(centres, size=n, p=sizes)
    out[b] = mu[lab] + spread * rng.normal(size=(n, dim))
  return out


def numpy_lloyd_keep_empty(x, centres, iters):
  """Reference Lloyd that keeps an empty cluster's old centre. -> (a, c)."""
  c = centres.astype(np.float64).copy()
  for _ in range(iters):
    a = ((x[:, None] - c[None]) ** 2).sum(-1).argmin(1)
    for k in range(len(c)):
      if (a == k).any():
        c[k] = x[a == k].mean(0)
  a = ((x[:, None] - c[None]) ** 2).sum(-1).argmin(1)
  return a, c


def test_matches_sklearn_from_same_centres():
  rng = np.random.default_rng(0)
  x = blobs(rng, 4, 300, 16, 8, 1.5)
  x /= np.linalg.norm(x, axis=-1, keepdims=True)   # callers' L2-normalised z
  k = 6
  init = np.stack([xb[rng.choice(len(xb), k, replace=False)] for xb in x])
  a, c = km.kmeans(x, k, jax.random.PRNGKey(0), num_iters=25,
                   init_centroids=init)
  a, c = np.asarray(a), np.asarray(c)
  for b in range(len(x)):
    ref = sklearn_cluster.KMeans(k, init=init[b], n_init=1, algorithm="lloyd",
                                 tol=0.0, max_iter=25).fit(x[b])
    np.testing.assert_array_equal(a[b], ref.labels_)
    np.testing.assert_allclose(c[b], ref.cluster_centers_, atol=1e-5)
    assert km.inertia(x[b:b + 1], c[b:b + 1], a[b:b + 1])[0] == pytest.approx(
        ref.inertia_, rel=1e-4)


def test_kmeans_pp_seeding_beats_random_and_skips_invalid_points():
  rng = np.random.default_rng(1)
  k = 10
  x = blobs(rng, 16, 400, 8, k, 0.3)   # 16 images, each its own draws
  # A fifth of the points are invalid far outliers: neither init may pick
  # one (a uniform first centre over all points would, in some image).
  valid = rng.random(x.shape[:2]) > 0.2
  x[~valid] = 1e3
  key = jax.random.PRNGKey(3)
  results = {}
  for init in ("kmeans++", "random"):
    a, c = km.kmeans(x, k, key, num_iters=0, valid=valid, init=init)
    assert np.abs(np.asarray(c)).max() < 100, init
    results[init] = float(jnp.mean(km.inertia(x, c, a, valid)))
  # Random centres leave whole blobs uncovered; D^2 sampling finds them
  # (measured ~25-30x here, whatever the key; ~13x after Lloyd).
  assert results["random"] > 2.0 * results["kmeans++"], results


def test_empty_cluster_is_reseeded():
  rng = np.random.default_rng(2)
  # Three tight groups; the third initial centre is far from every point and
  # gets none of them, while groups A1 and A2 share one centre.
  a1 = rng.normal(size=(20, 2)) * 0.2
  a2 = rng.normal(size=(20, 2)) * 0.2 + [0.0, 4.0]
  b = rng.normal(size=(20, 2)) * 0.2 + [10.0, 0.0]
  x = np.concatenate([a1, a2, b]).astype(np.float32)[None]
  init = np.array([[[0.0, 2.0], [10.0, 0.0], [100.0, 100.0]]], np.float32)
  a, c = km.kmeans(x, 3, jax.random.PRNGKey(0), num_iters=10,
                   init_centroids=init)
  a, c = np.asarray(a), np.asarray(c)
  assert np.bincount(a[0], minlength=3).min() > 0       # all K used
  kept_a, kept_c = numpy_lloyd_keep_empty(x[0], init[0], 10)
  assert np.bincount(kept_a, minlength=3).min() == 0   # the case is real
  kept = float(km.inertia(x, kept_c[None], kept_a[None])[0])
  got = float(km.inertia(x, c, a)[0])
  assert got < 0.2 * kept
  # scikit-learn re-seeds a single empty cluster by the same rule.
  ref = sklearn_cluster.KMeans(3, init=init[0], n_init=1, algorithm="lloyd",
                               tol=0.0, max_iter=10).fit(x[0])
  np.testing.assert_array_equal(a[0], ref.labels_)
  np.testing.assert_allclose(c[0], ref.cluster_centers_, atol=1e-5)


def test_invalid_points_are_ignored():
  rng = np.random.default_rng(3)
  k, n_valid, n = 4, 120, 160
  clean = blobs(rng, 2, n_valid, 4, 4, 0.5)
  # Invalid points are far outliers: they would dominate empty-cluster
  # re-seeding and the means if they counted.
  outliers = 1e3 + rng.normal(size=(2, n - n_valid, 4)).astype(np.float32)
  perm = rng.permutation(n)
  x = np.concatenate([clean, outliers], axis=1)[:, perm]
  valid = (perm < n_valid)[None].repeat(2, 0)
  # An initial centre far from everything forces a re-seed on the first step.
  init = clean[:, :k].copy()
  init[:, -1] = 50.0
  a, c = km.kmeans(x, k, jax.random.PRNGKey(0), num_iters=8, valid=valid,
                   init_centroids=init)
  a, c = np.asarray(a), np.asarray(c)
  assert (a[~valid] == -1).all()
  order = np.argsort(perm[perm < n_valid])       # back to `clean`'s order
  for b in range(2):
    ref = sklearn_cluster.KMeans(k, init=init[b], n_init=1, algorithm="lloyd",
                                 tol=0.0, max_iter=8).fit(clean[b])
    np.testing.assert_array_equal(a[b, valid[b]][order], ref.labels_)
    np.testing.assert_allclose(c[b], ref.cluster_centers_, atol=1e-4)
    assert float(km.inertia(x[b:b + 1], c[b:b + 1], a[b:b + 1], valid[b:b + 1])
                 [0]) == pytest.approx(ref.inertia_, rel=1e-4)


def test_num_active_equals_smaller_k_and_nearest_centre():
  rng = np.random.default_rng(5)
  x = blobs(rng, 3, 200, 4, 6, 0.4)
  key = jax.random.PRNGKey(2)
  # A traced number of active clusters (R2O's curriculum) behaves as a run
  # with that K: same seeding draws, same Lloyd steps, unused rows zero.
  fn = jax.jit(lambda x, m: km.kmeans(x, 6, key, num_iters=5,
                                      num_local_trials=3, num_active=m))
  a, c = fn(x, 4)
  a4, c4 = km.kmeans(x, 4, key, num_iters=5, num_local_trials=3)
  np.testing.assert_array_equal(np.asarray(a), np.asarray(a4))
  np.testing.assert_allclose(np.asarray(c)[:, :4], np.asarray(c4), atol=1e-6)
  assert not np.asarray(c)[:, 4:].any()
  assert np.asarray(fn(x, 6)[0]).max() == 5     # same program, all active
  # nearest_centre: brute-force argmin over the first m centres.
  centres = rng.normal(size=(3, 6, 4)).astype(np.float32)
  for m in (6, 2):
    got = km.nearest_centre(x, centres, num_active=m)
    d = ((x[:, :, None] - centres[:, None, :m]) ** 2).sum(-1)
    np.testing.assert_array_equal(np.asarray(got), d.argmin(-1))


def test_sharded_over_four_devices_matches_single_device():
  assert jax.device_count() >= 4
  rng = np.random.default_rng(4)
  x = blobs(rng, 8, 256, 8, 6, 0.5)
  valid = rng.random((8, 256)) > 0.25
  x[~valid] = 1e3                      # invalid: far outliers, ignored
  key = jax.random.PRNGKey(7)
  a1, c1 = km.kmeans(x, 6, key, num_iters=5, valid=valid)
  assert (np.asarray(a1)[~valid] == -1).all()
  assert np.abs(np.asarray(c1)).max() < 100
  mesh = jax.make_mesh((4,), ("data",),
                       axis_types=(jax.sharding.AxisType.Auto,))
  shard = NamedSharding(mesh, P("data"))
  xs, vs = jax.device_put(x, shard), jax.device_put(valid, shard)
  fn = jax.jit(lambda x, v, key: km.kmeans(x, 6, key, num_iters=5, valid=v),
               out_shardings=(shard, shard)).lower(xs, vs, key).compile()
  a4, c4 = fn(xs, vs, key)
  assert a4.sharding.is_equivalent_to(shard, 2)
  np.testing.assert_array_equal(np.asarray(a4), np.asarray(a1))
  np.testing.assert_allclose(np.asarray(c4), np.asarray(c1), atol=1e-6)
  # Per-image work: no cross-device traffic in the compiled program.
  hlo = fn.as_text()
  for op in ("all-reduce", "all-gather", "all-to-all", "collective-permute"):
    assert op not in hlo, op


def test_seeding_tracks_the_nearest_centre():
  # With no Lloyd step the assignment is the one k-means++ kept track of
  # while seeding: it must be every point's nearest returned centre.
  rng = np.random.default_rng(6)
  x = blobs(rng, 4, 300, 8, 7, 0.6)
  valid = rng.random(x.shape[:2]) > 0.1
  a, c = km.kmeans(x, 7, jax.random.PRNGKey(5), num_iters=0, valid=valid,
                   num_active=6)
  a, c = np.asarray(a), np.asarray(c, np.float64)
  d = ((x[:, :, None].astype(np.float64) - c[:, None, :6]) ** 2).sum(-1)
  np.testing.assert_array_equal(a[valid], d.argmin(-1)[valid])
  assert (a[~valid] == -1).all()


def _while_loops(fn, *args):
  return fn.lower(*args).as_text().count("stablehlo.while")


def test_cpu_chunks_cluster_like_the_whole_batch(monkeypatch):
  assert jax.device_count() >= 4 and jax.default_backend() == "cpu"
  rng = np.random.default_rng(7)
  batch, n, dim = 8, 200, 8
  x = blobs(rng, batch, n, dim, 5, 0.5)
  valid = rng.random((batch, n)) > 0.2
  x[~valid] = 1e3
  key = jax.random.PRNGKey(8)
  run = lambda x, v: km.kmeans(x, 6, key, num_iters=4, valid=v, num_active=5)
  a1, c1 = jax.jit(run)(x, valid)
  loops = _while_loops(jax.jit(run), x, valid)
  image_bytes = n * dim * 4
  assert km._cpu_chunks(batch, image_bytes, jax.device_count()) == 1
  # 4 images (one per device) a chunk: the batch runs as 2 chunks in a loop.
  monkeypatch.setattr(km, "_CPU_CHUNK_BYTES", 4 * image_bytes)
  assert km._cpu_chunks(batch, image_bytes, jax.device_count()) == 2
  jax.clear_caches()        # kmeans's traces read the constant
  try:
    chunked_fn = jax.jit(run)
    assert _while_loops(chunked_fn, x, valid) == loops + 1   # the chunks
    a2, c2 = chunked_fn(x, valid)
    np.testing.assert_array_equal(np.asarray(a2), np.asarray(a1))
    np.testing.assert_allclose(np.asarray(c2), np.asarray(c1), atol=1e-6)
    # Sharded over 4 devices: still no cross-device traffic.
    mesh = jax.make_mesh((4,), ("data",),
                         axis_types=(jax.sharding.AxisType.Auto,))
    shard = NamedSharding(mesh, P("data"))
    xs, vs = jax.device_put(x, shard), jax.device_put(valid, shard)
    fn = jax.jit(run, out_shardings=(shard, shard)).lower(xs, vs).compile()
    a4, c4 = fn(xs, vs)
    np.testing.assert_array_equal(np.asarray(a4), np.asarray(a1))
    np.testing.assert_allclose(np.asarray(c4), np.asarray(c1), atol=1e-6)
    hlo = fn.as_text()
    for op in ("all-reduce", "all-gather", "all-to-all", "collective-permute"):
      assert op not in hlo, op
  finally:
    jax.clear_caches()        # no chunked program for later tests
