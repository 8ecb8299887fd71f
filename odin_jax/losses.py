"""Contrastive detection (DetCon), BYOL, per-mask BYOL (R2O) and SimCLR losses.

All losses share one signature over mask latents of two views:

  loss(pred_1, pred_2, target_1, target_2, ids_1, ids_2, ...) -> scalar

  pred_v   [B, M, D] online latents of view v (after the predictor for
           DetCon-B/BYOL; the projections for DetCon-S/SimCLR)
  target_v [B, M, D] target latents of view v (EMA network, or the online
           projections themselves for DetCon-S/SimCLR)
  ids_v    [B, M] int, the segment id each of the M rows was pooled from

Written on the *global* batch: under `jax.jit` on a mesh XLA gathers the
targets, so negatives come from every device (loss.negatives='global').
`device_negatives_loss` gives the per-device variant (loss.negatives=
'device', DetCon Table 5) with `jax.shard_map`.

Rows whose id is negative (objects.PAD_ID) are padding, e.g. the rows past
the last id with loss.mask_sampling='all': they get weight 0 and their
targets are neither positives nor negatives.

Contrastive detection, batched (DetCon eq. 1-3, as DeepMind's
`byol_nce_detcon` in detcon/utils/losses.py computes it). For row (b, m) of
view 1 with id i = ids_1[b, m], latents normalised to unit length and
logits v·v'/τ:
  columns   : every target latent of view 2 and of view 1 of every image,
              except target_1[b, m''] with ids_1[b, m''] = i (the same
              region of the same image in its own view: neither positive
              nor negative)
  positives : the n_2 >= 0 columns target_2[b, m'] with ids_2[b, m'] = i.
              When i was drawn several times in view 2, every copy is a
              column and the label 1/n_2 is spread over them (the reference
              normalises its labels by the number of positives)
  l(b, m)   = logsumexp(columns) - mean over the positives of their logits
            = soft-label cross-entropy
  weight    = 1 / #{m'' : ids_1[b, m''] = i}  (the reference's obj_area:
              repeated draws count once), 0 if n_2 = 0
  loss      = Σ weight·l / (B·M) for view 1  +  the same for view 2.
Deliberate differences from the reference:
  * One mean over the global B·M rows instead of each replica's mean; with
    equal shards it is the mean of the replicas' losses, which is what the
    reference's gradient all-reduce optimises.
  * Masked logits are replaced by -1e9 rather than shifted by -1e9 (the same
    softmax, without overflow worries in low precision).
  * The reference's `local_negatives=False` (drop the other masks of the
    same image from the negatives) is not offered; its default (True, keep
    them) is what this loss does. Our `loss.negatives='device'` is a
    different ablation: negatives from this device's images only.
  * Padding rows (negative ids) do not exist in the reference.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from odin_jax.numerics import MASKED as _MASKED  # a finite -inf
from odin_jax.numerics import l2_normalize


def _first_occurrence(ids: jnp.ndarray) -> jnp.ndarray:
  """[B, M] bool: True where ids[b, m] differs from every ids[b, :m]."""
  m = ids.shape[1]
  same = ids[:, :, None] == ids[:, None, :]                 # [B, M, M]
  earlier = jnp.tril(jnp.ones((m, m), bool), k=-1)           # n < m
  return ~jnp.any(same & earlier, axis=-1)


def _one_direction(pred, target_other, target_own, ids, ids_other,
                   temperature):
  """Weighted per-row loss of view v; returns [B, M] (weight · l).

  pred [B, M, D] view v's online latents, target_other / target_own
  [B, M, D] the target latents of the other view / of view v (all unit
  length), ids / ids_other [B, M] their ids.
  """
  b = pred.shape[0]
  same_image = jnp.eye(b, dtype=bool)[:, None, :, None]      # [B,1,B,1]
  valid, valid_other = ids >= 0, ids_other >= 0
  logits_other = jnp.einsum("bmd,cnd->bmcn", pred, target_other) / temperature
  logits_own = jnp.einsum("bmd,cnd->bmcn", pred, target_own) / temperature

  # Every copy of the row's id in the other view is a positive.
  positive = (same_image & (ids[:, :, None, None] == ids_other[None, None])
              & valid[:, :, None, None] & valid_other[None, None])
  # The same id in the same image's own view is neither positive nor
  # negative; padding rows are no columns at all.
  logits_other = jnp.where(valid_other[None, None], logits_other, _MASKED)
  match_own = same_image & (ids[:, :, None, None] == ids[None, None])
  logits_own = jnp.where(match_own | ~valid[None, None], _MASKED, logits_own)

  rows = pred.shape[:2]
  all_logits = jnp.concatenate(
      [logits_other.reshape(*rows, -1), logits_own.reshape(*rows, -1)], -1)
  log_norm = jax.nn.logsumexp(all_logits, axis=-1)
  num_pos = jnp.sum(positive, axis=(2, 3))                     # [B, M]
  pos_logit = (jnp.sum(jnp.where(positive, logits_other, 0.0), axis=(2, 3))
               / jnp.maximum(num_pos, 1))

  repeats = jnp.sum(ids[:, :, None] == ids[:, None, :], axis=-1)  # >= 1
  weight = jnp.where(num_pos > 0, 1.0 / repeats, 0.0)
  return weight * (log_norm - pos_logit)


def contrastive_detection_loss(pred_1, pred_2, target_1, target_2, ids_1,
                               ids_2, temperature: float = 0.1):
  """DetCon loss (see module docstring). Latents [B, M, D], ids [B, M]."""
  p1, p2 = l2_normalize(pred_1), l2_normalize(pred_2)
  t1, t2 = l2_normalize(target_1), l2_normalize(target_2)
  rows_1 = _one_direction(p1, t2, t1, ids_1, ids_2, temperature)
  rows_2 = _one_direction(p2, t1, t2, ids_2, ids_1, temperature)
  return jnp.mean(rows_1) + jnp.mean(rows_2)


def simclr_loss(pred_1, pred_2, target_1, target_2, ids_1=None, ids_2=None,
                temperature: float = 0.1):
  """Symmetrised NT-Xent on global latents [B, 1, D] (ids are ignored).

  For anchor b of view 1 the positive is target_2[b]; the negatives are
  target_2[c] and target_1[c] for every c != b. Returns the mean over view-1
  anchors plus the mean over view-2 anchors (2x the usual averaged NT-Xent),
  which is what contrastive detection gives with one global mask.
  """
  del ids_1, ids_2
  _check_single_mask(pred_1, "simclr")
  p1, p2 = l2_normalize(pred_1[:, 0]), l2_normalize(pred_2[:, 0])
  t1, t2 = l2_normalize(target_1[:, 0]), l2_normalize(target_2[:, 0])
  eye = jnp.eye(p1.shape[0], dtype=bool)

  def direction(p, t_other, t_own):
    other = p @ t_other.T / temperature
    own = jnp.where(eye, _MASKED, p @ t_own.T / temperature)
    log_norm = jax.nn.logsumexp(jnp.concatenate([other, own], -1), -1)
    return jnp.mean(log_norm - jnp.diagonal(other))

  return direction(p1, t2, t1) + direction(p2, t1, t2)


def byol_loss(pred_1, pred_2, target_1, target_2, ids_1=None, ids_2=None,
              temperature: float | None = None):
  """Symmetric BYOL regression loss on latents [B, 1, D] (ids ignored).

  mean_b ||p1/|p1| - t2/|t2|||² + mean_b ||p2/|p2| - t1/|t1|||²
  = mean(2 - 2 cos(p1, t2)) + mean(2 - 2 cos(p2, t1)).
  """
  del ids_1, ids_2, temperature
  _check_single_mask(pred_1, "byol")

  def direction(p, t):
    return jnp.mean(jnp.sum(jnp.square(l2_normalize(p) - l2_normalize(t)), -1))

  return direction(pred_1, target_2) + direction(pred_2, target_1)


def mask_byol_loss(pred_1, pred_2, target_1, target_2, ids_1, ids_2,
                   temperature: float | None = None):
  """BYOL's regression loss per mask (R2O eq. 4-5), symmetric.

  Row (b, m) of view 1 regresses onto the target latent of the same id in
  the same image's view 2: l = ||p/|p| - t/|t|||² = 2 - 2 cos(p, t). Rows
  are weighted as in contrastive detection (1 / repeats of the id in its
  view, 0 if the id is absent from the other view) and averaged over the
  weight, so each mask present in both views counts once. Padding rows
  (negative ids, loss.mask_sampling='all') get weight 0. With one global
  mask this is exactly `byol_loss`.
  Latents [B, M, D], ids [B, M].
  """
  del temperature

  def direction(pred, target_other, ids, ids_other):
    cos = jnp.einsum("bmd,bnd->bmn", l2_normalize(pred),
                     l2_normalize(target_other))
    match = ((ids[:, :, None] == ids_other[:, None, :]) &
             (ids >= 0)[:, :, None])       # padding rows have no positive
    positive = match & _first_occurrence(ids_other)[:, None, :]
    has_pos = jnp.any(positive, axis=-1)
    loss = 2.0 - 2.0 * jnp.sum(jnp.where(positive, cos, 0.0), axis=-1)
    repeats = jnp.sum(ids[:, :, None] == ids[:, None, :], axis=-1)
    weight = jnp.where(has_pos, 1.0 / repeats, 0.0)
    return jnp.sum(weight * loss) / jnp.maximum(jnp.sum(weight), 1.0)

  return (direction(pred_1, target_2, ids_1, ids_2) +
          direction(pred_2, target_1, ids_2, ids_1))


def _check_single_mask(latents, name):
  if latents.shape[1] != 1:
    raise ValueError(
        f"The {name} loss takes one global mask per view (M=1), got M="
        f"{latents.shape[1]}. Set config.num_masks=1 and "
        "config.masks.method='grid' with config.masks.grid_size=1, or use "
        "loss.name='contrastive_detection'.")


LOSSES = {
    "contrastive_detection": contrastive_detection_loss,
    "simclr": simclr_loss,
    "byol": byol_loss,
    "mask_byol": mask_byol_loss,
}


def get_loss(name: str):
  """Looks up a loss by its config name."""
  if name not in LOSSES:
    raise ValueError(f"Unknown config.loss.name={name!r}; choose one of "
                     f"{sorted(LOSSES)}.")
  return LOSSES[name]


def device_negatives_loss(loss_fn, mesh, axis: str = "data"):
  """Wraps `loss_fn` so negatives come only from each device's own shard.

  loss.negatives='device'. Each device evaluates `loss_fn` on its slice of
  the batch (per-device semantics through `jax.shard_map`); the result is
  averaged over devices, which equals the global-batch mean when shards
  have equal size (the DetCon "negatives from this worker only" ablation,
  Table 5 row a). Not DeepMind's `local_negatives` flag, which keeps or
  drops the negatives from the same image.
  """
  spec = P(axis)

  @functools.partial(jax.shard_map, mesh=mesh, in_specs=(spec,) * 6,
                     out_specs=P(), check_vma=False)
  def per_device(p1, p2, t1, t2, i1, i2):
    return jax.lax.pmean(loss_fn(p1, p2, t1, t2, i1, i2), axis)

  return per_device
