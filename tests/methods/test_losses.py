"""Losses against independent loop-based computations written here."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from odin_jax import losses


def _normalize(x):
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


def reference_detcon(p1, p2, t1, t2, ids1, ids2, tau):
  """DetCon loss one row at a time, written from DeepMind's byol_nce_detcon.

  Row (i, j) of view v: soft-label cross-entropy over the columns [other
  view's targets of every image ++ own view's targets of every image]. The
  own view's same-id targets of the same image are masked out; every copy of
  the row's id in the other view of the same image is a positive, with label
  1/(number of positives). Weight (positives > 0) / (copies of the id in the
  row's own view); each view's term is the mean over all B·M rows. Rows and
  columns with a negative (padding) id are dropped: our extension.
  """
  p = [_normalize(np.asarray(p1, np.float64)), _normalize(np.asarray(p2, np.float64))]
  t = [_normalize(np.asarray(t1, np.float64)), _normalize(np.asarray(t2, np.float64))]
  ids = [np.asarray(ids1), np.asarray(ids2)]
  b, m = ids[0].shape
  total = 0.0
  for v in (0, 1):
    o = 1 - v
    view_sum = 0.0
    for i in range(b):
      for j in range(m):
        k = ids[v][i, j]
        if k < 0:
          continue
        logits, labels = [], []
        for c in range(b):                      # the other view's targets
          for n in range(m):
            if ids[o][c, n] >= 0:
              logits.append(float(p[v][i, j] @ t[o][c, n]) / tau)
              labels.append(float(c == i and ids[o][c, n] == k))
        for c in range(b):                      # the own view's targets
          for n in range(m):
            if ids[v][c, n] >= 0 and not (c == i and ids[v][c, n] == k):
              logits.append(float(p[v][i, j] @ t[v][c, n]) / tau)
              labels.append(0.0)
        num_pos = sum(labels)
        if num_pos == 0:
          continue                              # weight 0
        mx = max(logits)
        log_norm = mx + math.log(sum(math.exp(x - mx) for x in logits))
        ce = -sum(lab / num_pos * (x - log_norm) for lab, x in zip(labels, logits))
        obj_area = sum(ids[v][i, n] == k for n in range(m))
        view_sum += ce / obj_area
    total += view_sum / (b * m)
  return total


def _random_case(seed, b=3, m=5, d=8, num_ids=4):
  rng = np.random.default_rng(seed)
  lat = [rng.normal(size=(b, m, d)).astype(np.float32) for _ in range(4)]
  ids1 = rng.integers(0, num_ids, size=(b, m)).astype(np.int32)
  ids2 = rng.integers(0, num_ids, size=(b, m)).astype(np.int32)
  return lat, ids1, ids2


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_detcon_matches_loop_reference(seed):
  lat, ids1, ids2 = _random_case(seed)
  # The case must exercise repeats, absent ids and several images.
  assert any(len(set(r)) < len(r) for r in ids1)
  assert any(not (set(a) & set(b)) or set(a) - set(b) for a, b in zip(ids1, ids2))
  got = losses.contrastive_detection_loss(*lat, ids1, ids2, temperature=0.1)
  want = reference_detcon(*lat, ids1, ids2, 0.1)
  np.testing.assert_allclose(float(got), want, rtol=1e-5)


def test_detcon_with_large_ids_and_other_temperature():
  lat, ids1, ids2 = _random_case(7, b=2, m=6, num_ids=3)
  ids1, ids2 = ids1 + 70000, ids2 + 70000   # 16/32-bit ids are fine
  got = losses.contrastive_detection_loss(*lat, ids1, ids2, temperature=0.5)
  np.testing.assert_allclose(float(got), reference_detcon(*lat, ids1, ids2, 0.5),
                             rtol=1e-5)


def test_detcon_invariant_to_permuting_images():
  lat, ids1, ids2 = _random_case(3, b=4)
  perm = np.array([2, 0, 3, 1])
  a = losses.contrastive_detection_loss(*lat, ids1, ids2)
  b = losses.contrastive_detection_loss(*[x[perm] for x in lat], ids1[perm],
                                        ids2[perm])
  np.testing.assert_allclose(float(a), float(b), rtol=1e-6)


def test_row_with_id_absent_from_other_view_has_no_effect():
  lat, ids1, ids2 = _random_case(4, b=2, m=3)
  ids1 = np.array([[0, 1, 2], [0, 1, 2]], np.int32)
  ids2 = np.array([[0, 1, 1], [0, 1, 2]], np.int32)   # id 2 absent in image 0
  base = losses.contrastive_detection_loss(*lat, ids1, ids2)
  # Changing the prediction of the absent row changes nothing.
  p1 = lat[0].copy()
  p1[0, 2] = 100.0
  moved = losses.contrastive_detection_loss(p1, *lat[1:], ids1, ids2)
  np.testing.assert_allclose(float(base), float(moved), rtol=1e-6)


def test_detcon_s_with_one_global_mask_equals_simclr():
  rng = np.random.default_rng(0)
  z1, z2 = (rng.normal(size=(6, 1, 16)).astype(np.float32) for _ in range(2))
  ids = np.zeros((6, 1), np.int32)
  detcon = losses.contrastive_detection_loss(z1, z2, z1, z2, ids, ids, 0.2)
  simclr = losses.simclr_loss(z1, z2, z1, z2, temperature=0.2)
  np.testing.assert_allclose(float(detcon), float(simclr), rtol=1e-6)
  # ... and SimCLR is the textbook NT-Xent over 2B anchors, times two.
  z = _normalize(np.concatenate([z1[:, 0], z2[:, 0]]).astype(np.float64))
  sim = z @ z.T / 0.2
  n = len(z)
  nt_xent = 0.0
  for a in range(n):
    pos = (a + 6) % n
    others = [sim[a, c] for c in range(n) if c != a]
    nt_xent += -sim[a, pos] + np.log(np.sum(np.exp(others)))
  np.testing.assert_allclose(float(simclr), 2 * nt_xent / n, rtol=1e-5)


def test_byol_loss_is_normalised_mse():
  rng = np.random.default_rng(1)
  p1, p2, t1, t2 = (rng.normal(size=(5, 1, 8)) for _ in range(4))
  want = 0.0
  for p, t in ((p1, t2), (p2, t1)):
    cos = np.sum(_normalize(p[:, 0]) * _normalize(t[:, 0]), -1)
    want += np.mean(2 - 2 * cos)
  np.testing.assert_allclose(float(losses.byol_loss(p1, p2, t1, t2)), want,
                             rtol=1e-5)
  # Identical directions give zero; DetCon's positive logit is the same
  # cosine: -l(b) + log-normaliser = cos/τ = (2 - BYOL term)/(2τ).
  assert float(losses.byol_loss(p1, p2, 3 * p2, 2 * p1)) == pytest.approx(0, abs=1e-6)


def test_single_mask_losses_reject_many_masks():
  lat, ids1, ids2 = _random_case(0)
  with pytest.raises(ValueError, match="num_masks=1"):
    losses.byol_loss(*lat)


def test_device_negatives_equals_per_shard_losses():
  devices = jax.devices()[:4]
  mesh = jax.make_mesh((4,), ("data",), axis_types=(jax.sharding.AxisType.Auto,),
                       devices=devices)
  lat, ids1, ids2 = _random_case(5, b=8, m=3)
  fn = losses.device_negatives_loss(
      lambda *a: losses.contrastive_detection_loss(*a, temperature=0.1), mesh)
  got = jax.jit(fn)(*lat, ids1, ids2)
  want = np.mean([reference_detcon(*[x[2 * k:2 * k + 2] for x in lat],
                                   ids1[2 * k:2 * k + 2], ids2[2 * k:2 * k + 2], 0.1)
                  for k in range(4)])
  np.testing.assert_allclose(float(got), want, rtol=1e-5)
  # and it differs from the global-negatives loss
  assert abs(float(got) - float(losses.contrastive_detection_loss(*lat, ids1, ids2))) > 1e-3


def _repeated_ids_case(seed, b=3, m=8, d=8, num_ids=3):
  """Latents as the step makes them: copies of an id are identical rows.

  Each view's rows pool one of num_ids segments, so every id is drawn about
  m / num_ids times and its copies share one latent. Every latent of a
  segment is near one direction per segment, as after some training, so
  the positives dominate the softmax.
  """
  rng = np.random.default_rng(seed)
  ids = [rng.integers(0, num_ids, size=(b, m)).astype(np.int32) for _ in range(2)]
  segment = rng.normal(size=(b, num_ids, d))
  lat = []
  for v in (0, 1, 0, 1):             # pred_1, pred_2, target_1, target_2
    per_id = (segment + 0.3 * rng.normal(size=segment.shape)).astype(np.float32)
    lat.append(np.take_along_axis(per_id, ids[v][..., None], axis=1))
  return lat, ids[0], ids[1]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_repeated_positives_stay_in_the_softmax(seed):
  # DeepMind keeps every copy of the positive among the logits (label 1/n
  # on each); dropping them (the old loss) gives about half the value here.
  lat, ids1, ids2 = _repeated_ids_case(seed)
  got = float(losses.contrastive_detection_loss(*lat, ids1, ids2, temperature=0.1))
  np.testing.assert_allclose(got, reference_detcon(*lat, ids1, ids2, 0.1), rtol=1e-5)


def test_padding_rows_have_no_effect():
  # 'all' sampling pads each image's rows with id -1: those rows and their
  # targets must change nothing but the number of rows averaged over.
  lat, ids1, ids2 = _random_case(6, b=3, m=4)
  rng = np.random.default_rng(8)
  pad = lambda x: np.concatenate(
      [x, rng.normal(size=(3, 2, x.shape[2])).astype(np.float32) * 5], 1)
  pad_ids = lambda x: np.concatenate([x, np.full((3, 2), -1, np.int32)], 1)
  padded = [pad(x) for x in lat]
  base = float(losses.contrastive_detection_loss(*lat, ids1, ids2))
  got = float(losses.contrastive_detection_loss(*padded, pad_ids(ids1), pad_ids(ids2)))
  np.testing.assert_allclose(got * 6, base * 4, rtol=1e-5)
  # Uneven padding (image 1 has one more id), against the loop.
  ids1p, ids2p = pad_ids(ids1), pad_ids(ids2)
  ids1p[1, 4] = 3
  np.testing.assert_allclose(
      float(losses.contrastive_detection_loss(*padded, ids1p, ids2p)),
      reference_detcon(*padded, ids1p, ids2p, 0.1), rtol=1e-5)
  # Per-mask BYOL averages over the weights: padding changes nothing at all.
  np.testing.assert_allclose(
      float(losses.mask_byol_loss(*padded, pad_ids(ids1), pad_ids(ids2))),
      float(losses.mask_byol_loss(*lat, ids1, ids2)), rtol=1e-5)


def reference_mask_byol(p1, p2, t1, t2, ids1, ids2):
  """Per-mask BYOL from the spec, row by row: each id present in both views
  counts once (weight 1/repeats), the mean taken over those ids."""
  p = [_normalize(np.asarray(p1, np.float64)), _normalize(np.asarray(p2, np.float64))]
  t = [_normalize(np.asarray(t1, np.float64)), _normalize(np.asarray(t2, np.float64))]
  ids = [np.asarray(ids1), np.asarray(ids2)]
  total = 0.0
  for v in (0, 1):
    o = 1 - v
    num, den = 0.0, 0.0
    for i in range(ids[v].shape[0]):
      row_ids = list(ids[v][i])
      for j, k in enumerate(row_ids):
        if k not in set(ids[o][i]):
          continue
        n = list(ids[o][i]).index(k)     # first copy in the other view
        w = 1.0 / row_ids.count(k)       # repeated draws count once
        num += w * (2 - 2 * float(p[v][i, j] @ t[o][i, n]))
        den += w
    total += num / den if den else 0.0
  return total


@pytest.mark.parametrize("seed", [0, 1])
def test_mask_byol_matches_reference(seed):
  lat, ids1, ids2 = _random_case(seed)
  got = float(losses.mask_byol_loss(*lat, ids1, ids2))
  np.testing.assert_allclose(got, reference_mask_byol(*lat, ids1, ids2),
                             rtol=1e-5)


def test_mask_byol_with_one_global_mask_equals_byol():
  rng = np.random.default_rng(2)
  lat = [rng.normal(size=(4, 1, 8)).astype(np.float32) for _ in range(4)]
  ids = np.zeros((4, 1), np.int32)
  np.testing.assert_allclose(float(losses.mask_byol_loss(*lat, ids, ids)),
                             float(losses.byol_loss(*lat)), rtol=1e-6)


@pytest.mark.parametrize("field,value,match", [
    ("local_negatives", True, "loss.negatives='device'"),   # the old name
    ("local_negatives", False, "renamed"),
    ("negatives", "local", "loss.negatives"),
    ("mask_sampling", "paired", "loss.mask_sampling"),
])
def test_loss_fields_are_validated(field, value, match):
  from configs import detcon_b
  from odin_jax import config_check
  config = detcon_b.get_config("test")
  assert (config.loss.negatives, config.loss.mask_sampling) == ("global", "per_view")
  config_check.validate(config)
  config.loss[field] = value
  with pytest.raises(config_check.ConfigError, match=match):
    config_check.validate(config)


def test_all_ids_with_r2o_needs_a_row_per_cluster():
  from configs import r2o
  from odin_jax import config_check
  config = r2o.get_config("test")
  config.loss.mask_sampling = "all"
  config.num_masks = config.r2o.k_start
  config_check.validate(config)
  config.num_masks = config.r2o.k_start - 1
  with pytest.raises(config_check.ConfigError, match="r2o.k_start"):
    config_check.validate(config)
