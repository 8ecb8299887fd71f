"""What every discovered-mask method shares (Odin, R2O, a new one).

Such a method segments an un-augmented spanning view on device, every step,
and trains DetCon's contrastive loss on those segments instead of the
data's masks. A subclass gives only `segment`:

  segment(state, batch, key) -> int32 [B, h, w]   segment ids of each span
                                                  on some grid h x w

and its `span_view()`. This class maps the segments into both views (crop,
flip, resize: span_mapping.views_from_span), hands them to the step as
mask1 / mask2 [B, S, S], reports `train/discovered_segments`, and gives
train.py the TensorBoard picture 'discovery/masks' (span | segments | the
masks in both views).
"""

from __future__ import annotations

from typing import Callable

import jax
import numpy as np

from odin_jax import config_check, failure, rng, span_mapping
from odin_jax.evaluate import pictures
from odin_jax.methods import base, detcon


class DiscoveredMasks(detcon.DetCon):
  """DetCon's loss on masks a subclass's `segment` finds on device."""
  names = ()

  def validate(self) -> None:
    super().validate()
    view = self.span_view()
    if view is not None and self.config.model.get("backbone") == "vit":
      patch = self.config.model.vit.patch_size
      config_check.require(
          view.size % patch == 0,
          f"the spanning view ({view.size} px = {self.section}.span_scale x "
          f"image_size) must be a multiple of model.vit.patch_size={patch}.")

  def span_view(self) -> base.SpanView:
    raise NotImplementedError

  def make_segment(self, model) -> Callable:
    """segment(state, batch, key) -> int32 [B, h, w] (module docstring)."""
    raise NotImplementedError

  def make_find_masks(self, model) -> Callable | None:
    segment = self.make_segment(model)
    size = (self.config.image_size,) * 2

    def find_masks(state, batch, key):
      span_segments = segment(state, batch, key)
      mask1, mask2 = span_mapping.views_from_span(span_segments, batch, size)
      return {"span_segments": span_segments, "mask1": mask1,
              "mask2": mask2}

    return find_masks

  def make_pictures(self, model, replicated) -> base.Pictures | None:
    every = self.config.mask_pictures_every_steps
    find_masks = self.make_find_masks(model)
    if every <= 0 or find_masks is None:
      return super().make_pictures(model, replicated)
    config = self.config

    def preview(state, batch):
      batch = base.prepared(config, state, batch)
      found = find_masks(state, batch, rng.step_keys(state)["masks"])
      found.update({k: batch[k] for k in ("span", "view1", "view2")})
      return {k: v[:base.NUM_PICTURES] for k, v in found.items()}

    return base.Pictures(jax.jit(preview, out_shardings=replicated),
                         write_discovered_masks, every)


def write_discovered_masks(writer, number: int, found) -> None:
  """TensorBoard 'discovery/masks': span | segments | masks in both views."""
  found = {k: np.asarray(jax.device_get(v)) for k, v in found.items()}
  failure.inject("pictures", number)
  panels = [pictures.training_masks_panel(
      found["span"][i], found["span_segments"][i], found["view1"][i],
      found["mask1"][i], found["view2"][i], found["mask2"][i])
            for i in range(len(found["mask1"]))]
  writer.write_images(number, {"discovery/masks": np.stack(panels)})
