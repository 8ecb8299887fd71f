"""Memory and profiling options: remat, FSDP sharding, profiler traces.

None of them may change what is computed: remat keeps the parameter tree
(exported to torchvision by name) and the gradients, FSDP gives the
replicated run's losses and parameters, and a checkpoint written with FSDP
restores into the sharded state.
"""
import glob
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from configs import detcon_b
from odin_jax import (checkpoint, config_compat, profiling, reporting, sharding,
                      train)
from odin_jax.models import network, resnet


def _grad_fn(remat: str, stats, images):
  """params -> gradient of a loss on every stage's features."""
  model = resnet.ResNet(depth=18, width=0.125, remat=remat)

  def loss(p):
    feats, _ = model.apply({"params": p, "batch_stats": stats}, images,
                           train=True, mutable=["batch_stats"])
    return sum(jnp.mean(jnp.square(f)) for f in feats.values())

  return jax.grad(loss)


def _jaxpr(remat, params, stats, images) -> str:
  return str(jax.make_jaxpr(_grad_fn(remat, stats, images))(params))


def _grads(remat, params, stats, images):
  return jax.jit(_grad_fn(remat, stats, images))(params)


def test_remat_keeps_parameter_names_and_gradients():
  images = jax.random.uniform(jax.random.PRNGKey(1), (2, 80, 80, 3))
  trees = {r: jax.eval_shape(lambda r=r: resnet.ResNet(
      depth=18, width=0.125, remat=r).init(jax.random.PRNGKey(0), images))
           for r in resnet.REMAT_MODES}
  for r in ("blocks", "stages"):
    assert jax.tree_util.tree_flatten_with_path(trees[r])[1] == \
        jax.tree_util.tree_flatten_with_path(trees["none"])[1]
    assert jax.tree.map(lambda x: (x.shape, x.dtype), trees[r]) == \
        jax.tree.map(lambda x: (x.shape, x.dtype), trees["none"])
  # The whole network too (config field -> heads -> backbone).
  config = detcon_b.get_config("test")
  shapes = {}
  for r in resnet.REMAT_MODES:
    config.model.remat = r
    model = network.from_config(config)
    shapes[r] = jax.eval_shape(lambda: model.init(
        jax.random.PRNGKey(0), images, jnp.zeros((2, 3, 3), jnp.int32),
        jnp.zeros((2, 4), jnp.int32), train=False))
  assert jax.tree.structure(shapes["blocks"]) == \
      jax.tree.structure(shapes["none"]) == jax.tree.structure(shapes["stages"])

  variables = resnet.ResNet(depth=18, width=0.125).init(
      jax.random.PRNGKey(0), images)
  params, stats = variables["params"], variables["batch_stats"]
  jaxprs = {r: _jaxpr(r, params, stats, images) for r in resnet.REMAT_MODES}
  # remat really wraps the 8 blocks / 4 stages (one remat equation each).
  for r, count in (("none", 0), ("blocks", 8), ("stages", 4)):
    assert jaxprs[r].count("remat") + jaxprs[r].count("checkpoint[") == \
        count, r
  # The same gradients. Compiled for 'stages' only (XLA:CPU compiles are
  # the slow part of this suite): nn.remat of a function of the module is
  # the path that could bind blocks to the wrong scope; 'blocks' is flax's
  # stock nn.remat of a module class.
  want = _grads("none", params, stats, images)
  got = _grads("stages", params, stats, images)
  scale = max(float(jnp.abs(g).max()) for g in jax.tree.leaves(want))
  for a, b in zip(jax.tree.leaves(want), jax.tree.leaves(got)):
    np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-6 * scale)


def test_fsdp_spec_rule():
  assert sharding.fsdp_spec((3, 3, 256, 512), 4) == P(None, None, None,
                                                      "data")
  assert sharding.fsdp_spec((4096, 256), 8) == P("data", None)
  assert sharding.fsdp_spec((512, 512), 4, min_size=0) == P(None, "data")
  assert sharding.fsdp_spec((2048,), 4) == P()               # small
  assert sharding.fsdp_spec((7, 7, 3, 66), 4, min_size=0) == P()   # no divisor
  assert sharding.fsdp_spec((), 4, min_size=0) == P()
  assert sharding.fsdp_spec((1024, 1024), 1) == P()          # one device


def _config(**fields):
  # The same config as test_train's detcon_b end-to-end run (2 steps), so
  # the replicated run shares its compiled step through the XLA cache.
  config = detcon_b.get_config("test")
  config.total_steps = 2
  config.log_every_steps = 1
  for k, v in fields.items():
    section, name = k.split("__")
    config[section][name] = v
  return config


def _sharded(x) -> bool:
  return not x.sharding.is_fully_replicated


def test_fsdp_equals_replicated_restores_sharded_and_profiles(tmp_path):
  assert len(jax.devices()) == 4
  replicated = train.train_and_evaluate(_config(), str(tmp_path / "rep"))
  # Small min_size: the :test net's convs are sharded, its first ones and
  # the BatchNorm vectors are not. Profile step 2 (after the compilation).
  config = _config(sharding__fsdp=True, sharding__fsdp_min_size=1024,
                   profile__start_step=2, profile__num_steps=1)
  workdir = str(tmp_path / "fsdp")
  fsdp = train.train_and_evaluate(config, workdir)

  # Same computation: same losses and parameters.
  losses = lambda d: [r["train/loss"] for r in reporting.read_metrics(d)]
  np.testing.assert_allclose(losses(workdir), losses(str(tmp_path / "rep")),
                             rtol=1e-5)
  for a, b in zip(jax.tree.leaves(fsdp), jax.tree.leaves(replicated)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4,
                               atol=1e-6)

  # The state really is split: 1/4 of each big array per device; BN
  # statistics, step and rng replicated.
  for part in (fsdp.params, fsdp.target_params, fsdp.opt_state):
    leaves = jax.tree.leaves(part)
    big = [x for x in leaves if x.size >= 1024]
    assert big and sum(_sharded(x) for x in big) >= len(big) - 2
    for x in big:
      if _sharded(x):
        assert x.addressable_shards[0].data.size * 4 == x.size
    assert not any(_sharded(x) for x in leaves if x.size < 1024)
  assert not any(_sharded(x) for x in jax.tree.leaves(
      (fsdp.batch_stats, fsdp.step, fsdp.rng)))
  assert not any(_sharded(x) for x in jax.tree.leaves(replicated))

  # The checkpoint restores into the sharded layout, values intact.
  mngr = checkpoint.manager(workdir, config.max_to_keep)
  restored = checkpoint.restore(mngr, fsdp, config)
  assert int(restored.step) == 2
  for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(fsdp)):
    assert a.sharding == b.sharding
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  # ... and into the replicated layout (a resume with sharding.fsdp=False:
  # the field may change between a run and its resumption).
  restored = checkpoint.restore(mngr, replicated, _config())
  for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(fsdp)):
    assert a.sharding.is_fully_replicated
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))

  # The profiler wrote a trace under workdir/profile.
  traces = glob.glob(os.path.join(workdir, "profile", "plugins", "profile",
                                  "*", "*.xplane.pb"))
  assert len(traces) == 1 and os.path.getsize(traces[0]) > 0, traces
  assert not os.path.exists(str(tmp_path / "rep" / "profile"))


def test_profiler_traces_its_window_only(tmp_path):
  """Steps [2, 4): starts before step 2, stops (blocking) before step 4."""
  config = detcon_b.get_config("test")
  config.profile.start_step, config.profile.num_steps = 2, 2
  traces = lambda: glob.glob(str(tmp_path / "profile" / "plugins" / "profile"
                                 / "*" / "*.xplane.pb"))
  state = jnp.ones((4,))
  with profiling.StepProfiler(config, str(tmp_path)) as profiler:
    for number in range(1, 6):
      profiler.before_step(number, state)
      assert profiler._active == (number in (2, 3)), number
      assert len(traces()) == (1 if number >= 4 else 0), number
      state = state * 2          # "the step"
  assert len(traces()) == 1
  # Off by default.
  off = profiling.StepProfiler(detcon_b.get_config("test"), str(tmp_path))
  assert not off.enabled


def test_scale_fields_are_checked_and_mutable_on_resume():
  from odin_jax import config_check
  for section, name, value, match in (
      ("model", "remat", "layers", "model.remat"),
      ("model", "dtype", "float16", "model.dtype"),
      ("profile", "start_step", 0, "profile.start_step"),
      ("profile", "num_steps", -1, "profile.num_steps"),
      ("sharding", "fsdp_min_size", -1, "sharding.fsdp_min_size")):
    config = detcon_b.get_config("test")
    config[section][name] = value
    with pytest.raises(config_check.ConfigError, match=match):
      config_check.validate(config)
  saved = detcon_b.get_config("test")
  now = detcon_b.get_config("test")
  now.model.remat, now.sharding.fsdp, now.profile.num_steps = "stages", True, 3
  config_compat.check_compatible({"config": saved.to_json()}, now, "d")
  now.model.depth = 50   # a different network is not resumable
  with pytest.raises(ValueError, match=r"model\.depth"):
    config_compat.check_compatible({"config": saved.to_json()}, now, "d")
