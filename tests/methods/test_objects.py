"""Mask downsampling, id sampling and pooling vs independent numpy versions."""
import jax
import numpy as np
import pytest

from odin_jax import objects


def onehot_avgpool_argmax(seg, grid):
  """The DetCon reference recipe: one-hot masks, average-pool, argmax."""
  b, h, w = seg.shape
  ids = np.unique(seg)
  onehot = (seg[..., None] == ids).astype(np.float64)        # [B,H,W,K]
  gh, gw = grid
  bh, bw = h // gh, w // gw
  pooled = onehot.reshape(b, gh, bh, gw, bw, len(ids)).mean((2, 4))
  return ids[np.argmax(pooled, axis=-1)]


@pytest.mark.parametrize("seed,size,grid", [(0, 96, 3), (1, 224, 7), (2, 64, 4)])
def test_downsample_matches_onehot_average_pooling(seed, size, grid):
  rng = np.random.default_rng(seed)
  # Blocky random segments with many ties and large ids.
  coarse = rng.integers(0, 6, size=(3, size // 8, size // 8)) * 1000 + 70000
  seg = np.kron(coarse, np.ones((8, 8), np.int64)).astype(np.int32)
  seg[:, ::3, ::5] = 70001   # sprinkle another id to create near-ties
  got = np.asarray(objects.downsample_segments(seg, (grid, grid)))
  np.testing.assert_array_equal(got, onehot_avgpool_argmax(seg, (grid, grid)))


def test_downsample_non_multiple_sizes_uses_nearest_blocks():
  # 80 px on a 3x3 grid: the map is resized (nearest, pixel centres) to 81 px
  # = 3 blocks of 27. The middle block covers source columns 26.7..53.3, so
  # an edge at column 36 leaves it mostly 1 and an edge at 44 mostly 0.
  for edge, middle in ((36, 1), (44, 0)):
    seg = np.zeros((1, 80, 80), np.int32)
    seg[:, :, edge:] = 1
    cells = np.asarray(objects.downsample_segments(seg, (3, 3)))
    np.testing.assert_array_equal(cells[0], np.array([[0, middle, 1]] * 3))


def test_sample_ids_are_present_and_uniform():
  cells = np.array([[[5, 5], [5, 9]], [[3, 3], [3, 3]]], np.int32)
  ids = np.asarray(objects.sample_mask_ids(jax.random.PRNGKey(0), cells, 4000))
  assert set(ids[0]) == {5, 9} and set(ids[1]) == {3}
  # uniform over ids present, not proportional to area (5 covers 3/4)
  assert abs(np.mean(ids[0] == 9) - 0.5) < 0.04


def test_pool_features_is_mean_over_cells_of_id():
  rng = np.random.default_rng(0)
  feats = rng.normal(size=(2, 3, 3, 4)).astype(np.float32)
  cells = rng.integers(0, 3, size=(2, 3, 3)).astype(np.int32)
  ids = np.array([[0, 1, 2, 0], [2, 2, 1, 0]], np.int32)
  got = np.asarray(objects.pool_features(feats, cells, ids))
  for b in range(2):
    for m in range(4):
      sel = cells[b] == ids[b, m]
      want = feats[b][sel].mean(0) if sel.any() else np.zeros(4)
      np.testing.assert_allclose(got[b, m], want, rtol=1e-5, atol=1e-6)


def test_one_global_mask_is_global_average_pooling():
  feats = np.random.default_rng(1).normal(size=(2, 7, 7, 5)).astype(np.float32)
  cells = np.zeros((2, 7, 7), np.int32)
  got = objects.pool_features(feats, cells, np.zeros((2, 1), np.int32))
  np.testing.assert_allclose(np.asarray(got)[:, 0], feats.mean((1, 2)), rtol=1e-5)


def test_shared_ids_are_visible_in_both_views_and_uniform():
  # image 0: view 1 sees {1, 2, 7}, view 2 sees {2, 7, 9} -> both draw the
  # same ids in {2, 7}; image 1: no id in common -> each view draws its own.
  cells1 = np.array([[[1, 2], [7, 7]], [[4, 4], [6, 4]]], np.int32)
  cells2 = np.array([[[9, 2], [9, 7]], [[5, 5], [8, 5]]], np.int32)
  ids1, ids2 = map(np.asarray, objects.sample_shared_ids(
      jax.random.PRNGKey(1), cells1, cells2, 4000))
  np.testing.assert_array_equal(ids1[0], ids2[0])
  assert set(ids1[0]) == {2, 7} and abs(np.mean(ids1[0] == 2) - 0.5) < 0.04
  assert set(ids1[1]) == {4, 6} and abs(np.mean(ids1[1] == 6) - 0.5) < 0.04
  assert set(ids2[1]) == {5, 8} and abs(np.mean(ids2[1] == 8) - 0.5) < 0.04


def test_shared_ids_with_many_large_ids_match_set_intersection():
  rng = np.random.default_rng(3)
  cells1 = rng.integers(0, 70000, size=(3, 6, 6)).astype(np.int32)
  cells2 = cells1[:, ::-1].copy()
  cells2[:, :2] = rng.integers(0, 70000, size=(3, 2, 6))
  ids1, ids2 = map(np.asarray, objects.sample_shared_ids(
      jax.random.PRNGKey(0), cells1, cells2, 3000))
  np.testing.assert_array_equal(ids1, ids2)
  for b in range(3):
    both = set(cells1[b].ravel()) & set(cells2[b].ravel())
    assert set(ids1[b]) == both


def test_per_view_sampling_draws_each_view_on_its_own():
  # DetCon samples each view's masks separately, uniformly over the masks
  # present in THAT view (DeepMind's sample_masks, once per view): view 1's
  # id 1 and view 2's id 9 are drawn although the other view lacks them.
  cells1 = np.array([[[1, 2], [7, 7]], [[4, 4], [6, 4]]], np.int32)
  cells2 = np.array([[[9, 2], [9, 7]], [[4, 6], [6, 6]]], np.int32)
  n = 6000
  ids1, ids2 = map(np.asarray, objects.view_mask_ids(
      "per_view", jax.random.PRNGKey(2), cells1, cells2, n))
  for ids, cells in ((ids1, cells1), (ids2, cells2)):
    for b in range(2):
      present = np.unique(cells[b])
      assert set(ids[b]) == set(present)
      freq = [np.mean(ids[b] == i) for i in present]
      np.testing.assert_allclose(freq, 1 / len(present), atol=0.03)
  # Image 1 shows the same ids {4, 6} in both views: the draws still differ
  # and agree only as often as independent draws would (1/2).
  assert abs(np.mean(ids1[1] == ids2[1]) - 0.5) < 0.03
  # The same key gives the same ids (online and target networks agree).
  again = objects.view_mask_ids("per_view", jax.random.PRNGKey(2), cells1, cells2, n)
  np.testing.assert_array_equal(np.asarray(again[0]), ids1)


def test_all_ids_lists_every_id_then_pads():
  rng = np.random.default_rng(4)
  cells1 = rng.integers(0, 5, size=(3, 3, 3)).astype(np.int32) * 1000
  cells2 = rng.integers(0, 9, size=(3, 3, 3)).astype(np.int32)
  ids1, ids2 = map(np.asarray, objects.view_mask_ids(
      "all", jax.random.PRNGKey(0), cells1, cells2, 12))
  for ids, cells in ((ids1, cells1), (ids2, cells2)):
    for b in range(3):
      present = np.unique(cells[b])
      want = np.concatenate([present, np.full(12 - len(present), -1)])
      np.testing.assert_array_equal(ids[b], want)
  assert objects.PAD_ID == -1
  # Padding rows pool to zeros.
  feats = rng.normal(size=(3, 3, 3, 2)).astype(np.float32)
  pooled = np.asarray(objects.pool_features(feats, cells2, ids2))
  np.testing.assert_array_equal(pooled[ids2 < 0], 0.0)


def test_unknown_mask_sampling_names_the_field():
  cells = np.zeros((1, 2, 2), np.int32)
  with pytest.raises(ValueError, match="loss.mask_sampling"):
    objects.view_mask_ids("paired", jax.random.PRNGKey(0), cells, cells, 4)
