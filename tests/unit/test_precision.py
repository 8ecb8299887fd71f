"""bfloat16 compute: close to float32, float32 state, trains without NaN.

Tolerance: bfloat16 keeps 8 significant bits (relative rounding 2^-9 per
value). Convolution sums are accumulated at higher precision by XLA, every
BatchNorm re-normalises in float32, and the loss is computed in float32 on
float32 projections, so the rounding errors stay near that level instead of
compounding through the depth: we expect ~1e-3 relative difference in the
loss of the same parameters and batch (measured 1.1e-4 on the :test net:
3.70040 vs 3.69998). rtol 1e-2 leaves room for other nets and XLA versions
and still fails if a cast is lost or something overflows (a loss off by
several percent, or NaN).
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import detcon_b, odin
from odin_jax import sharding
from odin_jax.models import network
# The same train step set-up and synthetic batch (blocky masks, random
# views) as test_step's, so the float32 step here reuses that test's
# compiled program.
from tests.helpers import jit_train_step, synthetic_batch  # pylint: disable=g-bad-import-order


def _step_fn(dtype):
  """(initial state, jitted train step, config) of detcon_b :test in dtype.

  One device. Built by helpers.jit_train_step, as test_step.py's steps, so
  the float32 step is the same program and comes from the XLA cache when
  the whole suite runs (compiling is most of this test's time).
  """
  config = detcon_b.get_config("test")
  config.model.dtype = dtype
  fn, state, mesh, rep = jit_train_step(config, jax.devices()[:1])
  put = lambda batch: sharding.to_global(mesh, batch)
  return jax.device_put(state, rep), fn, put, config


def _float_dtypes(tree):
  return {str(x.dtype) for x in jax.tree.leaves(tree)
          if jnp.issubdtype(x.dtype, jnp.floating)}


@pytest.mark.slow
def test_bfloat16_step_is_close_to_float32_and_keeps_float32_state():
  state32, fn32, put, config = _step_fn("float32")
  state16, fn16, _, _ = _step_fn("bfloat16")
  # The compute dtype does not change the parameters: same init, same tree.
  for a, b in zip(jax.tree.leaves(state32), jax.tree.leaves(state16)):
    np.testing.assert_array_equal(a, b)

  # The bf16 step really computes in bf16: its convolutions take bf16.
  lowered = fn16.lower(state16, put(synthetic_batch(config, 0)))
  convs = [l for l in lowered.as_text().splitlines()
           if "stablehlo.convolution" in l]
  assert convs and all("bf16" in l for l in convs), convs[:2]
  fn16 = lowered.compile()   # traced once: run what was inspected

  _, m32 = fn32(state32, put(synthetic_batch(config, 0)))
  losses = []
  for i in range(3):   # a few bf16 steps: finite, and training moves
    state16, m16 = fn16(state16, put(synthetic_batch(config, i)))
    losses.append(float(m16["train/loss"]))
    if i == 0:
      # Same parameters and batch: the losses and gradients agree.
      loss32, loss16 = float(m32["train/loss"]), losses[0]
      assert loss16 != loss32            # not silently float32
      np.testing.assert_allclose(loss16, loss32, rtol=1e-2)
      # Gradients pass back through bf16 activations and are noisier:
      # measured 4% apart in norm (31.6 vs 30.4); a lost cast or a scale
      # error would be far off or not finite.
      np.testing.assert_allclose(float(m16["train/grad_norm"]),
                                 float(m32["train/grad_norm"]), rtol=0.1)
  assert np.all(np.isfinite(losses)), losses
  assert int(state16.step) == 3
  # Parameters, EMA target, optimizer state and BatchNorm statistics stay
  # float32 after bf16 steps (only activations are bf16).
  assert _float_dtypes(state16.params) == {"float32"}
  assert _float_dtypes(state16.target_params) == {"float32"}
  assert _float_dtypes(state16.opt_state) == {"float32"}
  assert _float_dtypes(state16.batch_stats) == {"float32"}
  moved = max(float(jnp.abs(a - b).max()) for a, b in zip(
      jax.tree.leaves(state32.params), jax.tree.leaves(state16.params)))
  assert moved > 1e-5


def test_bfloat16_outputs_for_kmeans_and_losses_are_float32():
  """Odin's k-means inputs and the pooled/projected vectors are float32.

  Dtypes only, so jax.eval_shape: traced, never compiled or run.
  """
  config = odin.get_config("test")
  config.model.dtype = "bfloat16"
  model = network.from_config(config)
  s, (h, w) = config.image_size, network.feature_grid(config)
  images = jax.ShapeDtypeStruct((2, s, s, 3), jnp.float32)
  cells = jax.ShapeDtypeStruct((2, h, w), jnp.int32)
  ids = jax.ShapeDtypeStruct((2, config.num_masks), jnp.int32)

  def run(images, cells, ids):
    variables = model.init(jax.random.PRNGKey(0), images, cells, ids,
                           train=False)
    outs, updated_stats = model.apply(variables, images, cells, ids,
                                      train=True, mutable=["batch_stats"])
    outs["dense"], _ = model.apply(variables, images, train=True,
                                   mutable=["batch_stats"],
                                   method=model.dense_projection)
    maps = model.apply(variables, images, train=False,
                       method=model.feature_maps)
    return variables, updated_stats, outs, maps

  variables, updated_stats, outs, maps = jax.eval_shape(run, images, cells,
                                                        ids)
  assert _float_dtypes(variables) == {"float32"}
  assert _float_dtypes(updated_stats) == {"float32"}
  # 'dense' is what Odin's k-means clusters; hidden/projection/prediction
  # are the mask-pooled vectors and the loss inputs.
  assert {k: str(v.dtype) for k, v in outs.items()} == {
      k: "float32" for k in ("hidden", "projection", "prediction", "dense")}
  # ... while the backbone and FPN maps are computed in bf16.
  assert {k: str(v.dtype) for k, v in maps.items()} == {
      k: "bfloat16" for k in ("stem", "stage1", "stage2", "stage3", "stage4",
                              "p2")}
