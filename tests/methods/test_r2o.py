"""R2O: the region-to-object curriculum and region-cluster masks in the step."""
import os

import jax
import numpy as np
import pytest
import tensorflow as tf
from absl import flags
from ml_collections import config_flags

from configs import r2o
from odin_jax import (config_check, methods, objects, reporting, step,
                      train)
from odin_jax.data import pipeline, sources, spanning
from odin_jax import span_mapping as mapping
from odin_jax.methods import r2o as r2o_method
from odin_jax.methods.base import SpanView
from odin_jax.models import network

IMAGENET = 1_281_167     # ImageNet-1k train images


def _flag_config(*overrides):
  """configs/r2o.py as main.py resolves it, with --config.X=V overrides."""
  argv = ["prog", f"--config={os.path.abspath(r2o.__file__)}", *overrides]
  values = flags.FlagValues()
  # config_flags reads the overrides from sys_argv (sys.argv by default).
  config_flags.DEFINE_config_file("config", flag_values=values,
                                  sys_argv=argv)
  values(argv)
  return values.config


def test_preset_follows_r2o_recipe():
  """R2O's official config (train_imagenet_300.yaml): 300 epochs, 3 warm-up
  epochs, EMA base momentum 0.99, weight decay 1e-6, lr 0.3 x B/256, and
  k-means on the whole image at 224 px."""
  c = _flag_config()
  config_check.validate(c)
  assert c.num_epochs == 300 and c.batch_size == 4096
  assert c.ema.base_decay == 0.99 and c.optimizer.weight_decay == 1e-6
  assert c.optimizer.base_learning_rate == 0.3
  per_epoch = IMAGENET // 4096                       # 312 steps
  assert step.schedule_lengths(c, IMAGENET) == (300 * per_epoch,
                                                3 * per_epoch)
  assert c.r2o.cluster_view == "image"
  assert methods.get(c).span_view() == SpanView(224, whole_image=True,
                                                with_segments=True)
  assert c.loss.mask_sampling == "all" and c.num_masks == c.r2o.k_start


@pytest.mark.parametrize("override, total, warmup", [
    ("--config.num_epochs=100", 100 * 50, 50),      # 1 epoch of 100
    ("--config.num_epochs=1000", 1000 * 50, 500),   # 10 epochs of 1000
    ("--config.total_steps=2000", 2000, 20)])
def test_warmup_is_one_percent_of_the_run_as_overridden(override, total,
                                                        warmup):
  """The warm-up is derived when the run starts, so a command-line
  num_epochs / total_steps moves it; the lr peaks exactly there."""
  c = _flag_config(override)
  num_examples = 50 * c.batch_size                   # 50 steps per epoch
  assert step.schedule_lengths(c, num_examples) == (total, warmup)
  lr = step.learning_rate_schedule(c, total, warmup)
  peak = 0.3 * c.batch_size / 256
  # Linear warm-up (the reference: lr = step / warmup_steps * max_lr).
  np.testing.assert_allclose([float(lr(s)) for s in (0, warmup // 2,
                                                     warmup - 1, warmup)],
                             [0.0, peak * (warmup // 2) / warmup,
                              peak * (warmup - 1) / warmup, peak], rtol=1e-5)
  # Then cosine to 0 over the rest: half the peak half-way through it.
  np.testing.assert_allclose(float(lr(warmup + (total - warmup) // 2)),
                             peak / 2, rtol=1e-3)


@pytest.mark.parametrize("field,value", [("r2o.cluster_view", "crop"),
                                         ("warmup_fraction", 1.5)])
def test_bad_cluster_view_fails_clearly(field, value):
  c = r2o.get_config("test")
  section, _, name = field.rpartition(".")
  setattr(c[section] if section else c, name, value)
  with pytest.raises(config_check.ConfigError, match=field):
    config_check.validate(c)


# A non-square scene; P / H and P / W (P = 160 at the test preset) put no
# output cell centre exactly on a source-pixel edge, so nearest is exact.
_H, _W = 96, 112


def _scene_segments():
  """int32 [H, W]: asymmetric ~10 x 12 px blocks (a flip changes the map)."""
  yy, xx = np.mgrid[:_H, :_W]
  return ((yy + xx // 7) // 10 * 16 + (xx + yy // 9) // 12).astype(np.int32)


def _nearest(n_out, start, length, n_src_frame, n_cells):
  """NumPy nearest resampling along one axis: the frame cell under each
  output cell centre. Output cell i covers source [start, start + length)
  (source pixels); the frame has n_src_frame pixels split into n_cells."""
  pos = start + (np.arange(n_out) + 0.5) * length / n_out
  return np.minimum((pos * n_cells / n_src_frame).astype(int), n_cells - 1)


def test_whole_image_is_clustered_and_maps_into_the_views():
  """R2O's raw view: 'span' is the whole image at P x P (not the spanning
  box of the two crops), its superpixels are the whole image's, the boxes
  are the crops relative to the whole image, and a mask painted on it lands
  in each view as a NumPy crop/flip/resize of that mask does."""
  config = r2o.get_config("test")
  span = methods.get(config).span_view()
  size, p = config.image_size, span.size
  assert p == 2 * size
  segments = _scene_segments()
  image = np.random.RandomState(0).randint(0, 256, (_H, _W, 3), np.uint8)
  fn = tf.function(lambda seed: spanning.two_views_with_span(
      image, segments, seed, config, span))
  geometry = tf.function(lambda seed: spanning.view_geometry(
      seed, _H, _W, config))
  whole = segments[_nearest(p, 0, _H, _H, _H)][:, _nearest(p, 0, _W, _W, _W)]
  flips, spanning_smaller = set(), 0
  for i in range(6):
    seed = tf.constant([i, 7], tf.int64)
    out = {k: v.numpy() for k, v in fn(seed).items()}
    assert out["span"].shape == (p, p, 3)
    np.testing.assert_array_equal(out["span_mask"], whole)
    for v, (box, flip) in enumerate(geometry(seed), start=1):
      y0, x0, h, w = (int(t) for t in box)
      flips.add(bool(flip))
      spanning_smaller += (h, w) != (_H, _W)
      np.testing.assert_allclose(
          out[f"box{v}"], [y0 / _H, x0 / _W, (y0 + h) / _H, (x0 + w) / _W],
          atol=1e-6)
      assert bool(out[f"flip{v}"]) == bool(flip)
      # The whole-image mask cropped into the view, in NumPy.
      want = whole[_nearest(size, y0, h, _H, p)][:, _nearest(size, x0, w,
                                                             _W, p)]
      want = want[:, ::-1] if flip else want
      got = np.asarray(mapping.map_segments(
          whole[None], out[f"box{v}"][None], out[f"flip{v}"][None],
          (size, size)))[0]
      assert np.mean(got == want) > 0.995   # float32 ties aside
      # ... and it lands on the same content as the view's own mask.
      assert np.mean(got == out[f"mask{v}"]) > 0.95
  assert flips == {True, False} and spanning_smaller > 0


def test_region_to_object_schedule_matches_paper_formula():
  config = r2o.get_config()
  k = r2o_method.num_clusters_schedule(config, total_steps=1000)
  got = [int(k(s)) for s in (0, 250, 500, 750, 1000, 2000)]
  want = [round(4 + 124 * np.cos(np.pi / 2 * e)) for e in
          (0, 0.25, 0.5, 0.75, 1.0, 1.0)]
  assert got == want and got[0] == 128 and got[-1] == 4


def _batch(config):
  source = sources.make_source(config)
  ds = pipeline.make_train_dataset(config, source,
                                   global_batch_size=config.batch_size)
  batch = next(ds.as_numpy_iterator())
  assert batch["span_mask"].shape == batch["span"].shape[:3]
  p = methods.get(config).span_view().size   # the whole image, at P px
  assert batch["span"].shape == (config.batch_size, p, p, 3)
  keys = methods.get(config).batch_keys()
  return {k: v for k, v in batch.items() if k in keys}


def test_region_masks_follow_superpixels_and_k():
  config = r2o.get_config("test")
  model = methods.get(config).network()
  state = step.create_train_state(
      config, model, step.make_optimizer(config, lambda s: 0.1),
      jax.random.PRNGKey(0))
  batch = _batch(config)
  for total, at, max_k in ((10, 0, config.r2o.k_start), (10, 10, 4)):
    method = methods.get(config, total_steps=total, steps_per_epoch=1)
    found = jax.jit(method.make_find_masks(model))(
        state.replace(step=at), batch, jax.random.PRNGKey(1))
    seg = np.asarray(found["span_segments"])
    assert seg.min() >= 0 and seg.max() < max_k
    # Clusters are shared by a group: at most K distinct ids per group.
    groups = seg.reshape(config.batch_size // config.r2o.group_size, -1)
    assert all(len(np.unique(g)) <= max_k for g in groups)
    assert np.mean([len(np.unique(s)) for s in seg]) > 1.5
    assert found["mask1"].shape == (config.batch_size, config.image_size,
                                    config.image_size)
    # The loss rows: every cluster present in a view (R2O's loss uses all K
    # masks), increasing, padded with -1; none dropped, none sampled twice.
    grid = network.feature_grid(config)
    for v in ("mask1", "mask2"):
      cells = objects.downsample_segments(found[v], grid)
      ids = np.asarray(objects.view_mask_ids(
          config.loss.mask_sampling, jax.random.PRNGKey(2), cells, cells,
          config.num_masks)[0])
      for row, image_cells in zip(ids, np.asarray(cells)):
        present = np.unique(image_cells)
        assert row.shape == (config.r2o.k_start,)
        np.testing.assert_array_equal(row[:len(present)], present)
        assert (row[len(present):] == -1).all()


def test_r2o_trains_end_to_end(tmp_path):
  config = r2o.get_config("test")
  config.total_steps = 2
  config.log_every_steps = 1
  state = train.train_and_evaluate(config, str(tmp_path))
  assert int(state.step) == 2
  records = reporting.read_metrics(str(tmp_path))
  assert records[0]["train/num_clusters"] == config.r2o.k_start
  assert all(np.isfinite(r["train/loss"]) for r in records)
