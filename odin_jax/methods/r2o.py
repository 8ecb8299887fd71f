"""R2O: region-to-object representation learning (Gokul et al. 2022).

A discovered-mask method (discovered.py) whose masks come from k-means over
region features of the target network, with the number of clusters K
shrinking from regions to objects over training:
  1. C4 features of the span [B, P, P, 3] by ξ (no gradient): by default
     the whole un-augmented image at P = r2o.span_scale x S (R2O's raw view,
     r2o.cluster_view 'image'), with its superpixels span_mask [B, P, P];
  2. each superpixel (majority id per cell) pooled into one region vector,
     L2-normalised;
  3. k-means over the regions of each group of r2o.group_size images
     jointly (R2O clusters each device's mini-batch), K = K(step) of at
     most r2o.k_start clusters:
       K(e) = k_end + (k_start - k_end) cos(π/2 · e/E)   (R2O eq. A1);
  4. every cell takes its nearest centre (R2O §3.1): masks [B, h, w] on the
     region_stage grid (C4: 14x14 at 224).
The loss is loss.name ('mask_byol': per-mask BYOL over all K masks with
loss.mask_sampling 'all'). Config: the `r2o` section, defaults in
configs/r2o.py.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from odin_jax import config_check, kmeans, numerics, objects
from odin_jax.methods import base, discovered

CLUSTER_VIEWS = ("image", "spanning")
# The region prior the superpixels come from (masks.method).
REGION_PRIORS = ("slic", "fh", "fh_opencv", "grid")


def num_clusters_schedule(config, total_steps: int) -> Callable:
  """R2O's region-to-object curriculum K(step), an int32 scalar (step 3)."""
  r = config.r2o

  def num_clusters(step):
    progress = jnp.minimum(step / max(total_steps, 1), 1.0)
    k = r.k_end + (r.k_start - r.k_end) * jnp.cos(0.5 * jnp.pi * progress)
    return jnp.round(k).astype(jnp.int32)

  return num_clusters


def make_predict_masks(config, model, num_clusters: Callable) -> Callable:
  """predict(params, batch_stats, span, span_mask, step, key) ->
  int32 [B, h, w], steps 1-4 of the module docstring."""
  r = config.r2o

  def predict(params, batch_stats, span, span_mask, step, key):
    maps, _ = model.apply({"params": params, "batch_stats": batch_stats},
                          span, train=True, method=model.feature_maps,
                          mutable=["batch_stats"])
    feats = maps[r.region_stage].astype(jnp.float32)          # [B,h,w,C]
    b, h, w, c = feats.shape
    cells = objects.downsample_segments(span_mask, (h, w))
    unique, count = objects.unique_ids(cells)                   # [B, hw]
    valid = jnp.arange(h * w)[None] < count[:, None]
    regions = numerics.l2_normalize(objects.pool_features(
        feats, cells, jnp.where(valid, unique, -1)))            # [B, hw, C]
    groups = b // r.group_size
    points = regions.reshape(groups, r.group_size * h * w, c)
    _, centres = kmeans.kmeans(
        points, r.k_start, key, num_iters=r.kmeans_iters,
        valid=valid.reshape(groups, -1), num_active=num_clusters(step))
    pixels = numerics.l2_normalize(feats).reshape(groups,
                                                  r.group_size * h * w, c)
    nearest = kmeans.nearest_centre(pixels, centres,
                                    num_active=num_clusters(step))
    return jax.lax.stop_gradient(nearest.reshape(b, h, w))

  return predict


class R2O(discovered.DiscoveredMasks):
  """R2O (configs/r2o.py)."""
  names = ("r2o",)
  section = "r2o"
  schedule_metrics = ("train/num_clusters",)

  def validate(self) -> None:
    super().validate()
    c, r, require = self.config, self.config.r2o, config_check.require
    require(c.ema.enabled, "R2O needs the target network (ema.enabled=True):"
            " its C4 features define the regions.")
    require(c.masks.method in REGION_PRIORS,
            f"r2o needs a region prior: masks.method one of {REGION_PRIORS} "
            "('slic' in the paper).")
    maps = config_check.backbone_maps(c)
    require(r.region_stage in maps,
            f"r2o.region_stage={r.region_stage!r}; choose one of {maps} "
            "('stage3' = C4 in the paper, 'tokens' for a ViT).")
    require(1 <= r.k_end <= r.k_start, "r2o needs 1 <= k_end <= k_start.")
    require(r.group_size >= 1 and c.batch_size % r.group_size == 0,
            f"r2o.group_size={r.group_size} must divide batch_size="
            f"{c.batch_size}; use the per-device batch as R2O does.")
    require(r.span_scale >= 1.0, "r2o.span_scale (the clustered view's side"
            " / image_size) must be >= 1.")
    require(r.cluster_view in CLUSTER_VIEWS,
            f"r2o.cluster_view={r.cluster_view!r}; choose one of "
            f"{CLUSTER_VIEWS} ('image': the whole image, as R2O).")
    if c.loss.mask_sampling == "all":
      # Each view then has at most r2o.k_start ids; more would be dropped.
      require(c.num_masks >= r.k_start,
              f"loss.mask_sampling='all' with R2O needs num_masks >= "
              f"r2o.k_start={r.k_start} (one row per cluster), got "
              f"num_masks={c.num_masks}.")

  def span_view(self) -> base.SpanView:
    r = self.config.r2o
    return base.SpanView(size=round(r.span_scale * self.config.image_size),
                         whole_image=r.cluster_view == "image",
                         with_segments=True)

  def batch_keys(self) -> tuple[str, ...]:
    return super().batch_keys() + ("span_mask",)

  def _num_clusters(self) -> Callable:
    self._require_lengths()
    return num_clusters_schedule(self.config, self.total_steps)

  def update_state(self, method_state, params, step):
    del params
    return method_state, {"train/num_clusters": self._num_clusters()(step)}

  def make_segment(self, model):
    predict = make_predict_masks(self.config, model, self._num_clusters())
    return lambda state, batch, key: predict(
        state.target_params, state.batch_stats, batch["span"],
        batch["span_mask"], state.step, key)
