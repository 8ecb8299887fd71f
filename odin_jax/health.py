"""Training health: is the network collapsing? Statistics and a detector.

A contrastive or BYOL-style loss can sit flat while the network is either
learning slowly or has collapsed to (nearly) one output for every input.
Two cheap statistics of the projections tell them apart:

  projection_std  SimSiam's collapse statistic (Chen & He 2021, S4.1): the
                  per-dimension standard deviation of the L2-normalised
                  projections, averaged over dimensions. About 1/sqrt(D)
                  when the outputs spread over the sphere, 0 when every
                  input maps to the same point.
  rankme          RankMe (Garrido et al. 2023): exp of the entropy of the
                  normalised singular values of the [N, D] projection
                  matrix, a smooth effective rank in [1, min(N, D)]. 1 when
                  every row is the same vector.

Both are computed inside the jitted train step (step.py) on the projections
the loss compares, and logged as `health/projection_std`,
`health/rankme`. `CollapseDetector` watches them on the host and logs one
WARNING when they stay in the collapsed range.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from absl import logging

from odin_jax import numerics

# Added to each normalised singular value before the entropy (RankMe eq. 1):
# keeps log finite for exactly-zero singular values.
RANKME_EPS = 1e-7
# The metric names `metrics` returns (the train step logs them).
STD, RANKME = "health/projection_std", "health/rankme"
NAMES = (STD, RANKME)


def _rows(z: jax.Array, valid: jax.Array | None):
  """[..., D] -> float32 [N, D] rows and float32 [N] weights (1 = valid)."""
  z = jnp.asarray(z, jnp.float32)
  z = z.reshape(-1, z.shape[-1])
  if valid is None:
    return z, jnp.ones(z.shape[:1], jnp.float32)
  return z, jnp.asarray(valid, jnp.float32).reshape(-1)


def projection_std(z: jax.Array, valid: jax.Array | None = None
                   ) -> jax.Array:
  """Mean over dimensions of the std of the L2-normalised rows.

  Args:
    z: float [..., D] projections (e.g. [B, M, D]); rows are the vectors.
    valid: bool [...] (z's shape without D), False for padding rows (mask
      ids < 0), which are left out; None: all rows count.
  Returns:
    float32 []: ≈ 1/sqrt(D) for outputs spread over the sphere, 0 when
    all valid rows point the same way (population std, ddof 0).
  """
  z, w = _rows(z, valid)
  unit = numerics.l2_normalize(z)
  count = jnp.maximum(jnp.sum(w), 1.0)
  mean = jnp.sum(unit * w[:, None], axis=0) / count                   # [D]
  var = jnp.sum(jnp.square(unit - mean) * w[:, None], axis=0) / count
  return jnp.mean(jnp.sqrt(var))


def rankme(z: jax.Array, valid: jax.Array | None = None) -> jax.Array:
  """RankMe effective rank of the projection matrix (Garrido et al. 2023).

  The singular values σ of the [N, D] matrix of valid rows are the square
  roots of the eigenvalues of its D x D Gram matrix zᵀz: at N = 131072
  mask projections (batch 4096 x 16 masks x 2 views) and D = 256 that is
  one [D, N] x [N, D] product (summed across devices by XLA when z is
  sharded by row) and a 256 x 256 eigensolve, instead of an N x D SVD.

  Args:
    z: float [..., D] projections; rows are the vectors (not centred, not
      normalised: RankMe is defined on the raw embeddings).
    valid: bool [...] or None, as in projection_std.
  Returns:
    float32 [] in [1, min(N, D)]: exp(-Σ p_k log p_k) with
    p_k = σ_k / Σσ + RANKME_EPS; singular values below
    sqrt(D eps32) σ_max (float32 noise in the Gram) count as 0.
  """
  z, w = _rows(z, valid)
  z = z * w[:, None]                       # padding rows add nothing
  gram = jnp.matmul(z.T, z, precision=jax.lax.Precision.HIGHEST)
  eig = jnp.linalg.eigvalsh(gram)                                      # [D]
  # float32 rounding leaves the Gram's zero eigenvalues at ~D eps λ_max,
  # i.e. σ ~ 1e-3 σ_max each, which would lift the RankMe of a rank-1
  # matrix visibly above 1: below that noise floor an eigenvalue is 0
  # (numpy.linalg.matrix_rank's tolerance, on σ², for the Gram).
  floor = eig.shape[0] * jnp.finfo(jnp.float32).eps * jnp.max(eig)
  sigma = jnp.sqrt(jnp.where(eig > floor, eig, 0.0))
  p = sigma / jnp.maximum(jnp.sum(sigma), 1e-12) + RANKME_EPS
  return jnp.exp(-jnp.sum(p * jnp.log(p)))


def metrics(projections, valid=None) -> dict[str, jax.Array]:
  """{'health/projection_std', 'health/rankme'} of the projections.

  projections: float [..., D], or a sequence of such arrays (e.g. both
  views' [B, M, D]) taken together; valid: the matching bool [...]
  arrays, or None. No gradient flows through the statistics.
  """
  if not isinstance(projections, (list, tuple)):
    projections, valid = [projections], [valid]
  if valid is None:
    valid = [None] * len(projections)
  d = projections[0].shape[-1]
  z = jnp.concatenate([jnp.reshape(x, (-1, d)) for x in projections])
  z = jax.lax.stop_gradient(z)
  mask = None
  if any(v is not None for v in valid):
    mask = jnp.concatenate([
        jnp.ones(x.shape[:-1], bool).reshape(-1) if v is None
        else jnp.reshape(v, (-1,)) for x, v in zip(projections, valid)])
  return {STD: projection_std(z, mask), RANKME: rankme(z, mask)}


def console_summary(scalars: dict) -> str:
  """' proj std 0.061 rankme 87.2' for the console line ('' without them)."""
  if STD not in scalars:
    return ""
  return f" proj std {scalars[STD]:.3g} rankme {scalars[RANKME]:.3g}"


class CollapseDetector:
  """Host-side watch over the logged health metrics; warns once.

  Collapse is declared when, at `patience` consecutive logs,
  health/projection_std < std_fraction / sqrt(D) or health/rankme <
  min_rankme. It is a WARNING in the log (and `tripped` turns True), not an
  exception: a briefly low value early in training can recover, and the
  researcher decides whether to stop.
  """

  def __init__(self, projection_dim: int, std_fraction: float = 0.1,
               min_rankme: float = 1.5, patience: int = 3):
    self.std_threshold = std_fraction / math.sqrt(projection_dim)
    self.projection_dim = projection_dim
    self.min_rankme = min_rankme
    self.patience = max(1, int(patience))
    self.streak = 0
    self.tripped = False

  def collapsed(self, scalars: dict) -> bool:
    """Whether these logged scalars are in the collapsed range."""
    std = scalars.get(STD)
    rank = scalars.get(RANKME)
    return ((std is not None and std < self.std_threshold) or
            (rank is not None and rank < self.min_rankme))

  def update(self, step_number: int, scalars: dict) -> bool:
    """Feeds one log's scalars; returns True at the log that warns."""
    self.streak = self.streak + 1 if self.collapsed(scalars) else 0
    if self.tripped or self.streak < self.patience:
      return False
    self.tripped = True
    logging.warning(
        "Representation collapse suspected at step %d: "
        "health/projection_std=%.4g (healthy ≈ 1/sqrt(%d) = %.4g, "
        "threshold %.4g) and health/rankme=%.3g (threshold %.3g) for %d "
        "consecutive logs. The network maps every input to nearly the same "
        "projection, so a flat loss here is not progress. Try a lower "
        "optimizer.base_learning_rate or longer warmup_epochs, a higher "
        "ema.base_decay (BYOL/DetCon-B), a lower loss.temperature, or "
        "check that the two views differ (augment.*) and the masks are "
        "not all one segment (train/segments_per_view).", step_number,
        scalars.get(STD, float("nan")),
        self.projection_dim, 1 / math.sqrt(self.projection_dim),
        self.std_threshold, scalars.get("health/rankme", float("nan")),
        self.min_rankme, self.patience)
    return True
