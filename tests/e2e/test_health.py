"""Training health: collapse statistics against NumPy, and the detector on
the real DetCon-B step with a collapsed (constant-output) network."""
import logging

import jax
import numpy as np
import pytest

from configs import detcon_b
from odin_jax import health, sharding


def _np_projection_std(z):
  unit = z / np.linalg.norm(z, axis=-1, keepdims=True)
  return unit.std(axis=0).mean()


def _np_rankme(z):
  sigma = np.linalg.svd(z.astype(np.float64), compute_uv=False)
  p = sigma / sigma.sum() + health.RANKME_EPS
  return np.exp(-(p * np.log(p)).sum())


@pytest.mark.parametrize("rank", [None, 1, 3])
def test_statistics_match_numpy(rank):
  rng = np.random.default_rng(0)
  n, d = 200, 16
  if rank is None:                     # full rank, spread over the sphere
    z = rng.normal(size=(n, d))
  else:                                # rank-deficient: rank `rank`
    z = rng.normal(size=(n, rank)) @ rng.normal(size=(rank, d))
  z = z.astype(np.float32)
  np.testing.assert_allclose(float(health.projection_std(z)),
                             _np_projection_std(z), rtol=1e-4)
  np.testing.assert_allclose(float(health.rankme(z)), _np_rankme(z),
                             rtol=2e-3)
  if rank is None:   # Gaussian rows: std ≈ 1/sqrt(D), RankMe near D
    assert abs(float(health.projection_std(z)) * np.sqrt(d) - 1) < 0.1
    assert float(health.rankme(z)) > 0.8 * d
  else:
    assert float(health.rankme(z)) < rank + 0.5


def test_padding_rows_are_left_out():
  rng = np.random.default_rng(1)
  z = rng.normal(size=(2, 5, 8)).astype(np.float32)      # [B, M, D]
  valid = np.ones((2, 5), bool)
  valid[:, 3:] = False
  padded = z.copy()
  padded[~valid] = 0.0      # pooled padding rows are zero vectors
  kept = z[valid]           # [6, 8]
  got = health.metrics([padded], [valid])
  np.testing.assert_allclose(float(got["health/projection_std"]),
                             _np_projection_std(kept), rtol=1e-4)
  np.testing.assert_allclose(float(got["health/rankme"]), _np_rankme(kept),
                             rtol=2e-3)


def test_constant_rows_are_collapsed():
  z = np.tile(np.linspace(-1, 2, 16, dtype=np.float32), (50, 1))
  assert float(health.projection_std(z)) < 1e-6
  assert float(health.rankme(z)) == pytest.approx(1.0, abs=0.01)


def _collapse(params):
  """The projector's last layer outputs one constant vector."""
  last = dict(params["projector"]["Dense_1"])
  last["kernel"] = np.zeros_like(last["kernel"])
  last["bias"] = np.linspace(0.5, 1.5, last["bias"].shape[0],
                             dtype=np.float32)
  return {**params, "projector": {**params["projector"], "Dense_1": last}}


@pytest.fixture(scope="module")
def detcon_step():
  """The DetCon-B :test step on 4 devices, its state and a batch."""
  from tests import helpers
  config = detcon_b.get_config("test")
  fn, state, mesh, rep = helpers.jit_train_step(config, jax.devices())
  batch = sharding.to_global(mesh, helpers.synthetic_batch(config))
  return config, fn, jax.device_get(state), batch, rep


def _health_of(detcon_step, collapse: bool):
  config, fn, state, batch, rep = detcon_step
  if collapse:   # the target projections (what health/* measures) collapse
    state = state.replace(target_params=_collapse(state.target_params))
  _, metrics = fn(jax.device_put(state, rep), batch)
  return {k: float(v) for k, v in jax.device_get(metrics).items()}


def _detector(config):
  h = config.health
  return health.CollapseDetector(config.model.projector_dim, h.std_fraction,
                                 h.min_rankme, h.patience)


def test_collapsed_network_trips_the_detector(detcon_step, caplog):
  config = detcon_step[0]
  scalars = _health_of(detcon_step, collapse=True)
  assert scalars["health/projection_std"] < 1e-4
  assert scalars["health/rankme"] == pytest.approx(1.0, abs=0.05)
  detector = _detector(config)
  with caplog.at_level(logging.WARNING):
    warned = [detector.update(10 * i, scalars)
              for i in range(config.health.patience + 2)]
  # Once, after `patience` consecutive collapsed logs.
  assert warned == [False] * (config.health.patience - 1) + [True, False, False]
  messages = [r.getMessage() for r in caplog.records
              if r.levelno == logging.WARNING]
  assert len(messages) == 1 and "collapse" in messages[0]
  assert "base_learning_rate" in messages[0]


def test_healthy_network_does_not_trip_the_detector(detcon_step, caplog):
  config = detcon_step[0]
  scalars = _health_of(detcon_step, collapse=False)
  d = config.model.projector_dim
  assert scalars["health/projection_std"] > 2 * config.health.std_fraction / np.sqrt(d)
  assert scalars["health/rankme"] > 2.0
  detector = _detector(config)
  with caplog.at_level(logging.WARNING):
    for i in range(2 * config.health.patience):
      assert not detector.update(i, scalars)
  assert not detector.tripped
  assert not [r for r in caplog.records if r.levelno == logging.WARNING]


def test_detector_needs_consecutive_collapsed_logs():
  detector = health.CollapseDetector(16, patience=2)
  bad = {"health/projection_std": 0.0, "health/rankme": 1.0}
  good = {"health/projection_std": 0.25, "health/rankme": 9.0}
  assert [detector.update(i, s) for i, s in
          enumerate([bad, good, bad, good, bad, bad])] == [False] * 5 + [True]


@pytest.mark.slow
def test_training_logs_health_timing_and_warns(tmp_path, caplog):
  """The loop writes health/* and the eval/checkpoint seconds, and feeds
  the detector (thresholds from config.health: here any RankMe trips it)."""
  from odin_jax import reporting, train
  config = detcon_b.get_config("test")
  config.total_steps, config.log_every_steps = 3, 1
  config.checkpoint_every_steps = 1
  # Online k-NN on held-out demo scenes (the 'knn' evaluation) every 2
  # steps: before step 1 (step 0) and before step 3 (step 2).
  config.eval.every_steps, config.eval.periodic = 2, ("knn",)
  config.health.min_rankme, config.health.patience = 1e9, 2
  config.mask_pictures_every_steps = 2
  with caplog.at_level(logging.WARNING):
    train.train_and_evaluate(config, str(tmp_path))
  records = reporting.read_metrics(str(tmp_path))
  knn = [r["step"] for r in records
         if any(k.endswith("/knn/accuracy") for k in r)]
  assert knn == [0, 2]
  records = [r for r in records if "train/loss" in r]
  assert [r["step"] for r in records] == [1, 2, 3]
  for r in records:
    assert 0 < r["health/projection_std"] < 1 and r["health/rankme"] >= 1
  # An evaluation's time shows in the log after it: steps 1 and 3.
  assert [r["train/eval_seconds"] > 0 for r in records] == [True, False, True]
  # A save follows its step's log, so its time shows in the next log.
  assert records[0]["train/checkpoint_seconds"] == 0.0
  assert all(r["train/checkpoint_seconds"] > 0 for r in records[1:])
  warnings = [r.getMessage() for r in caplog.records
              if r.levelno == logging.WARNING and "collapse" in r.getMessage()]
  assert len(warnings) == 1 and "step 2" in warnings[0]
  # The sampled-masks panels: at the first step and every 2 steps, two
  # views (rows) of view | masks | sampled masks (columns).
  size = config.image_size
  assert _images(tmp_path) == {("masks/sampled", 1): (3 * size, 2 * size),
                               ("masks/sampled", 2): (3 * size, 2 * size)}


def _images(workdir):
  """{(tag, step): (width, height)} of the image summaries in workdir."""
  import os

  import tensorflow as tf
  found = {}
  for name in os.listdir(workdir):
    if name.startswith("events.out.tfevents"):
      for event in tf.compat.v1.train.summary_iterator(
          os.path.join(workdir, name)):
        for value in event.summary.value:
          if value.metadata.plugin_data.plugin_name == "images":
            width, height = value.tensor.string_val[:2]
            found[(value.tag, event.step)] = (int(width), int(height))
  return found


def test_sampled_masks_panel_highlights_only_the_sampled_ids():
  from odin_jax.evaluate import pictures
  rng = np.random.default_rng(0)
  view1 = rng.random((16, 16, 3)).astype(np.float32)
  view2 = rng.integers(0, 256, (16, 16, 3)).astype(np.uint8)
  mask1 = np.repeat(np.arange(4), 4)[None].repeat(16, 0)   # 4 vertical bands
  mask2 = mask1.T                                           # 4 horizontal
  ids1, ids2 = np.array([2, 2, -1]), np.array([0, 3])
  panel = pictures.sampled_masks_panel(view1, mask1, ids1, view2, mask2, ids2)
  assert panel.shape == (32, 48, 3) and panel.dtype == np.uint8
  for row, view, mask, ids in ((0, view1, mask1, ids1),
                               (16, view2, mask2, ids2)):
    image, masks, chosen = (panel[row:row + 16, c:c + 16]
                            for c in (0, 16, 32))
    np.testing.assert_array_equal(image, pictures.to_uint8_image(view))
    sampled = np.isin(mask, ids[ids >= 0])
    assert 0 < sampled.sum() < sampled.size
    # Sampled segments keep their colour; the rest is the darkened view.
    np.testing.assert_array_equal(chosen[sampled], masks[sampled])
    np.testing.assert_array_equal(
        chosen[~sampled], np.round(image[~sampled] * 0.25).astype(np.uint8))
    assert not np.array_equal(masks[~sampled], chosen[~sampled])
