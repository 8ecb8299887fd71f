"""Odin's cached path: masks refreshed per copy period, read back as records."""
import os

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from configs import odin
from odin_jax import checkpoint, config_check, sharding, step, train
from odin_jax.data import records, sources
from odin_jax import methods
from odin_jax.methods import odin as odin_method
from odin_jax.methods import odin_cache as cache


# The test demo set holds 28 images (16 scenes + 12 photos): at batch 8 an
# epoch is 3 steps, so τ ← θ and the masks are refreshed every 3 steps.
PERIOD = 3


def _config(total_steps=PERIOD + 1):
  config = odin.get_config("test")
  config.odin.tau_update = "copy"
  config.odin.cached = True
  config.odin.copy_every_epochs = 1.0
  config.total_steps = total_steps
  config.log_every_steps = 1
  config.checkpoint_every_steps = PERIOD
  return config


def test_cached_needs_copy_updates():
  config = _config()
  config.odin.tau_update = "ema"
  with pytest.raises(ValueError, match="tau_update='copy'"):
    config_check.validate(config)


def _restore(workdir, config, number):
  model = methods.get(config).network()
  tx = step.make_optimizer(config, lambda count: 0.0)
  state = step.create_train_state(config, model, tx, jax.random.PRNGKey(0))
  abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, state)
  mngr = checkpoint.manager(workdir, 3)
  restored = mngr.restore(number, args=ocp.args.Composite(
      state=ocp.args.StandardRestore(abstract)))
  return model, restored["state"]


def _nearest(labels, height, width):   # pixel-centre nearest, written here
  h, w = labels.shape
  rows = [min(int((i + 0.5) * h / height), h - 1) for i in range(height)]
  cols = [min(int((j + 0.5) * w / width), w - 1) for j in range(width)]
  return labels[np.ix_(rows, cols)]


def _same_partition(a, b):
  """True when two label maps group the pixels identically."""
  pairs = set(zip(a.ravel().tolist(), b.ravel().tolist()))
  return len(pairs) == len(np.unique(a)) == len(np.unique(b))


def test_refreshed_records_hold_tau_segments_and_resume_is_exact(
    tmp_path, monkeypatch):
  # Uninterrupted: refreshes at steps 0 and PERIOD.
  full_dir = str(tmp_path / "full")
  full = train.train_and_evaluate(_config(), full_dir)
  root = os.path.join(full_dir, "odin_masks")
  assert os.listdir(root) == ["period_00001"]     # period 0 was removed
  period1 = cache.period_dir(full_dir, 1)
  meta = records.read_json(os.path.join(period1, records.METADATA))
  config = _config()
  base = sources.make_source(config)
  assert meta["num_examples"] == base.num_examples
  assert cache.period_steps(config, base.num_examples) == PERIOD
  assert meta["mask_settings"] == {"odin": "odin"}

  # The records hold k-means segments of τ = θ after PERIOD steps (that
  # checkpoint), computed here directly with the discovery function on the
  # same images.
  model, state = _restore(full_dir, config, PERIOD)
  for tau, theta in zip(jax.tree.leaves(state.method_state["tau"]),
                        jax.tree.leaves(state.params)):
    np.testing.assert_array_equal(tau, theta)
  source = records.RecordSource(period1, ["odin"])
  g, s = config.batch_size, 2 * config.image_size
  import tensorflow as tf
  ids = list(range(g))                     # batch 0 of the refresh
  images = np.stack([base.lookup(tf.constant(i, tf.int64))["image"].numpy()
                     for i in ids])
  span = tf.image.resize(images.astype(np.float32) / 255.0, (s, s),
                         antialias=True).numpy().clip(0, 1)
  key = jax.random.fold_in(jax.random.fold_in(
      jax.random.fold_in(state.rng, cache._REFRESH_SALT), 1), 0)
  # Laid out as the refresh lays it out (the training mesh, images split
  # over 'data'): k-means on one device instead can flip a borderline
  # pixel's cluster through float rounding alone.
  mesh = sharding.make_mesh(jax.devices())
  discover = jax.jit(odin_method.make_discover(config, model),
                     in_shardings=(None, None, sharding.batch_sharded(mesh),
                                   None),
                     out_shardings=sharding.batch_sharded(mesh))
  rep = sharding.replicated(mesh)
  direct = np.asarray(discover(
      jax.device_put(state.method_state["tau"], rep),
      jax.device_put(state.batch_stats, rep),
      sharding.to_global(mesh, {"span": span})["span"],
      jax.device_put(key, rep)))
  stored = {}
  for i in range(source.num_examples):
    ex = source.lookup(tf.constant(i, tf.int64))
    stored[ex["id"].numpy().decode()] = ex["segments"].numpy()
  agree = 0
  for i in ids:
    got = stored[str(i)]
    want = _nearest(direct[i], *got.shape)
    agree += _same_partition(got, want)
    assert len(np.unique(got)) > 1
  assert agree == len(ids), f"{agree}/{len(ids)} images match"

  # A run that crashes in the period-1 refresh, restarted: the refresh is
  # redone from checkpoint PERIOD and training continues as if never stopped.
  part_dir = str(tmp_path / "part")
  refresh = cache.MaskCache.refresh

  def crash(self, state, p, *args, **kwargs):
    if p == 1:
      raise RuntimeError("simulated crash in the refresh")
    return refresh(self, state, p, *args, **kwargs)

  monkeypatch.setattr(cache.MaskCache, "refresh", crash)
  with pytest.raises(RuntimeError, match="simulated crash"):
    train.train_and_evaluate(_config(), part_dir)
  monkeypatch.undo()
  assert not os.path.exists(os.path.join(cache.period_dir(part_dir, 1),
                                         records.METADATA))
  resumed = train.train_and_evaluate(_config(), part_dir)
  for a, b in zip(jax.tree.leaves(jax.device_get(full.params)),
                  jax.tree.leaves(jax.device_get(resumed.params))):
    np.testing.assert_array_equal(a, b)
