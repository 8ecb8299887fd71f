"""The shared train step: sharding invariance, schedules, optimizer masks."""
import jax
import numpy as np
import pytest

from configs import byol, detcon_b, detcon_s
from odin_jax import objects, rng, step
from odin_jax.models import network
from tests import helpers


# One definition of the tiny step, batch and run (tests/helpers.py) keeps
# the compiled programs identical across files (persistent XLA cache).
_setup, _batch, _run = (helpers.train_setup, helpers.synthetic_batch,
                        helpers.run_steps)


@pytest.mark.parametrize("cfg", [detcon_b, detcon_s], ids=["detcon_b", "detcon_s"])
def test_one_device_equals_four_devices(cfg):
  config = cfg.get_config("test")
  assert len(jax.devices()) == 4
  loss1, state1 = _run(config, jax.devices()[:1])
  loss4, state4 = _run(config, jax.devices())
  np.testing.assert_allclose(loss1, loss4, rtol=1e-5)
  for a, b in zip(jax.tree.leaves((state1.params, state1.batch_stats, state1.target_params)),
                  jax.tree.leaves((state4.params, state4.batch_stats, state4.target_params))):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
  assert int(state4.step) == 2
  # The parameters did move (the comparison above is not vacuous).
  _, _, _, _, init = _setup(config)
  moved = [np.abs(np.asarray(a) - np.asarray(b)).max()
           for a, b in zip(jax.tree.leaves(init.params), jax.tree.leaves(state4.params))]
  assert max(moved) > 1e-4


def test_schedules():
  config = detcon_b.get_config()
  lr = step.learning_rate_schedule(config, 1000, 100)
  peak = 0.2 * 4096 / 256
  assert float(lr(0)) == 0.0
  assert float(lr(50)) == pytest.approx(peak / 2, rel=1e-5)
  assert float(lr(100)) == pytest.approx(peak, rel=1e-5)
  assert float(lr(550)) == pytest.approx(peak / 2, rel=1e-3)     # cosine midpoint
  assert float(lr(1000)) == pytest.approx(0.0, abs=1e-6)
  ema = step.ema_decay_schedule(config, 1000)
  assert float(ema(0)) == pytest.approx(0.996)
  assert float(ema(500)) == pytest.approx(0.998)
  assert float(ema(1000)) == pytest.approx(1.0)
  total, warm = step.schedule_lengths(config, 1_281_167)
  assert (total, warm) == (312 * 1000, 3120)
  config.total_steps = 77
  assert step.schedule_lengths(config, 1_281_167)[0] == 77


def test_lars_skips_bias_and_norm_parameters():
  config = detcon_b.get_config("test")
  params = {"dense": {"kernel": np.ones((3, 4), np.float32), "bias": np.ones(4, np.float32)},
            "bn": {"scale": np.ones(4, np.float32)}}
  mask = step._exclude_bias_and_norm(params)
  assert mask == {"dense": {"kernel": True, "bias": False}, "bn": {"scale": False}}
  # With zero gradients, only the kernel decays.
  config.optimizer.weight_decay = 0.1
  tx = step.make_optimizer(config, 1.0)
  zeros = jax.tree.map(np.zeros_like, params)
  updates, _ = tx.update(zeros, tx.init(params), params)
  assert np.abs(updates["dense"]["kernel"]).max() > 0
  assert np.abs(updates["dense"]["bias"]).max() == 0
  assert np.abs(updates["bn"]["scale"]).max() == 0


def test_method_structure():
  for cfg, has_target, has_pred in [(detcon_b, True, True), (detcon_s, False, False),
                                    (byol, True, True)]:
    config = cfg.get_config("test")
    *_, state = _setup(config)
    assert bool(state.target_params) == has_target
    assert ("predictor" in state.params) == has_pred


def test_gradient_accumulation_runs_and_uses_micro_batches():
  config = detcon_b.get_config("test")
  config.grad_accum_steps = 2
  losses, state = _run(config, jax.devices(), steps=1)
  assert np.isfinite(losses[0]) and int(state.step) == 1
  batch = {"x": np.arange(8)}
  micro = step._micro_batches(jax.tree.map(np.asarray, batch), 2)
  # strided split: each micro-batch takes examples from every device's shard
  np.testing.assert_array_equal(np.asarray(micro["x"]), [[0, 2, 4, 6], [1, 3, 5, 7]])


def _consumed_keys(state, k):
  """Every key one step draws from, named: masks, and per micro-batch
  the two per-view mask-sampling keys (objects.view_mask_ids splits the
  micro-batch key in two) and the micro-batch key itself (hiergroup)."""
  keys = rng.step_keys(state, k)
  out = {"masks": keys["masks"], "color": keys["color"]}
  for i in range(k):
    out[f"loss{i}"] = keys["loss"][i]
    for v, view_key in enumerate(jax.random.split(keys["loss"][i])):
      out[f"loss{i}/view{v + 1}"] = view_key
  return out


def test_no_two_consumers_share_a_key():
  # fold_in(step_key, 1) was both Odin/R2O's discovery key and micro-batch
  # 1's mask-sampling key: their first uniforms were identical.
  import jax.numpy as jnp
  for k in (1, 2, 4):                  # one run uses one grad_accum_steps
    first_draws = {}
    for number in (0, 1, 7):
      state = step.TrainState(step=jnp.int32(number), params={},
                              target_params={}, batch_stats={}, opt_state=(),
                              rng=jax.random.PRNGKey(3))
      # The masks stream is the same whatever the micro-batch count (the
      # training pictures draw it with k = 1).
      np.testing.assert_array_equal(
          jax.random.key_data(rng.step_keys(state)["masks"]),
          jax.random.key_data(rng.step_keys(state, k)["masks"]))
      for name, key in _consumed_keys(state, k).items():
        first = float(jax.random.uniform(key))
        assert first not in first_draws, (k, number, name, first_draws[first])
        first_draws[first] = (number, name)
    assert len(first_draws) == 3 * (2 + 3 * k)


def test_all_ids_sampling_trains_without_randomness_in_the_loss():
  # loss.mask_sampling='all' (R2O) pools every id of each view, padded with
  # -1 rows: the step runs, and its loss does not depend on the step's key.
  config = detcon_b.get_config("test")
  config.loss.mask_sampling = "all"
  config.num_masks = 12                # > the 3x3 grid's 9 cells: padding
  # No colour augmentation: its draws follow the step's key too.
  a = config.augment
  a.color_jitter_prob = a.grayscale_prob = 0.0
  a.blur_prob = a.solarize_prob = (0.0, 0.0)
  model, tx, lr, ema, state = _setup(config)
  fn = jax.jit(step.make_train_step(config, model, tx, lr, ema))
  batch = _batch(config)
  loss_a = float(fn(state, batch)[1]["train/loss"])
  loss_b = float(fn(state.replace(rng=jax.random.PRNGKey(9)), batch)[1]["train/loss"])
  assert np.isfinite(loss_a) and loss_a > 0
  assert loss_a == loss_b
  cells = [np.asarray(objects.downsample_segments(batch[m], network.feature_grid(config)))
           for m in ("mask1", "mask2")]
  ids = objects.view_mask_ids("all", None, *cells, 12)
  assert (np.asarray(ids[0]) == -1).any()        # the case has padding rows
