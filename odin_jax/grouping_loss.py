"""Hierarchical grouping's pixel sampling and loss (Zhang & Maire 2020).

The method (methods/hiergroup.py) calls `batch_loss` from its forward_loss.
Each image comes with a region tree (data/hierarchy.py): a leaf-region id
map, carried through each view's crop and flip like any mask
(batch 'mask1', 'mask2'), and the tree distances d_T between its leaves
(batch 'hierarchy' [B, L, L], L = 40). Everything below runs on device, in
the jitted step, from the step's PRNG key; per image and with no
cross-device traffic except the cross-image negatives.

Sampling (paper §3 and §4.2), on the stride-4 embedding grid:
  * anchor regions: num_regions (7) leaf ids per image, uniform among the
    leaves visible in both views (as objects.sample_shared_ids); one anchor
    pixel per region and view, uniform within the region;
  * positives: for an anchor in R_a, num_positives (10) regions per view
    from  P(R_b) ∝ exp(-d_T(R_a, R_b)/σ_p)  with the self term
    exp(-d_T(R_a, R_a)/σ_p) := 1 (logit 0), then one pixel uniform within
    each region;
  * negatives: num_negatives (5) regions per view from
    P(R_b) ∝ exp(d_T(R_a, R_b)/σ_p), R_b != R_a; a pixel in each;
  * both distributions are over the leaves visible in the view the pixel is
    taken from (a region that is cropped away has no pixel to give);
  * cross-image negatives (cns): cross_image_negatives pixels per anchor
    region, each from a uniformly chosen *other* image of the global batch
    (a uniform pixel of one of its views).

Correspondence between the views. The paper adds τ(Pos(i)) and τ(Neg(i)),
the same pixels seen through the augmentation τ. We sample at region level
instead of mapping exact pixels through the crop boxes: the probabilities
are defined per region and are uniform within a region, so drawing the
regions once and then a uniform pixel of each region in each view has the
distribution of mapping uniformly drawn pixels, without restricting the
references to the crops' overlap (a pixel of view 1 outside view 2 cannot be
mapped) and without boxes/flips in the batch: the data path is DetCon's.
The two views use the same Gumbel noise for their region draws (Gumbel-max,
i.e. jax.random.categorical written out), so a region drawn in view 1 is
drawn in view 2 too whenever it is visible there. Pos+(i) = 2 x num_positives
pixels, Neg+(i) = 2 x num_negatives + cns pixels, shared by the anchor pixel
of R_a in view 1 and the one in view 2.

Loss: eq. 1 as a log-likelihood. With s = cos(F(i), F(j)) / T,
  l(i) = 1/|Pos+(i)| Σ_{m ∈ Pos+(i)} -log( e^{s_im} / (e^{s_im} +
                                              Σ_{n ∈ Neg+(i)} e^{s_in}) )
and the loss is the mean of l(i) over valid anchors. Eq. 1 has no
temperature (T = 1); cosines in [-1, 1] then bound the odds of a positive
by e^2, so the objective saturates early and gives weak gradients. We use
T = loss.temperature = 0.1, the concentration of the vMF pixel embeddings
of SegSort (which this method extends) and the temperature of the repo's
other contrastive losses. hiergroup.objective='paper' is eq. 1 verbatim
instead: maximise Σ_i Σ_m p_im with p_im = e^{s_im} / (e^{s_im} + Σ_n
e^{s_in}) at T = 1 (loss.temperature unused), as the loss -Σ p / (number of
valid (anchor, positive) pairs) in [-1, 0].
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from odin_jax.models import resnet
from odin_jax.numerics import MASKED as _MASKED  # a finite -inf
from odin_jax.numerics import l2_normalize

# hiergroup.objective: 'log_likelihood' (-log p at T = loss.temperature, the
# default) or 'paper' (eq. 1: maximise Σ p at T = 1).
OBJECTIVES = ("log_likelihood", "paper")
# A finite stand-in for -inf (as in losses.py): masked logits get exactly
# zero gradient and rows with every column masked stay NaN-free.


def embedding_grid(config) -> tuple[int, int]:
  """(h, w) of the stride-4 embedding (the ResNet 'stage1' grid)."""
  side = resnet.stage_grid(config.image_size, "stage1")
  return side, side


# --------------------------------------------------------------- sampling --
def region_index(cells: jnp.ndarray, num_regions: int):
  """Cells grouped by region, for uniform sampling within a region.

  Args:
    cells: int [B, h, w] leaf id per cell (ids < num_regions).
    num_regions: L, the number of possible ids.
  Returns:
    order int32 [B, hw]: cell indices sorted by id (then by index);
    start int32 [B, L]: where region r starts in `order`;
    count int32 [B, L]: cells of region r (0 if it is not visible).
  """
  b = cells.shape[0]
  flat = cells.reshape(b, -1).astype(jnp.int32)
  hw = flat.shape[1]
  # Leaf ids are small (L <= 40): counting by comparison and sorting one
  # int32 key (id, index) is cheaper to compile and run than argsort +
  # searchsorted.
  count = jnp.sum(flat[:, :, None] == jnp.arange(num_regions), axis=1,
                  dtype=jnp.int32)
  start = jnp.cumsum(count, axis=-1, dtype=jnp.int32) - count
  order = jnp.sort(flat * hw + jnp.arange(hw, dtype=jnp.int32), axis=-1) % hw
  return order, start, count


def _uniforms(key, shapes):
  """One uniform draw in (0, 1), cut into arrays of the given shapes.

  One threefry call for all of a step's sampling: XLA:CPU takes seconds to
  compile each random op (jax.random.categorical alone ~7 s on 2 loaded
  cores), and the draws need no more than independent uniforms.
  """
  sizes = [math.prod(shape) for shape in shapes]
  u = jax.random.uniform(key, (sum(sizes),), jnp.float32,
                         minval=jnp.finfo(jnp.float32).tiny, maxval=1.0)
  out, offset = [], 0
  for shape, size in zip(shapes, sizes):
    out.append(u[offset:offset + size].reshape(shape))
    offset += size
  return out


def categorical(u, logits):
  """Gumbel-max draws: argmax(logits + Gumbel noise) over the last axis.

  Exactly jax.random.categorical, written out so that the noise (u,
  uniforms with the shape of logits) can be shared between the views.
  Returns int32 logits.shape[:-1].
  """
  return jnp.argmax(logits - jnp.log(-jnp.log(u)), axis=-1).astype(jnp.int32)


def sample_cells(u, order, start, count, regions):
  """A uniform cell of each requested region.

  Args:
    u: float [B, ...] uniforms in (0, 1), the shape of regions.
    order, start, count: region_index's output ([B, hw], [B, L], [B, L]).
    regions: int [B, ...] region ids.
  Returns:
    int32 [B, ...] flat cell indices (into h*w). Regions with no cell give
    an arbitrary valid index; callers mask them.
  """
  b = regions.shape[0]
  flat = regions.reshape(b, -1)
  n = jnp.take_along_axis(count, flat, axis=-1)
  first = jnp.take_along_axis(start, flat, axis=-1)
  rank = jnp.clip(jnp.floor(u.reshape(b, -1) * n).astype(jnp.int32), 0,
                  jnp.maximum(n - 1, 0))
  pos = jnp.clip(first + rank, 0, order.shape[1] - 1)
  return jnp.take_along_axis(order, pos, axis=-1).reshape(regions.shape)


def anchor_regions(u, count1, count2):
  """Anchor leaf ids, uniform among the leaves visible in both views.

  Args:
    u: float [B, A, L] uniforms (A anchors per image, with replacement).
    count1, count2: int [B, L] cells of each leaf in each view.
  Returns:
    (ids1, ids2) int32 [B, A]; equal unless the views share no leaf
    (disjoint crops): then each view draws among its own leaves and the
    view-2 anchors are not used (sample_references' anchor_valid).
  """
  shared = (count1 > 0) & (count2 > 0)
  any_shared = jnp.any(shared, axis=-1, keepdims=True)

  def draw(count):
    allowed = jnp.where(any_shared, shared, count > 0)[:, None, :]
    return categorical(u, jnp.where(allowed, 0.0, _MASKED))

  return draw(count1), draw(count2)


def region_logits(distances, anchors, sigma: float):
  """Unnormalised log-probabilities of the positive and negative regions.

  Args:
    distances: float [B, L, L] d_T between leaves.
    anchors: int [B, A] anchor region ids.
    sigma: σ_p.
  Returns:
    pos, neg float32 [B, A, L]: pos = -d_T/σ_p with the self term set to 0
    (exp -> 1); neg = d_T/σ_p with the self term masked.
  """
  num = distances.shape[-1]
  d = jnp.take_along_axis(distances.astype(jnp.float32), anchors[..., None],
                          axis=1)                               # [B, A, L]
  is_self = jnp.arange(num)[None, None, :] == anchors[..., None]
  pos = jnp.where(is_self, 0.0, -d / sigma)
  neg = jnp.where(is_self, _MASKED, d / sigma)
  return pos, neg


def _draw_regions(u, logits, visible):
  """Categorical draws per anchor among the visible regions.

  u [B, A, K, L] uniforms, logits [B, A, L], visible bool [B, 1, L] ->
  (ids int32 [B, A, K], valid bool [B, A, K]: False when no region is
  allowed, e.g. no negative when only the anchor's leaf is visible).
  """
  allowed = visible & (logits > _MASKED / 2)
  masked = jnp.where(allowed, logits, _MASKED)[:, :, None, :]
  ids = categorical(u, masked)
  return ids, jnp.broadcast_to(jnp.any(allowed, -1)[..., None], ids.shape)


def sample_references(key, cells1, cells2, distances, *, num_regions: int = 7,
                      num_positives: int = 10, num_negatives: int = 5,
                      sigma: float = 0.8) -> dict:
  """Anchors, positives and negatives of one batch (module docstring).

  Args:
    key: PRNG key (the step's).
    cells1, cells2: int [B, h, w] leaf ids of each view on the embedding grid.
    distances: float [B, L, L] tree distances d_T.
    num_regions, num_positives, num_negatives, sigma: A, P, N, σ_p.
  Returns dict (cell indices are flat indices into h*w; v = view 0 or 1):
    anchor_regions int32 [B, 2, A]    region of each view's anchor
    anchor_cells   int32 [B, 2, A]
    anchor_valid   bool  [B, 2, A]    view 2's anchor is in view 1's region
    pos_regions, pos_cells int32 [B, 2, A, P]  (view, anchor, draw)
    pos_valid      bool  [B, 2, A, P]
    neg_regions, neg_cells int32 [B, 2, A, N]
    neg_valid      bool  [B, 2, A, N]
  """
  b, num = distances.shape[0], distances.shape[-1]
  a, p, n = num_regions, num_positives, num_negatives
  # Region noise is shared by the views (one draw per anchor and slot), so
  # a region drawn in view 1 is drawn in view 2 whenever it is visible
  # there; pixel noise is per view.
  u_anchor, u_pos, u_neg, c_anchor, c_pos, c_neg = _uniforms(
      key, [(b, a, num), (b, a, p, num), (b, a, n, num), (2, b, a),
            (2, b, a, p), (2, b, a, n)])
  index = [region_index(cells, num) for cells in (cells1, cells2)]
  ids1, ids2 = anchor_regions(u_anchor, index[0][2], index[1][2])
  pos_logits, neg_logits = region_logits(distances, ids1, sigma)
  out = {"anchor_regions": jnp.stack([ids1, ids2], 1),
         "anchor_valid": jnp.stack([jnp.ones_like(ids1, bool), ids1 == ids2],
                                   1)}
  fields = {k: [] for k in ("anchor_cells", "pos_regions", "pos_cells",
                            "pos_valid", "neg_regions", "neg_cells",
                            "neg_valid")}
  for v, (order, start, count) in enumerate(index):
    visible = (count > 0)[:, None, :]                         # [B, 1, L]
    fields["anchor_cells"].append(sample_cells(
        c_anchor[v], order, start, count, (ids1, ids2)[v]))
    for kind, u, logits, cell_u in (("pos", u_pos, pos_logits, c_pos[v]),
                                    ("neg", u_neg, neg_logits, c_neg[v])):
      regions, valid = _draw_regions(u, logits, visible)
      fields[f"{kind}_regions"].append(regions)
      fields[f"{kind}_valid"].append(valid)
      fields[f"{kind}_cells"].append(sample_cells(cell_u, order, start, count,
                                                  regions))
  out.update({k: jnp.stack(v, 1) for k, v in fields.items()})
  return out


def cross_image_negatives(key, emb1, emb2, num_anchors: int, num: int):
  """cns negatives per anchor region: uniform pixels of other images.

  Each image first draws `num` uniform cells of each view (a local gather;
  the embeddings stay sharded), then anchor (b, a)'s negative n takes entry
  e of image c != b, both uniform: only the small pool [B, 2 num, D] crosses
  devices.

  Args:
    emb1, emb2: float [B, hw, D] embeddings of the two views.
  Returns:
    float [B, num_anchors, num, D] (num = 0 or B = 1: an empty axis).
  """
  b, hw, d = emb1.shape
  if num == 0 or b == 1:
    return jnp.zeros((b, num_anchors, 0, d), emb1.dtype)
  u_cell, u_image, u_entry = _uniforms(
      key, [(b, 2, num), (b, num_anchors, num), (b, num_anchors, num)])

  def pick(u, k):   # uniform integer in [0, k)
    return jnp.minimum(jnp.floor(u * k).astype(jnp.int32), k - 1)

  cells = pick(u_cell, hw)
  pool = jnp.concatenate(
      [jnp.take_along_axis(emb1, cells[:, 0, :, None], axis=1),
       jnp.take_along_axis(emb2, cells[:, 1, :, None], axis=1)], axis=1)
  image = (jnp.arange(b)[:, None, None] + 1 + pick(u_image, b - 1)) % b
  return pool[image, pick(u_entry, 2 * num)]


# ------------------------------------------------------------------- loss --
def pixel_contrastive_loss(anchors, positives, negatives, anchor_valid,
                           pos_valid, neg_valid, temperature: float = 0.1,
                           objective: str = "log_likelihood"):
  """Eq. 1 over cosine similarities, as a log-likelihood or verbatim.

  Args:
    anchors: float [B, V, A, D] anchor embeddings (V views of each anchor
      region share its references).
    positives: float [B, A, P, D]; negatives: float [B, A, N, D].
    anchor_valid bool [B, V, A]; pos_valid bool [B, A, P]; neg_valid bool
      [B, A, N].
    temperature: T in s = cos / T (pass 1.0 for eq. 1).
    objective: 'log_likelihood' or 'paper' (`OBJECTIVES`).
  Returns:
    scalar, with -log p_m = log(e^{s_m} + Σ_n e^{s_n}) - s_m:
      'log_likelihood': mean over valid anchors of 1/|P_valid| Σ_m -log p_m;
      'paper': -(Σ over valid anchors and positives of p_m) / (their
        number), i.e. eq. 1's sum, negated and normalised.
  """
  if objective not in OBJECTIVES:
    raise ValueError(f"hiergroup.objective={objective!r}; choose one of "
                     f"{OBJECTIVES}.")
  a, p, n = map(l2_normalize, (anchors, positives, negatives))
  s_pos = jnp.einsum("bvad,bapd->bvap", a, p) / temperature
  s_neg = jnp.einsum("bvad,band->bvan", a, n) / temperature
  s_neg = jnp.where(neg_valid[:, None], s_neg, _MASKED)
  neg_mass = jax.nn.logsumexp(s_neg, axis=-1, keepdims=True)   # [B,V,A,1]
  per_pos = jnp.logaddexp(s_pos, neg_mass) - s_pos      # -log p_m
  pos_w = jnp.broadcast_to(pos_valid[:, None], per_pos.shape).astype(
      jnp.float32)
  if objective == "paper":
    pair_w = pos_w * anchor_valid[..., None].astype(jnp.float32)
    prob = jnp.exp(-per_pos)
    return -jnp.sum(prob * pair_w) / jnp.maximum(jnp.sum(pair_w), 1.0)
  per_anchor = jnp.sum(per_pos * pos_w, -1) / jnp.maximum(pos_w.sum(-1), 1.0)
  w = anchor_valid.astype(jnp.float32) * (pos_w.sum(-1) > 0)
  return jnp.sum(per_anchor * w) / jnp.maximum(jnp.sum(w), 1.0)


def batch_loss(key, emb1, emb2, cells1, cells2, distances, hg,
               temperature: float, objective: str = "log_likelihood"):
  """Samples references and evaluates the loss for one batch.

  Args:
    emb1, emb2: float [B, h, w, D] embeddings of the two views.
    cells1, cells2: int [B, h, w] leaf ids on the same grid.
    distances: float [B, L, L].
    hg: config.hiergroup (num_regions, num_positives, num_negatives,
      sigma_p, cross_image_negatives).
  Returns:
    scalar loss.
  """
  k_ref, k_cns = jax.random.split(key)
  ref = sample_references(k_ref, cells1, cells2, distances,
                          num_regions=hg.num_regions,
                          num_positives=hg.num_positives,
                          num_negatives=hg.num_negatives, sigma=hg.sigma_p)
  b, h, w, d = emb1.shape
  flat = jnp.stack([emb1.reshape(b, h * w, d), emb2.reshape(b, h * w, d)], 1)

  def gather(cells):   # [B, 2, ...] cell indices -> [B, 2, ..., D]
    idx = cells.reshape(b, 2, -1, 1)
    return jnp.take_along_axis(flat, idx, axis=2).reshape(*cells.shape, d)

  def both_views(x):   # [B, 2, A, K, ...] -> [B, A, 2K, ...]
    x = jnp.swapaxes(x, 1, 2)
    return x.reshape(x.shape[0], x.shape[1], -1, *x.shape[4:])

  num_anchors = ref["anchor_cells"].shape[-1]
  cns = cross_image_negatives(k_cns, flat[:, 0], flat[:, 1], num_anchors,
                              hg.cross_image_negatives)
  negatives = jnp.concatenate([both_views(gather(ref["neg_cells"])), cns], 2)
  neg_valid = jnp.concatenate(
      [both_views(ref["neg_valid"]), jnp.ones(cns.shape[:3], bool)], 2)
  return pixel_contrastive_loss(
      gather(ref["anchor_cells"]), both_views(gather(ref["pos_cells"])),
      negatives, ref["anchor_valid"], both_views(ref["pos_valid"]), neg_valid,
      temperature, objective)
