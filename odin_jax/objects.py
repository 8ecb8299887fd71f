"""From image-resolution segment maps to per-object feature vectors (jnp).

Everything here runs inside the jitted train step, per image, with static
shapes and no cross-device traffic:

  segments [B, H, W] --downsample_segments--> cells [B, h, w]  (majority id)
  cells1, cells2 --view_mask_ids(loss.mask_sampling)--> ids1, ids2 [B, M]:
    'per_view' (default) sample_mask_ids on each view with its own key:
               uniform over the ids present in that view, with replacement
               (DetCon paper §3.1; DeepMind's detcon_b.py sample_masks)
    'shared'   sample_shared_ids: the same ids for both views, among ids
               visible in both
    'all'      all_mask_ids: every id present, increasing, padded with
               PAD_ID (R2O: the loss uses all K cluster masks)
  features [B, h, w, C], cells, ids --pool_features--> [B, M, C]  (DetCon h_m)

No bound on the number or value of segment ids is assumed: ids are compared,
never one-hot encoded over an id range, so 16-bit or 32-bit ids cost nothing.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from odin_jax import numerics

# Row id meaning "no mask": it matches no cell (pools to zeros) and the
# losses give rows with a negative id weight 0 and never use them as
# negatives. Data and discovered segment ids are >= 0.
PAD_ID = -1

# loss.mask_sampling values (see the module docstring).
MASK_SAMPLING = ("per_view", "shared", "all")


def _mode_last_axis(values: jnp.ndarray) -> jnp.ndarray:
  """Most frequent value along the last axis; ties go to the smallest value.

  [..., N] -> [...]. This is exactly argmax over the average-pooled one-hot
  masks (argmax returns the first, i.e. smallest, id among equal counts).
  """
  s = jnp.sort(values, axis=-1)
  n = s.shape[-1]
  pos = jnp.broadcast_to(jnp.arange(n), s.shape)
  starts = jnp.concatenate(
      [jnp.ones_like(s[..., :1], bool), s[..., 1:] != s[..., :-1]], axis=-1)
  ends = jnp.concatenate(
      [s[..., 1:] != s[..., :-1], jnp.ones_like(s[..., :1], bool)], axis=-1)
  run_start = jax.lax.cummax(jnp.where(starts, pos, 0), axis=s.ndim - 1)
  run_end = jax.lax.cummin(jnp.where(ends, pos, n - 1), axis=s.ndim - 1,
                           reverse=True)
  run_len = run_end - run_start + 1
  best = jnp.argmax(run_len, axis=-1)
  return jnp.take_along_axis(s, best[..., None], axis=-1)[..., 0]


def downsample_segments(segments: jnp.ndarray, grid: tuple[int, int]):
  """Majority segment id of each feature-grid cell.

  Args:
    segments: int [B, H, W] segment ids aligned with the view.
    grid: (h, w) feature-map size, e.g. (7, 7) for ResNet-50 at 224.
  Returns:
    int [B, h, w]: per cell the id covering most of its pixels, i.e. the
    argmax over ids of the average-pooled one-hot masks (DetCon reference).
    When H is not a multiple of h (80 px -> 3x3), the map is first resized
    with nearest neighbour to the next multiple so cells are equal blocks.
  """
  b, height, width = segments.shape
  gh, gw = grid
  bh, bw = -(-height // gh), -(-width // gw)
  if (bh * gh, bw * gw) != (height, width):
    # The pixel-centre rule of tf.image.resize(method='nearest'), as the
    # input pipeline and discovery.mapping resize.
    segments = numerics.resize_nearest(segments, (bh * gh, bw * gw))
  blocks = segments.reshape(b, gh, bh, gw, bw).transpose(0, 1, 3, 2, 4)
  return _mode_last_axis(blocks.reshape(b, gh, gw, bh * bw))


def unique_ids(cells: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
  """Distinct ids per image, padded: (unique [B, N], num_unique [B]).

  cells: int [B, ...] per-cell ids. unique[b, :num_unique[b]] are image b's
  distinct ids in increasing order; the rest is the dtype's max value.
  """
  b = cells.shape[0]
  s = jnp.sort(cells.reshape(b, -1), axis=-1)
  is_new = jnp.concatenate(
      [jnp.ones((b, 1), bool), s[:, 1:] != s[:, :-1]], axis=-1)
  # Push repeats past the end so the first num_unique entries are the ids.
  big = jnp.iinfo(s.dtype).max
  return jnp.sort(jnp.where(is_new, s, big), axis=-1), is_new.sum(-1)


def sample_mask_ids(key: jax.Array, cells: jnp.ndarray, num_samples: int):
  """Samples segment ids uniformly among those present, with replacement.

  Args:
    key: PRNG key.
    cells: int [B, h, w] (or [B, N]) per-cell ids of one view.
    num_samples: M, ids drawn per image (16 in DetCon).
  Returns:
    int32 [B, M] ids; every returned id occurs in that image's cells.
  """
  unique, num_unique = unique_ids(cells)
  pick = jax.random.randint(key, (cells.shape[0], num_samples), 0,
                            num_unique[:, None])
  return jnp.take_along_axis(unique, pick, axis=-1).astype(jnp.int32)


def all_mask_ids(cells: jnp.ndarray, num_rows: int) -> jnp.ndarray:
  """Every distinct id of each image, in increasing order, padded.

  Args:
    cells: int [B, h, w] (or [B, N]) per-cell ids of one view.
    num_rows: M, rows per image. It must be at least the number of distinct
      ids an image can have (R2O: r2o.k_start, checked by config_check);
      ids past the first M would be dropped.
  Returns:
    int32 [B, M]: row m < n_b (n_b distinct ids in image b) is the m-th
    smallest id, the remaining rows are PAD_ID.
  """
  unique, count = unique_ids(cells)                          # [B, N]
  n = unique.shape[1]
  if n < num_rows:   # fewer cells than rows: pad the id list first
    pad = jnp.full((unique.shape[0], num_rows - n), PAD_ID, unique.dtype)
    unique = jnp.concatenate([unique, pad], axis=1)
  rows = jnp.arange(num_rows)[None]
  return jnp.where(rows < count[:, None], unique[:, :num_rows],
                   PAD_ID).astype(jnp.int32)


def view_mask_ids(mode: str, key: jax.Array, cells1: jnp.ndarray,
                  cells2: jnp.ndarray, num_rows: int
                  ) -> tuple[jnp.ndarray, jnp.ndarray]:
  """The mask ids the loss compares, per loss.mask_sampling `mode`.

  Args:
    mode: one of MASK_SAMPLING. 'per_view' draws each view's ids with its
      own key (split from `key`), as DeepMind's detcon_b.py calls
      sample_masks once per view; the caller passes the same ids to the
      online and the target network, as the reference does by giving both
      the same rng.
    key: PRNG key of this (micro-)batch's mask sampling (unused by 'all').
    cells1, cells2: int [B, h, w] per-cell ids of the two views.
    num_rows: M (config.num_masks).
  Returns:
    (ids1, ids2) int32 [B, M].
  """
  if mode == "per_view":
    key1, key2 = jax.random.split(key)
    return (sample_mask_ids(key1, cells1, num_rows),
            sample_mask_ids(key2, cells2, num_rows))
  if mode == "shared":
    return sample_shared_ids(key, cells1, cells2, num_rows)
  if mode == "all":
    return all_mask_ids(cells1, num_rows), all_mask_ids(cells2, num_rows)
  raise ValueError(f"loss.mask_sampling={mode!r}; choose one of "
                   f"{MASK_SAMPLING}.")


def sample_shared_ids(key: jax.Array, cells1: jnp.ndarray, cells2: jnp.ndarray,
                      num_samples: int) -> tuple[jnp.ndarray, jnp.ndarray]:
  """Samples the same ids for both views, among ids visible in both.

  loss.mask_sampling='shared', a variant (the default 'per_view' follows
  the paper and DeepMind's code). Sampling each view's ids independently
  wastes rows: with 30 segments on the grid and 16 draws per view, fewer
  than half of view 1's draws are also drawn in view 2, and a row without
  its positive has weight 0 in the loss. Drawing the same ids for both
  views, uniformly with replacement among those visible in both, makes
  every row a positive pair, but it also changes which masks are contrasted
  (only those visible in both crops) and how often. When an image's views
  share no id (disjoint crops), each view draws among its own ids, so no
  row pools an empty mask; the losses then give those rows weight 0.

  Args:
    key: PRNG key.
    cells1, cells2: int [B, h, w] per-cell ids of the two views.
    num_samples: M.
  Returns:
    (ids1, ids2) int32 [B, M]; ids1[b] == ids2[b] unless image b's views
    share no id.
  """
  unique1, count1 = unique_ids(cells1)                       # [B, N]
  unique2, count2 = unique_ids(cells2)
  pos = jax.vmap(jnp.searchsorted)(unique2, unique1)
  pos = jnp.minimum(pos, unique2.shape[1] - 1)
  valid1 = jnp.arange(unique1.shape[1])[None] < count1[:, None]
  shared = valid1 & (jnp.take_along_axis(unique2, pos, axis=1) == unique1)
  num_shared = shared.sum(-1)
  big = jnp.iinfo(unique1.dtype).max
  shared_ids = jnp.sort(jnp.where(shared, unique1, big), axis=-1)
  any_shared = num_shared > 0
  u = jax.random.uniform(key, (cells1.shape[0], num_samples))

  def draw(unique, count):
    pool = jnp.where(any_shared[:, None], shared_ids, unique)
    size = jnp.where(any_shared, num_shared, count)
    pick = jnp.minimum(jnp.floor(u * size[:, None]).astype(jnp.int32),
                       size[:, None] - 1)
    return jnp.take_along_axis(pool, pick, axis=-1).astype(jnp.int32)

  return draw(unique1, count1), draw(unique2, count2)


def pool_features(features: jnp.ndarray, cells: jnp.ndarray, ids: jnp.ndarray):
  """Mean of the feature vectors of the cells carrying each id (DetCon h_m).

  Args:
    features: float [B, h, w, C] hidden map.
    cells: int [B, h, w] per-cell ids.
    ids: int [B, M] ids to pool.
  Returns:
    float [B, M, C]. An id with no cell pools to zeros (not NaN).
  """
  b, gh, gw, c = features.shape
  member = (cells.reshape(b, 1, gh * gw) == ids[:, :, None]).astype(
      features.dtype)                                        # [B, M, hw]
  total = jnp.einsum("bmn,bnc->bmc", member, features.reshape(b, gh * gw, c))
  count = member.sum(-1, keepdims=True)
  return total / jnp.maximum(count, 1.0)


def mean_num_ids(cells: jax.Array) -> jax.Array:
  """Mean number of distinct ids per image. int [B, h, w] -> float32 []"""
  return jnp.mean(unique_ids(cells)[1].astype(jnp.float32))
