"""Odin: τ schedules, discovered masks in the shared step, end to end."""
import os

import jax
import numpy as np
import pytest
import tensorflow as tf

from configs import odin
from odin_jax import methods, reporting, sharding, step, train
from odin_jax.data import pipeline, sources
from odin_jax.methods import odin as odin_method


def _config(**odin_fields):
  config = odin.get_config("test")
  config.odin.update(odin_fields)
  return config


def test_tau_rate_schedules():
  ema = odin_method.tau_rate_schedule(_config(ema_rate=1e-3), 10)
  np.testing.assert_allclose([float(ema(s)) for s in (0, 5, 99)], [1e-3] * 3)
  copy = odin_method.tau_rate_schedule(
      _config(tau_update="copy", copy_every_epochs=0.5), 10)   # every 5 steps
  rates = [float(copy(s)) for s in range(12)]
  # τ ← θ after steps 5 and 10 (state.step 4 and 9 are being taken).
  assert rates == [0, 0, 0, 0, 1, 0, 0, 0, 0, 1, 0, 0]


def _pipeline_batch(config):
  source = sources.make_source(config)
  ds = pipeline.make_train_dataset(config, source,
                                   global_batch_size=config.batch_size)
  batch = next(ds.as_numpy_iterator())
  for key in ("span", "box1", "box2", "flip1", "flip2"):
    assert key in batch, key
  assert batch["span"].shape[1] == 2 * config.image_size
  keys = methods.get(config).batch_keys()
  return {k: v for k, v in batch.items() if k in keys}


def _one_step(config, batch, devices):
  method = methods.get(config, total_steps=100, steps_per_epoch=10)
  model = method.network()
  lr = step.learning_rate_schedule(config, 100, 10)
  ema = step.ema_decay_schedule(config, 100)
  tx = step.make_optimizer(config, lambda count: 0.1)   # no warm-up: moves
  state = step.create_train_state(config, model, tx, jax.random.PRNGKey(0))
  mesh = sharding.make_mesh(devices)
  rep = sharding.replicated(mesh)
  fn = jax.jit(step.make_train_step(config, model, tx, lr, ema, mesh,
                                    method),
               in_shardings=(rep, sharding.batch_sharded(mesh)),
               out_shardings=(rep, rep))
  state = jax.device_put(state, rep)
  new_state, metrics = fn(state, sharding.to_global(mesh, batch))
  return jax.device_get(state), jax.device_get(new_state), {
      k: float(v) for k, v in jax.device_get(metrics).items()}


@pytest.mark.parametrize("update,rate", [("ema", 0.25), ("copy", 1.0)])
def test_step_discovers_masks_and_moves_tau(update, rate):
  config = _config(tau_update=update, ema_rate=rate, copy_every_epochs=0.1)
  batch = _pipeline_batch(config)
  old, new, metrics = _one_step(config, batch, jax.devices()[:1])
  assert metrics["train/tau_rate"] == rate
  # More than one segment per spanning view: the masks are not trivial.
  assert 1.5 < metrics["train/discovered_segments"] <= config.odin.num_clusters
  for t0, t1, p1 in zip(jax.tree.leaves(old.method_state["tau"]),
                        jax.tree.leaves(new.method_state["tau"]),
                        jax.tree.leaves(new.params)):
    np.testing.assert_allclose(t1, t0 + rate * (p1 - t0), rtol=1e-5,
                               atol=1e-7)
  moved = max(np.abs(a - b).max() for a, b in zip(
      jax.tree.leaves(old.params), jax.tree.leaves(new.params)))
  assert moved > 1e-5


def test_odin_one_device_equals_four_devices():
  config = _config()
  batch = _pipeline_batch(config)
  _, s1, m1 = _one_step(config, batch, jax.devices()[:1])
  _, s4, m4 = _one_step(config, batch, jax.devices())
  np.testing.assert_allclose(m1["train/loss"], m4["train/loss"], rtol=1e-5)
  assert m1["train/discovered_segments"] == m4["train/discovered_segments"]
  for a, b in zip(jax.tree.leaves(s1.params), jax.tree.leaves(s4.params)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def _image_tags(workdir):
  tags = set()
  for name in os.listdir(workdir):
    if name.startswith("events.out.tfevents"):
      for event in tf.compat.v1.train.summary_iterator(
          os.path.join(workdir, name)):
        for value in event.summary.value:
          if value.metadata.plugin_data.plugin_name == "images" or (
              value.HasField("image")):
            tags.add(value.tag)
  return tags


def test_odin_trains_end_to_end_and_logs_pictures(tmp_path):
  config = _config()
  config.mask_pictures_every_steps = 2
  config.total_steps = 3
  config.log_every_steps = 1
  state = train.train_and_evaluate(config, str(tmp_path))
  assert int(state.step) == 3
  records = reporting.read_metrics(str(tmp_path))
  assert [r["step"] for r in records] == [1, 2, 3]
  assert all(r["train/discovered_segments"] > 1.5 for r in records)
  assert "discovery/masks" in _image_tags(str(tmp_path))
