"""Odin: object discovery and representation networks (Hénaff et al. 2022).

DetCon-B's loss (detcon.py) on masks that a discovery network τ finds:
  1. τ (the same network as θ, its own parameters, TrainState.method_state
     ['tau']) embeds the un-augmented spanning view [B, P, P, 3] (P =
     odin.span_scale x S) into per-pixel projections g_τ(f_τ(·)) on the
     finest grid [B, h, w, D] (stride 4 with the FPN);
  2. k-means (k-means++ then Lloyd, odin.num_clusters clusters) on each
     image's L2-normalised projections -> segment ids [B, h, w];
  3. the segments are cropped, flipped and resized into both views
     (discovered.py), and DetCon's loss trains θ on them.
After θ's update, τ ← τ + λ_τ (θ - τ): λ_τ = odin.ema_rate every step
(odin.tau_update 'ema') or 1 every odin.copy_every_epochs epochs ('copy').
With 'copy' and odin.cached=True, τ's masks are computed once per copy
period over the dataset and read as records (odin_cache.py): the step then
trains on them as on data masks.

Config: the `odin` section, defaults in configs/odin.py.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from odin_jax import config_check, kmeans, numerics
from odin_jax.methods import base, discovered, odin_cache

TAU_UPDATES = ("ema", "copy")


def make_discover(config, model) -> Callable:
  """discover(tau, batch_stats, span, key) -> int32 [B, h, w] (steps 1-2).

  BatchNorm uses the span batch's own statistics, as the target network
  does; each image is clustered on its own (no cross-device traffic).
  """
  o = config.odin

  def discover(params, batch_stats, span, key):
    z, _ = model.apply({"params": params, "batch_stats": batch_stats}, span,
                       train=True, method=model.dense_projection,
                       mutable=["batch_stats"])
    b, h, w, d = z.shape
    assign, _ = kmeans.kmeans(numerics.l2_normalize(z.reshape(b, h * w, d)),
                              o.num_clusters, key, num_iters=o.kmeans_iters)
    return jax.lax.stop_gradient(assign.reshape(b, h, w))

  return discover


def tau_rate_schedule(config, steps_per_epoch: int) -> Callable:
  """λ_τ(step) for τ ← τ + λ_τ (θ - τ) after the update of step `step`.

  'ema': the constant rate odin.ema_rate (Odin's continuous schedule, 1e-3).
  'copy': 1 after every odin.copy_every_epochs epochs, else 0 (τ ← θ).
  """
  o = config.odin
  if o.tau_update == "ema":
    return lambda step: jnp.asarray(o.ema_rate, jnp.float32)
  period = max(1, int(round(o.copy_every_epochs * steps_per_epoch)))
  return lambda step: jnp.where((step + 1) % period == 0, 1.0, 0.0)


class Odin(discovered.DiscoveredMasks):
  """Odin, continuous (odin.tau_update 'ema') or by copies, optionally with
  cached masks (odin.cached)."""
  names = ("odin",)
  section = "odin"
  schedule_metrics = ("train/tau_rate",)

  @property
  def cached(self) -> bool:
    return bool(self.config.odin.get("cached", False))

  def validate(self) -> None:
    super().validate()
    o, require = self.config.odin, config_check.require
    require(o.tau_update in TAU_UPDATES, f"odin.tau_update={o.tau_update!r};"
            f" choose one of {TAU_UPDATES}.")
    require(0.0 < o.ema_rate <= 1.0 and o.copy_every_epochs > 0,
            "odin.ema_rate must be in (0, 1] and odin.copy_every_epochs > 0.")
    require(o.num_clusters >= 2 and o.kmeans_iters >= 1,
            "odin.num_clusters must be >= 2 and odin.kmeans_iters >= 1.")
    require(o.span_scale >= 1.0, "odin.span_scale must be >= 1 (Odin: 2).")
    require(not self.cached or o.tau_update == "copy",
            "odin.cached=True needs odin.tau_update='copy' (masks of a "
            "continuously updated τ change every step and cannot be "
            "cached).")

  def span_view(self) -> base.SpanView | None:
    if self.cached:   # the cached masks come with the images, like FH's
      return None
    return base.SpanView(size=round(self.config.odin.span_scale *
                                    self.config.image_size))

  # --- τ ------------------------------------------------------------------

  def init_state(self, params):
    return {"tau": jax.tree.map(jnp.copy, params)}

  def update_state(self, method_state, params, step):
    self._require_lengths()
    rate = tau_rate_schedule(self.config, self.steps_per_epoch)(step)
    tau = jax.tree.map(lambda t, o: t + rate * (o - t), method_state["tau"],
                       params)
    return {"tau": tau}, {"train/tau_rate": rate}

  # --- Masks --------------------------------------------------------------

  def make_find_masks(self, model):
    if self.cached:   # discovered once per period: data (odin_cache.py)
      return None
    return super().make_find_masks(model)

  def make_segment(self, model):
    discover = make_discover(self.config, model)
    return lambda state, batch, key: discover(
        state.method_state["tau"], state.batch_stats, batch["span"], key)

  def input_refresh(self, workdir, model, mesh, source):
    if not self.cached:
      return None
    return odin_cache.MaskCache(self.config, workdir,
                                make_discover(self.config, model), mesh,
                                source)
