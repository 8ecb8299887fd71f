"""Tests of odin_jax/numerics.py against independent NumPy computations."""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from odin_jax import numerics
from odin_jax.models import fpn


def _rows(dtype=np.float64):
  rng = np.random.default_rng(0)
  x = rng.normal(size=(4, 5, 7)).astype(dtype)
  x[1, 2] = 0.0                       # a zero row stays zero
  x[2, 3] = 1e-14                     # a row shorter than eps: divided by eps
  return x


def test_l2_normalize_numpy_matches_a_loop():
  x = _rows()
  out = numerics.l2_normalize(x)
  assert isinstance(out, np.ndarray) and out.dtype == np.float64
  for idx in itertools.product(range(4), range(5)):
    row = x[idx]
    norm = float(np.sqrt(sum(float(v) ** 2 for v in row)))
    np.testing.assert_allclose(out[idx], row / max(norm, 1e-12), rtol=1e-15)
  np.testing.assert_array_equal(out[1, 2], 0.0)
  np.testing.assert_allclose(out[2, 3], x[2, 3] / 1e-12)


def test_l2_normalize_other_axis_and_float32_kept():
  x = _rows(np.float32)
  out = numerics.l2_normalize(x, axis=1)
  assert out.dtype == np.float32
  norms = np.sqrt(np.sum(x.astype(np.float64) ** 2, axis=1, keepdims=True))
  np.testing.assert_allclose(out, x / np.maximum(norms, 1e-12), rtol=1e-6)


def test_l2_normalize_jax_is_bit_identical_to_the_replaced_copies():
  """The copies it replaced: losses' sqrt(sum(square)), the others'
  linalg.norm, both with eps 1e-12; under jit as in the train step."""
  x = jnp.asarray(_rows(np.float32))
  out = jax.jit(numerics.l2_normalize)(x)
  assert isinstance(out, jax.Array)

  def losses_copy(v):
    return v / jnp.maximum(
        jnp.sqrt(jnp.sum(jnp.square(v), axis=-1, keepdims=True)), 1e-12)

  def norm_copy(v):
    return v / jnp.maximum(jnp.linalg.norm(v, axis=-1, keepdims=True), 1e-12)

  np.testing.assert_array_equal(out, jax.jit(norm_copy)(x))
  np.testing.assert_array_equal(out, jax.jit(losses_copy)(x))
  np.testing.assert_array_equal(numerics.l2_normalize(x), losses_copy(x))

  def energy(normalize):    # a contrastive-like use, differentiated
    return lambda v: jnp.sum(jnp.exp(jnp.einsum(
        "bmd,bnd->bmn", normalize(v), normalize(v)) / 0.1))

  np.testing.assert_array_equal(jax.jit(jax.grad(energy(losses_copy)))(x),
                                jax.jit(jax.grad(energy(
                                    numerics.l2_normalize)))(x))
  np.testing.assert_allclose(out, numerics.l2_normalize(np.asarray(x)),
                             rtol=1e-6, atol=1e-7)


def test_masked_logits_give_zero_probability_and_no_nan():
  logits = jnp.array([[1.0, 2.0, numerics.MASKED],
                      [numerics.MASKED] * 3], jnp.float32)
  p = jax.nn.softmax(logits, axis=-1)
  assert float(p[0, 2]) == 0.0
  assert not np.isnan(np.asarray(p)).any()
  grad = jax.grad(lambda v: jax.nn.logsumexp(
      jnp.where(jnp.arange(3) < 2, v, numerics.MASKED)))(jnp.ones(3))
  assert float(grad[2]) == 0.0


def _nearest_reference(labels, out_h, out_w, centre):
  h, w = labels.shape[-2:]
  out = np.empty(labels.shape[:-2] + (out_h, out_w), labels.dtype)
  for i in range(out_h):
    for j in range(out_w):
      if centre:   # the input pixel under the output pixel's centre
        r, c = int((i + 0.5) * h / out_h), int((j + 0.5) * w / out_w)
      else:        # the input pixel under the output pixel's top-left corner
        r, c = int(i * h / out_h), int(j * w / out_w)
      out[..., i, j] = labels[..., r, c]
  return out


@pytest.mark.parametrize("in_hw,out_hw", [((4, 6), (8, 12)), ((7, 5), (3, 4)),
                                          ((5, 5), (13, 2)), ((3, 9), (3, 9))])
@pytest.mark.parametrize("centre", [True, False])
def test_resize_nearest_matches_the_per_pixel_rule(in_hw, out_hw, centre):
  labels = np.arange(2 * in_hw[0] * in_hw[1]).reshape((2,) + in_hw)
  out = numerics.resize_nearest(labels, out_hw, centre=centre)
  np.testing.assert_array_equal(
      out, _nearest_reference(labels, *out_hw, centre))
  on_device = jax.jit(lambda x: numerics.resize_nearest(x, out_hw, centre))(
      jnp.asarray(labels, jnp.int32))
  np.testing.assert_array_equal(on_device, out)


def test_resize_nearest_integer_upscale_repeats_cells_and_matches_tf():
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  labels = np.arange(12, dtype=np.int32).reshape(3, 4)
  np.testing.assert_array_equal(
      numerics.resize_nearest(labels, (9, 8)),
      np.repeat(np.repeat(labels, 3, axis=0), 2, axis=1))
  for out_hw in [(5, 7), (2, 3), (11, 6)]:
    tf_out = tf.image.resize(labels[..., None], out_hw, method="nearest")
    np.testing.assert_array_equal(numerics.resize_nearest(labels, out_hw),
                                  tf_out.numpy()[..., 0])


def test_other_axes_resize_like_the_last_two():
  x = np.arange(2 * 3 * 5 * 2, dtype=np.float32).reshape(2, 3, 5, 2)
  last_two = numerics.resize_nearest(np.moveaxis(x, -1, 1), (7, 9),
                                     centre=False)
  np.testing.assert_array_equal(
      numerics.resize_nearest(x, (7, 9), centre=False, axes=(1, 2)),
      np.moveaxis(last_two, 1, -1))
  # The FPN's upsampling is torch's top-left rule on [B, h, w, C].
  torch_rule = x[:, (np.arange(7) * 3) // 7][:, :, (np.arange(9) * 5) // 9]
  np.testing.assert_array_equal(
      fpn.upsample_nearest(jnp.asarray(x), (7, 9)), torch_rule)


def test_flatten_config_dicts_and_config_dicts():
  tree = {"b": {"x": 1, "y": {"z": (1, 2)}}, "a": 3, "empty": {}}
  assert numerics.flatten_config(tree) == {
      "b.x": 1, "b.y.z": (1, 2), "a": 3, "empty": {}}
  config = ml_collections.ConfigDict(tree)
  flat = numerics.flatten_config(config)
  assert list(flat) == ["a", "b.x", "b.y.z", "empty"]     # ConfigDict sorts
  assert flat["b.y.z"] == (1, 2) and flat["a"] == 3
