"""What the one train step and train.py ask of a method: the hooks.

A method is a subclass of `Method`, bound to one config. The train step
(step.py) calls, inside one jit:
  find_masks = method.make_find_masks(model)     masks discovered on device
                                                 (None: the data's masks)
  forward_loss = method.make_forward_loss(model, mesh)
  method.update_state(method_state, params, step) its own state after θ's
                                                 update (Odin's τ)
and, outside: `network()` builds the module, `init_state(params)` the
method's extra state (TrainState.method_state), `batch_keys()` names the
pipeline entries the step reads, `span_view()` tells the input pipeline
whether to ship a spanning view, `validate()` checks the method's config
section, `make_pictures` gives train.py its TensorBoard masks pictures and
`input_refresh` lets a method rebuild its input (Odin's cached masks).

Shapes (global batch B, views S x S, feature grid h x w):
  find_masks(state, batch, key) -> {'mask1', 'mask2': int32 [B, S, S],
      'span_segments': int32 [B, h', w'] (the discovery grid)}
  forward_loss(params, batch_stats, target_params, batch, key) ->
      (loss [], (batch_stats, segments_per_view [], health dict))
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

from odin_jax import config_check, methods, rng
from odin_jax.data import color
from odin_jax.models import network as network_lib

# Entries every method's step reads from the pipeline's batch.
VIEW_KEYS = ("view1", "view2", "mask1", "mask2", "index")
# What a spanning view adds (data/spanning.py).
SPAN_KEYS = ("span", "box1", "box2", "flip1", "flip2")


@dataclasses.dataclass(frozen=True)
class SpanView:
  """The spanning view a method segments on device (data/spanning.py).

  size:          P, its side in pixels.
  whole_image:   True: the whole un-augmented image squashed to P x P (R2O's
                 raw view); False: the box spanning both views' crops (Odin).
  with_segments: also ship 'span_mask', the data's segments on the span.
  """
  size: int
  whole_image: bool = False
  with_segments: bool = False


@dataclasses.dataclass(frozen=True)
class Pictures:
  """train.py's masks pictures: `write(writer, step, preview(state, batch))`
  at the first step and every `every` steps."""
  preview: Callable     # jitted (state, batch) -> dict of arrays
  write: Callable       # (writer, step number, preview output) -> None
  every: int


class Method:
  """A self-supervised method: config checks, data needs and step hooks.

  The defaults are those of a method that trains on the data's masks with
  no state of its own; detcon.DetCon adds the contrastive loss.
  """
  names: tuple[str, ...] = ()   # the config.method values it answers to
  section: str | None = None    # config section it owns (defaults in its
                                #   configs/<method>.py)
  health = True                 # its loss reports the health/* statistics
  eval_feature: str | None = None   # the feature evaluate clusters by
                                    #   default (None: the backbone's)
  # Metrics that are this step's value (schedules), not means over a log
  # interval (train.py); every method has the learning rate and EMA decay.
  schedule_metrics: tuple[str, ...] = ()

  def __init__(self, config, *, total_steps: int | None = None,
               steps_per_epoch: int | None = None):
    self.config = config
    self.total_steps = total_steps
    self.steps_per_epoch = steps_per_epoch

  def _require_lengths(self) -> None:
    if self.total_steps is None or self.steps_per_epoch is None:
      raise ValueError(f"{type(self).__name__} needs the run's length: "
                       "methods.get(config, total_steps=..., "
                       "steps_per_epoch=...) (step.build passes them).")

  # --- Config and data (no arrays) ---------------------------------------

  def validate(self) -> None:
    """Raises config_check.ConfigError naming a bad field of the method.

    Here: the method's own section is there, and no other method's is (its
    settings would be silently ignored).
    """
    c = self.config
    if self.section is not None:
      config_check.require(
          self.section in c, f"config.method={c.method!r} needs the config."
          f"{self.section} section: start from configs/{c.method}.py.")
    for owner in methods.names():
      section = methods.method_class(owner).section
      config_check.require(
          section in (None, self.section) or section not in c,
          f"config.method={c.method!r} with a config.{section} section: "
          f"the {section} settings would be ignored. Train {owner} with "
          f"--config=configs/{owner}.py, or drop the section.")

  def span_view(self) -> SpanView | None:
    """The spanning view the pipeline must ship, or None."""
    return None

  def batch_keys(self) -> tuple[str, ...]:
    """The pipeline's batch entries the step reads."""
    return VIEW_KEYS + (SPAN_KEYS if self.span_view() else ())

  def loss_keys(self) -> tuple[str, ...]:
    """The (prepared) batch entries forward_loss reads."""
    return ("view1", "view2", "mask1", "mask2")

  # --- Model and state -----------------------------------------------------

  def network(self):
    """The flax module every copy of the network (θ, ξ, τ) applies."""
    return network_lib.from_config(self.config)

  def init_state(self, params) -> Any:
    """The method's own state (TrainState.method_state) from θ's init."""
    del params
    return {}

  def update_state(self, method_state, params, step) -> tuple[Any, dict]:
    """(method_state after step `step`, its metrics), from the updated θ."""
    del params, step
    return method_state, {}

  # --- Inside the step -----------------------------------------------------

  def make_find_masks(self, model) -> Callable | None:
    """find_masks(state, batch, key), or None for the data's masks."""
    del model
    return None

  def make_forward_loss(self, model, mesh) -> Callable:
    raise NotImplementedError(f"{type(self).__name__} has no loss.")

  # --- Training pictures and input ----------------------------------------

  def make_pictures(self, model, replicated) -> Pictures | None:
    del model, replicated
    return None

  def input_refresh(self, workdir: str, model, mesh, source):
    """An object with .source(state, writer) and .refresh_due(step) when
    the method rebuilds its input during training, else None."""
    del workdir, model, mesh, source
    return None


# Pictures show the first few images of the global batch.
NUM_PICTURES = 4


def prepared(config, state, batch) -> dict:
  """The batch as the step sees it: views colour-augmented with the step's
  own key (data/color.py), so the pictures show what the networks saw."""
  key = rng.step_keys(state, config.grad_accum_steps)["color"]
  return color.prepare(batch, key, config)
