"""Area pooling of the evaluations' grids (box-filter weights).

`area_matrix` averages labels or features over cells (the probe's and the
video's label grids); `pool_cells` shrinks a feature grid before instance
recall's dense (h w)^2 affinity. Nearest resizing and L2-normalising live
in odin_jax/numerics.py.
"""

from __future__ import annotations

import math

import numpy as np


def area_matrix(n_out: int, n_in: int) -> np.ndarray:
  """Box-filter resize weights along one axis.

  Returns float64 [n_out, n_in]: entry (i, j) is the fraction of output cell
  i (spanning input coordinates [i n_in / n_out, (i + 1) n_in / n_out))
  covered by input pixel j; rows sum to 1. `A @ x` averages x over cells.
  """
  edges = np.arange(n_out + 1) * (n_in / n_out)
  lo = np.maximum(edges[:-1, None], np.arange(n_in)[None])
  hi = np.minimum(edges[1:, None], np.arange(n_in)[None] + 1)
  return np.maximum(hi - lo, 0.0) / (n_in / n_out)


def pool_cells(features, max_cells: int) -> np.ndarray:
  """Area-pools [h, w, D] by the smallest integer factor that leaves at most
  max_cells cells (unchanged if already small enough)."""
  h, w = features.shape[:2]
  factor = 1
  while math.ceil(h / factor) * math.ceil(w / factor) > max_cells:
    factor += 1
  if factor == 1:
    return features
  oh, ow = math.ceil(h / factor), math.ceil(w / factor)
  rows = area_matrix(oh, h)
  cols = area_matrix(ow, w)
  return np.einsum("iy,yxd,jx->ijd", rows, features, cols).astype(np.float32)
