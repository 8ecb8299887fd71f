"""Early, clear errors for configs that cannot work.

ml_collections already rejects unknown fields given on the command line;
this checks values and combinations before any data is read or any
parameter is created, naming the field and what to do.
"""

from __future__ import annotations

from odin_jax import losses
from odin_jax.models import resnet

MASK_METHODS = ("fh", "slic", "grid", "gt")
FEATURE_STAGES = ("stage1", "stage2", "stage3", "stage4")
FPN_STAGES = ("p2", "p3", "p4", "p5")
ODIN_UPDATES = ("ema", "copy")


class ConfigError(ValueError):
  """A config field has a value the system cannot run with."""


def _require(ok: bool, message: str) -> None:
  if not ok:
    raise ConfigError(message)


def validate(config) -> None:
  """Raises ConfigError naming the first bad field; returns None if fine."""
  _require(config.batch_size > 0, f"batch_size must be > 0, got "
           f"{config.batch_size}.")
  _require(config.total_steps >= 0 and config.num_epochs > 0,
           "num_epochs must be > 0 and total_steps >= 0 (0 = use epochs).")
  _require(config.grad_accum_steps >= 1 and
           config.batch_size % config.grad_accum_steps == 0,
           f"batch_size={config.batch_size} must be divisible by "
           f"grad_accum_steps={config.grad_accum_steps} (>= 1).")
  _require(config.log_every_steps > 0 and config.checkpoint_every_steps > 0,
           "log_every_steps and checkpoint_every_steps must be > 0.")
  _require(config.image_size >= 32, f"image_size={config.image_size} is too "
           "small for a ResNet (needs >= 32 px).")
  _require(config.num_masks >= 1, "num_masks must be >= 1.")
  _require(config.loss.name in losses.LOSSES,
           f"loss.name={config.loss.name!r}; choose one of "
           f"{sorted(losses.LOSSES)}.")
  _require(config.loss.temperature > 0, "loss.temperature must be > 0.")
  if config.loss.name in ("byol", "simclr"):
    _require(config.num_masks == 1,
             f"loss.name={config.loss.name!r} uses one global mask: set "
             "num_masks=1 (and masks.method='grid', masks.grid_size=1).")
  if config.loss.name == "byol":
    _require(config.ema.enabled and config.model.predictor_hidden > 0,
             "loss.name='byol' needs a target network (ema.enabled=True) "
             "and a predictor (model.predictor_hidden > 0), or it collapses.")
  _require(config.masks.method in MASK_METHODS,
           f"masks.method={config.masks.method!r}; choose one of "
           f"{MASK_METHODS}.")
  _require(config.model.depth in resnet.STAGE_SIZES,
           f"model.depth={config.model.depth}; choose one of "
           f"{sorted(resnet.STAGE_SIZES)}.")
  _require(config.model.width > 0, "model.width must be > 0.")
  stage = config.model.feature_stage
  _require(stage in FEATURE_STAGES + FPN_STAGES,
           f"model.feature_stage={stage!r}; choose one of "
           f"{FEATURE_STAGES + FPN_STAGES}.")
  _require(stage not in FPN_STAGES or config.model.fpn_channels > 0,
           f"model.feature_stage={stage!r} is an FPN output: set "
           "model.fpn_channels > 0 (256 in Odin).")
  o = config.odin
  if o.enabled:
    _require(o.tau_update in ODIN_UPDATES, f"odin.tau_update={o.tau_update!r}; choose "
             f"one of {ODIN_UPDATES}.")
    _require(0.0 < o.ema_rate <= 1.0 and o.copy_every_epochs > 0,
             "odin.ema_rate must be in (0, 1] and odin.copy_every_epochs > 0.")
    _require(o.num_clusters >= 2 and o.kmeans_iters >= 1,
             "odin.num_clusters must be >= 2 and odin.kmeans_iters >= 1.")
    _require(o.span_scale >= 1.0, "odin.span_scale must be >= 1 (Odin: 2).")
  r = config.r2o
  if r.enabled:
    _require(not o.enabled, "odin.enabled and r2o.enabled are exclusive: "
    _require(not o.get("cached", False) or o.tau_update == "copy",
             "odin.cached=True needs odin.tau_update='copy' (masks of a "
             "continuously updated τ change every step and cannot be cached).")
             "each method discovers its own masks.")
    _require(config.ema.enabled, "R2O needs the target network "
             "(ema.enabled=True): its C4 features define the regions.")
    _require(config.masks.method in ("slic", "fh", "grid"),
             "r2o needs a region prior: masks.method 'slic' (paper), 'fh' "
             "or 'grid'.")
    _require(r.region_stage in FEATURE_STAGES,
             f"r2o.region_stage={r.region_stage!r}; choose one of "
             f"{FEATURE_STAGES} ('stage3' = C4 in the paper).")
    _require(1 <= r.k_end <= r.k_start, "r2o needs 1 <= k_end <= k_start.")
    _require(r.group_size >= 1 and config.batch_size % r.group_size == 0,
             f"r2o.group_size={r.group_size} must divide batch_size="
             f"{config.batch_size}; use the per-device batch as R2O does.")
    _require(o.span_scale >= 1.0, "odin.span_scale (the spanning view's "
             "scale, shared with R2O) must be >= 1.")
  _require(config.model.dtype in ("float32", "bfloat16", "float16"),
           f"model.dtype={config.model.dtype!r}; use 'float32' or "
           "'bfloat16'.")
  _require(0.0 <= config.ema.base_decay <= 1.0,
           "ema.base_decay must be in [0, 1].")
  _require(config.optimizer.base_learning_rate > 0,
           "optimizer.base_learning_rate must be > 0.")
