"""DetCon-B, DetCon-S, BYOL and SimCLR: contrastive learning on the data's
masks (Hénaff et al. 2021; BYOL, SimCLR as its one-mask cases).

The four differ only in config: a predictor (`model.predictor_hidden`), an
EMA target network (`ema.enabled`), how many mask ids are sampled per view
(`num_masks`, 1 with a 1x1 grid for the global-mask baselines) and the loss
(`loss.name`). Odin and R2O (odin.py, r2o.py) reuse this loss on masks they
discover.

forward_loss, for a batch of views [B, S, S, 3] and masks [B, S, S]:
  1. each view's mask -> majority id per feature-grid cell [B, h, w]
     (objects.downsample_segments) -> num_masks ids per view (the
     loss.mask_sampling rule, objects.view_mask_ids) [B, M];
  2. online network on both views -> pooled, projected, predicted [B, M, D];
     target network ξ (or the online projections, without one) -> targets;
  3. loss.name's loss over the global batch (negatives: every image, or
     this device's with loss.negatives='device').
"""

from __future__ import annotations

import functools

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from odin_jax import config_check, health, losses, objects, rng, sharding
from odin_jax.evaluate import pictures
from odin_jax.methods import base
from odin_jax.models import network as network_lib


class DetCon(base.Method):
  """DetCon-B / DetCon-S / BYOL / SimCLR (configs/<name>.py)."""
  names = ("detcon_b", "detcon_s", "byol", "simclr")

  def validate(self) -> None:
    super().validate()
    c, require = self.config, config_check.require
    require(c.loss.name in config_check.LOSS_NAMES,
            f"config.method={c.method!r} trains with one of the mask losses "
            f"{config_check.LOSS_NAMES}, not loss.name={c.loss.name!r}.")

  def make_forward_loss(self, model, mesh):
    """The contrastive forward_loss (module docstring), for the step."""
    config = self.config
    grid = network_lib.feature_grid(config)
    num_masks, mask_sampling = config.num_masks, config.loss.mask_sampling
    use_target = bool(config.ema.enabled)
    track_health = config.health.enabled
    loss_fn = functools.partial(losses.get_loss(config.loss.name),
                                temperature=config.loss.temperature)
    device_negatives = config.loss.negatives == "device"
    if device_negatives:
      if mesh is None:
        raise ValueError("loss.negatives='device' needs the device mesh.")
      loss_fn = losses.device_negatives_loss(loss_fn, mesh)
    replicated = NamedSharding(mesh, P()) if mesh is not None else None

    def gather(x):
      # Targets are needed whole by every device (they are the negatives);
      # predictions stay sharded, so the logits are sharded by row.
      if replicated is None or device_negatives:
        return x
      return jax.lax.with_sharding_constraint(x, replicated)

    def forward_loss(params, batch_stats, target_params, batch, key):
      cells1 = objects.downsample_segments(batch["mask1"], grid)
      cells2 = objects.downsample_segments(batch["mask2"], grid)
      # The online and the target network pool the same ids of a view.
      ids1, ids2 = objects.view_mask_ids(mask_sampling, key, cells1, cells2,
                                         num_masks)

      def online(stats, view, cells, ids):
        return model.apply({"params": params, "batch_stats": stats}, view,
                           cells, ids, train=True, mutable=["batch_stats"])

      out1, upd = online(batch_stats, batch["view1"], cells1, ids1)
      out2, upd = online(upd["batch_stats"], batch["view2"], cells2, ids2)
      if use_target:
        def target(view, cells, ids):
          out, _ = model.apply({"params": target_params,
                                "batch_stats": batch_stats}, view, cells, ids,
                               train=True, with_predictor=False,
                               mutable=["batch_stats"])
          return jax.lax.stop_gradient(out["projection"])
        t1 = target(batch["view1"], cells1, ids1)
        t2 = target(batch["view2"], cells2, ids2)
      else:   # DetCon-S / SimCLR: the online projections are the targets
        t1, t2 = out1["projection"], out2["projection"]
      loss = loss_fn(out1["prediction"], out2["prediction"], gather(t1),
                     gather(t2), ids1, ids2)
      segments = 0.5 * (objects.mean_num_ids(cells1) +
                        objects.mean_num_ids(cells2))
      # Collapse statistics of what the loss compares against (health.py),
      # on the ungathered targets: XLA sums the D x D Gram across devices.
      # Padding ids (< 0, mask_sampling 'all') are left out.
      checks = (health.metrics([t1, t2], [ids1 >= 0, ids2 >= 0])
                if track_health else {})
      return loss, (upd["batch_stats"], segments, checks)

    return forward_loss

  def make_pictures(self, model, replicated):
    """TensorBoard 'masks/sampled': view | masks | the sampled masks."""
    del model
    every = self.config.mask_pictures_every_steps
    if every <= 0:
      return None
    return base.Pictures(sampled_masks_preview(self.config, replicated),
                         write_sampled_masks, every)


def sampled_masks_preview(config, replicated):
  """jit(state, batch) -> the data masks and the ids the step samples.

  The first base.NUM_PICTURES images of micro-batch 0 (global rows 0, k,
  2k, ... with k = grad_accum_steps): view1, view2 float [N, S, S, 3] as
  the step saw them, mask1, mask2 int [N, S, S] and ids1, ids2 int [N, M],
  drawn with the step's own key from the whole micro-batch, as
  forward_loss draws them. Replicated, so every host can read them.
  """
  grid, k = network_lib.feature_grid(config), config.grad_accum_steps

  def preview(state, batch):
    batch = base.prepared(config, state, batch)
    views, masks = [[sharding.strided_split(batch[f"{name}{v}"], k)[0]
                     for v in (1, 2)] for name in ("view", "mask")]
    cells = [objects.downsample_segments(m, grid) for m in masks]
    ids = objects.view_mask_ids(config.loss.mask_sampling,
                                rng.step_keys(state, k)["loss"][0], *cells,
                                config.num_masks)
    out = {}
    for v in range(2):
      out.update({f"view{v + 1}": views[v], f"mask{v + 1}": masks[v],
                  f"ids{v + 1}": ids[v]})
    return {name: x[:base.NUM_PICTURES] for name, x in out.items()}
  return jax.jit(preview, out_shardings=replicated)


def write_sampled_masks(writer, number: int, found) -> None:
  """TensorBoard 'masks/sampled': view | masks | sampled masks, 2 views."""
  found = {k: np.asarray(jax.device_get(v)) for k, v in found.items()}
  panels = [pictures.sampled_masks_panel(
      found["view1"][i], found["mask1"][i], found["ids1"][i],
      found["view2"][i], found["mask2"][i], found["ids2"][i])
            for i in range(len(found["mask1"]))]
  writer.write_images(number, {"masks/sampled": np.stack(panels)})
