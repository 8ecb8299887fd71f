"""R2O: the region-to-object curriculum and region-cluster masks in the step."""
import jax
import numpy as np

from configs import r2o
from odin_jax import reporting, sharding, step, train
from odin_jax.data import pipeline, sources
from odin_jax.models import heads


def test_region_to_object_schedule_matches_paper_formula():
  config = r2o.get_config()
  k = step.region_clusters_schedule(config, total_steps=1000)
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
  return {k: v for k, v in batch.items() if k in train._STEP_KEYS}


def test_region_masks_follow_superpixels_and_k():
  config = r2o.get_config("test")
  model = heads.from_config(config)
  state = step.create_train_state(
      config, model, step.make_optimizer(config, lambda s: 0.1),
      jax.random.PRNGKey(0))
  batch = _batch(config)
  for total, at, max_k in ((10, 0, config.r2o.k_start), (10, 10, 4)):
    found = jax.jit(step.make_mask_discovery(
        config, model, region_clusters=step.region_clusters_schedule(
            config, total)))(state.replace(step=at), batch,
                             jax.random.PRNGKey(1))
    seg = np.asarray(found["span_segments"])
    assert seg.min() >= 0 and seg.max() < max_k
    # Clusters are shared by a group: at most K distinct ids per group.
    groups = seg.reshape(config.batch_size // config.r2o.group_size, -1)
    assert all(len(np.unique(g)) <= max_k for g in groups)
    assert np.mean([len(np.unique(s)) for s in seg]) > 1.5
    assert found["mask1"].shape == (config.batch_size, config.image_size,
                                    config.image_size)


def test_r2o_trains_end_to_end(tmp_path):
  config = r2o.get_config("test")
  config.total_steps = 2
  config.log_every_steps = 1
  state = train.train_and_evaluate(config, str(tmp_path))
  assert int(state.step) == 2
  records = reporting.read_metrics(str(tmp_path))
  assert records[0]["train/num_clusters"] == config.r2o.k_start
  assert all(np.isfinite(r["train/loss"]) for r in records)
