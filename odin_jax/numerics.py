"""Small numeric helpers shared by training, discovery, evaluation and data.

One home each for what used to be written out in several modules:
  MASKED          the finite stand-in for -inf added to masked logits
  l2_normalize    x / max(||x||, 1e-12) along an axis (NumPy or JAX)
  resize_nearest  nearest-neighbour resize of id maps (NumPy or JAX)
  flatten_config  {'model': {'depth': 50}} -> {'model.depth': 50}

NumPy in gives NumPy out (float64 stays float64: the evaluation metrics
rely on it); anything else (jax.Array, a tracer under jit) goes through
jax.numpy. The results are bit-identical to the copies they replace (the
gradients of l2_normalize to losses.py's; see there), which all used
eps = 1e-12 and the pixel-centre nearest rule (the FPN uses the
top-left rule on purpose: it matches torchvision's FPN).
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

# A finite stand-in for -inf: keeps gradients of masked logits exactly zero
# without producing NaNs in rows whose every column is masked. Where the
# logits are already masked, `logits > MASKED / 2` finds them again.
MASKED = -1e9


def _xp(x):
  """numpy for NumPy arrays / scalars, jax.numpy for everything else (JAX
  is imported only then: precompute workers use these helpers without it)."""
  if isinstance(x, (np.ndarray, np.generic)):
    return np
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  return jnp


def l2_normalize(x, axis: int = -1, eps: float = 1e-12):
  """x / max(||x||_2, eps) along `axis`; rows of zeros stay zero.

  Args:
    x: float array [..., D, ...] (NumPy or JAX).
    axis: the axis normalised.
    eps: lower bound of the norm (1e-12 everywhere in this package).
  Returns:
    array of x's shape, dtype and kind (NumPy in, NumPy out).

  The norm is sqrt(sum(square(x))), as losses.py wrote it: the same values
  as linalg.norm (which the other copies used), and under jax.grad the same
  gradients as the training losses always had (linalg.norm's x * x can
  differentiate, once fused, to other last bits: hiergroup's pixel loss,
  which used it, now shares the losses' gradients).
  """
  xp = _xp(x)
  norm = xp.sqrt(xp.sum(xp.square(x), axis=axis, keepdims=True))
  return x / xp.maximum(norm, eps)


def nearest_indices(n_in: int, n_out: int, centre: bool = True) -> np.ndarray:
  """Source index of every output index of a nearest resize along one axis.

  centre=True: output i reads floor((i + 0.5) n_in / n_out), the input pixel
  under its centre (tf.image.resize(method='nearest'); an integer upscale
  repeats every cell exactly s times). centre=False: floor(i n_in / n_out),
  the top-left rule of torch's interpolate(mode='nearest') and PIL's
  NEAREST of old. Exact integer arithmetic either way.
  Returns int64 [n_out], values in [0, n_in).
  """
  i = np.arange(int(n_out), dtype=np.int64)
  if centre:
    return ((2 * i + 1) * int(n_in)) // (2 * int(n_out))
  return (i * int(n_in)) // int(n_out)


def resize_nearest(labels, out_hw: Sequence[int], centre: bool = True,
                   axes: tuple[int, int] = (-2, -1)):
  """Nearest-neighbour resize of two axes (never mixes ids).

  Args:
    labels: array [..., h, w] of any dtype (NumPy or JAX; works under jit,
      the indices are static).
    out_hw: (H, W).
    centre: the pixel-centre rule (default) or the top-left one; see
      `nearest_indices`.
    axes: the (row, column) axes; e.g. (1, 2) for features [B, h, w, C].
  Returns:
    array [..., H, W] (H, W at `axes`) of labels' dtype and kind.
  """
  xp = _xp(labels)
  h, w = labels.shape[axes[0]], labels.shape[axes[1]]
  rows = nearest_indices(h, out_hw[0], centre)
  cols = nearest_indices(w, out_hw[1], centre)
  return xp.take(xp.take(labels, rows, axis=axes[0]), cols, axis=axes[1])


def flatten_config(tree, prefix: str = "") -> dict[str, Any]:
  """Nested mappings -> {dotted name: leaf value}, in the tree's order.

  {'model': {'depth': 50}, 'seed': 0} -> {'model.depth': 50, 'seed': 0}.
  tree: a dict, a ConfigDict or anything else with .items(); a non-empty
  mapping value is a section (flattened), an empty one is a leaf value.
  """
  flat = {}
  for key, value in tree.items():
    if hasattr(value, "items") and len(value):
      flat.update(flatten_config(value, f"{prefix}{key}."))
    else:
      flat[f"{prefix}{key}"] = value
  return flat
