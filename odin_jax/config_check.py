"""Early, clear errors for configs that cannot work.

ml_collections already rejects unknown fields given on the command line;
this checks values and combinations before any data is read or any
parameter is created, naming the field and what to do.

The checks common to every method are free of JAX, Flax and TensorFlow
on purpose: `python -m odin_jax.main` validates the config before they
load, so a bad common value fails in a fraction of a second. The sets of
valid names below therefore live here as plain tuples; each mirrors the
registry of the module that implements it (tests/e2e/test_cli.py checks that
they agree). Last, the method's own checks run (`validate` of the method
config.method names, odin_jax/methods/): those import JAX, not TensorFlow.
"""

from __future__ import annotations

# NumPy only (no JAX): its mask encodings are checked here.
from odin_jax import methods   # the registry only: no method module yet
from odin_jax.evaluate import folder as eval_folder

# losses.LOSSES, plus hierarchical grouping's own pixel loss
# (methods/hiergroup.py LOSS_NAME).
LOSS_NAMES = ("byol", "contrastive_detection", "mask_byol", "simclr")
HIERGROUP_LOSS = "hiergroup"
MASK_METHODS = ("fh", "fh_opencv", "slic", "grid", "gt", "hierarchy")
MASK_SAMPLING = ("per_view", "shared", "all")    # objects.MASK_SAMPLING
RESNET_DEPTHS = (18, 34, 50, 101, 152, 200)      # resnet.STAGE_SIZES
OUTPUT_STRIDES = (8, 16, 32)                     # resnet.OUTPUT_STRIDES
REMAT_MODES = ("none", "blocks", "stages")       # resnet.REMAT_MODES
FEATURE_STAGES = ("stage1", "stage2", "stage3", "stage4")
FPN_STAGES = ("p2", "p3", "p4", "p5")


class ConfigError(ValueError):
  """A config field has a value the system cannot run with."""


def require(ok: bool, message: str) -> None:
  if not ok:
    raise ConfigError(message)


def validate(config) -> None:
  """Raises ConfigError naming the first bad field; returns None if fine.

  The common checks first (no JAX), then the method's (methods/<name>.py).
  """
  validate_common(config)
  methods.get(config).validate()


def validate_common(config) -> None:
  """The checks every method's config must pass (no JAX imported)."""
  require(config.method in methods.names(),
          f"config.method={config.method!r}; choose one of "
          f"{methods.names()} (each has a configs/<method>.py).")
  require(config.batch_size > 0, f"batch_size must be > 0, got "
          f"{config.batch_size}.")
  require(config.total_steps >= 0 and config.num_epochs > 0,
          "num_epochs must be > 0 and total_steps >= 0 (0 = use epochs).")
  require(0.0 <= config.get("warmup_fraction", 0.0) < 1.0,
          f"warmup_fraction={config.get('warmup_fraction')} must be in "
          "[0, 1): the share of all steps spent warming up (0: use "
          "warmup_epochs; R2O: 0.01).")
  require(config.grad_accum_steps >= 1 and
          config.batch_size % config.grad_accum_steps == 0,
          f"batch_size={config.batch_size} must be divisible by "
          f"grad_accum_steps={config.grad_accum_steps} (>= 1).")
  require(config.log_every_steps > 0 and config.checkpoint_every_steps > 0,
          "log_every_steps and checkpoint_every_steps must be > 0.")
  require(config.image_size >= 32, f"image_size={config.image_size} is too "
          "small for a ResNet (needs >= 32 px).")
  _validate_augment(config.augment)
  _validate_init_from(config.get("init_from") or "")
  require(config.num_masks >= 1, "num_masks must be >= 1.")
  bad_fraction = config.dataset.get("max_bad_fraction", 0.05)
  require(0.0 <= bad_fraction <= 1.0,
          f"dataset.max_bad_fraction={bad_fraction} must be in [0, 1]: the "
          "share of examples that may fail to load before the run stops.")
  require(config.loss.name in LOSS_NAMES + (HIERGROUP_LOSS,),
          f"loss.name={config.loss.name!r}; choose one of "
          f"{LOSS_NAMES + (HIERGROUP_LOSS,)}.")
  require(config.loss.temperature > 0, "loss.temperature must be > 0.")
  _validate_loss_sampling(config)
  if config.loss.name in ("byol", "simclr"):
    require(config.num_masks == 1,
            f"loss.name={config.loss.name!r} uses one global mask: set "
            "num_masks=1 (and masks.method='grid', masks.grid_size=1).")
  if config.loss.name == "byol":
    require(config.ema.enabled and config.model.predictor_hidden > 0,
            "loss.name='byol' needs a target network (ema.enabled=True) "
            "and a predictor (model.predictor_hidden > 0), or it collapses.")
  require(config.masks.method in MASK_METHODS,
          f"masks.method={config.masks.method!r}; choose one of "
          f"{MASK_METHODS}.")
  require(config.model.depth in RESNET_DEPTHS,
          f"model.depth={config.model.depth}; choose one of "
          f"{RESNET_DEPTHS}.")
  require(config.model.width > 0, "model.width must be > 0.")
  output_stride = config.model.get("output_stride", 32)
  require(output_stride in OUTPUT_STRIDES,
          f"model.output_stride={output_stride!r}; choose one of "
          f"{OUTPUT_STRIDES}.")
  require(output_stride == 32 or (
      config.model.get("backbone", "resnet") == "resnet"
      and config.model.fpn_channels == 0),
           f"model.output_stride={output_stride} dilates a plain ResNet; an "
           "FPN (its levels are 2x apart) and a ViT / Swin need "
           "model.output_stride=32.")
  _validate_backbone(config)
  stage = config.model.feature_stage
  maps = backbone_maps(config)
  maps += FPN_STAGES if maps == FEATURE_STAGES else ()
  require(stage in maps,
          f"model.feature_stage={stage!r}; choose one of {maps} for "
          f"model.backbone={config.model.get('backbone', 'resnet')!r}.")
  require(stage not in FPN_STAGES or config.model.fpn_channels > 0,
          f"model.feature_stage={stage!r} is an FPN output: set "
          "model.fpn_channels > 0 (256 in Odin).")
  # float16 would need loss scaling (its gradients underflow), which the
  # step does not do; bfloat16 has float32's exponent range and does not.
  require(config.model.dtype in ("float32", "bfloat16"),
          f"model.dtype={config.model.dtype!r}; use 'float32' or "
          "'bfloat16'.")
  _validate_scale(config)
  schedule = config.optimizer.get("schedule", "cosine")
  require(schedule in ("cosine", "piecewise"), f"optimizer.schedule="
          f"{schedule!r}; choose 'cosine' or 'piecewise'.")
  if schedule == "piecewise":
    o = config.optimizer
    require(all(0 < f <= 1 for f in o.decay_at) and o.decay_factor > 0,
            "optimizer.decay_at must be fractions of training in (0, 1] "
            "and optimizer.decay_factor > 0.")
  require(0.0 <= config.ema.base_decay <= 1.0,
          "ema.base_decay must be in [0, 1].")
  require(config.optimizer.base_learning_rate > 0,
          "optimizer.base_learning_rate must be > 0.")
  encoding = (config.get("eval") or {}).get("folder_mask_encoding", "ids")
  require(encoding in eval_folder.MASK_ENCODINGS,
          f"eval.folder_mask_encoding={encoding!r}; choose 'ids' (palette / "
          "grayscale / 16-bit id PNGs) or 'coco_rgb' (COCO panoptic RGB).")


NEGATIVES = ("global", "device")


def _validate_loss_sampling(config) -> None:
  """loss.negatives, loss.mask_sampling and the renamed loss.local_negatives."""
  loss = config.loss
  require(loss.get("local_negatives") is None,
          "loss.local_negatives was renamed: DeepMind's DetCon flag of that "
          "name means 'negatives from the same image', ours meant 'from "
          "this device only'. Use loss.negatives='device' (negatives from "
          "this device only) or loss.negatives='global' (the whole batch, "
          "the default), and remove loss.local_negatives.")
  require(loss.negatives in NEGATIVES,
          f"loss.negatives={loss.negatives!r}; choose one of {NEGATIVES}.")
  require(loss.mask_sampling in MASK_SAMPLING,
          f"loss.mask_sampling={loss.mask_sampling!r}; choose one of "
          f"{MASK_SAMPLING}.")


def _validate_scale(config) -> None:
  """model.remat, sharding.* and profile.* (docs/scale.md)."""
  require(config.model.remat in REMAT_MODES,
          f"model.remat={config.model.remat!r}; choose one of "
          f"{REMAT_MODES}.")
  require(config.sharding.fsdp_min_size >= 0,
          "sharding.fsdp_min_size must be >= 0 (elements).")
  p = config.profile
  require(p.num_steps >= 0 and p.start_step >= 1,
          f"profile.start_step={p.start_step} must be >= 1 (steps count "
          f"from 1) and profile.num_steps={p.num_steps} >= 0 (0 = off).")


# --- Backbones and optimiser (docs/transformers.md) ------------------------

BACKBONES = ("resnet", "vit", "swin")
OPTIMIZERS = ("lars", "adamw", "adam")


def backbone_maps(config) -> tuple[str, ...]:
  """The feature maps the backbone returns (without an FPN's)."""
  if config.model.get("backbone", "resnet") == "vit":
    return ("tokens",)
  return FEATURE_STAGES


def _validate_backbone(config) -> None:
  """model.backbone, model.vit.* / model.swin.*, optimizer.name / clip_norm."""
  m = config.model
  kind = m.get("backbone", "resnet")
  require(kind in BACKBONES, f"model.backbone={kind!r}; choose one of "
          f"{BACKBONES}.")
  if kind == "vit":
    v = m.vit
    require(v.patch_size >= 1 and v.depth >= 1 and v.mlp_ratio > 0,
            "model.vit.patch_size and model.vit.depth must be >= 1 and "
            "model.vit.mlp_ratio > 0.")
    require(v.num_heads >= 1 and v.width % v.num_heads == 0,
            f"model.vit.width={v.width} must be a multiple of "
            f"model.vit.num_heads={v.num_heads}.")
    require(m.fpn_channels == 0, "model.backbone='vit' has one map "
            "('tokens'): set model.fpn_channels=0 (Odin uses no FPN on "
            "ViTs).")
    require(config.image_size % v.patch_size == 0,
            f"image_size={config.image_size} must be a multiple of "
            f"model.vit.patch_size={v.patch_size} (or masks and tokens "
            "would not align).")
  elif kind == "swin":
    s = m.swin
    require(len(s.depths) == 4 and len(s.num_heads) == 4 and
            min(s.depths) >= 1,
            f"model.swin.depths={tuple(s.depths)} and model.swin.num_heads="
            f"{tuple(s.num_heads)} need 4 stages of >= 1 block.")
    require(all(heads >= 1 and (s.embed_dim * 2**i) % heads == 0
                 for i, heads in enumerate(s.num_heads)),
            f"model.swin.num_heads={tuple(s.num_heads)} must divide each "
            f"stage's width (embed_dim={s.embed_dim} x 1, 2, 4, 8).")
    require(s.window >= 1 and s.patch_size >= 1 and s.mlp_ratio > 0,
            "model.swin.window and model.swin.patch_size must be >= 1 and "
            "model.swin.mlp_ratio > 0.")
  o = config.optimizer
  require(o.get("name", "lars") in OPTIMIZERS,
          f"optimizer.name={o.get('name')!r}; choose one of {OPTIMIZERS}.")
  require(o.get("clip_norm", 0.0) >= 0,
          "optimizer.clip_norm must be >= 0 (0 = no clipping).")
  if o.get("name", "lars") in ("adamw", "adam"):
    require(0 <= o.adam_b1 < 1 and 0 <= o.adam_b2 < 1,
            "optimizer.adam_b1 and optimizer.adam_b2 must be in [0, 1).")


def _validate_augment(a) -> None:
  """augment.*: probabilities in [0, 1], per-view pairs, sane jitter ranges."""
  for name in ("flip_prob", "color_jitter_prob", "grayscale_prob"):
    require(0.0 <= a[name] <= 1.0,
            f"augment.{name}={a[name]} must be a probability in [0, 1].")
  for name in ("blur_prob", "solarize_prob"):
    v = a[name]
    require(isinstance(v, (tuple, list)) and len(v) == 2 and
            all(0.0 <= p <= 1.0 for p in v),
            f"augment.{name}={v!r} must be a pair of probabilities "
            "(view 1, view 2), e.g. (1.0, 0.1).")
  for name in ("brightness", "contrast", "saturation"):
    require(a[name] >= 0.0, f"augment.{name}={a[name]} must be >= 0 (the "
            "jitter range; 0 turns the op off).")
  require(0.0 <= a.hue <= 0.5, f"augment.hue={a.hue} must be in [0, 0.5] "
          "(a shift of the hue circle, whose period is 1).")
  require(0.0 < a.blur_sigma_min <= a.blur_sigma_max,
          f"augment.blur_sigma_min={a.blur_sigma_min} and blur_sigma_max="
          f"{a.blur_sigma_max} must satisfy 0 < min <= max (pixels).")


# export/weights_in.FILE_SUFFIXES (tests/unit/test_weights_in.py checks it).
INIT_FROM_SUFFIXES = (".pth", ".pt", ".bin", ".safetensors", ".npz")


def _validate_init_from(path) -> None:
  """init_from: '' or a checkpoint file / workdir that exists (URLs are
  checked when read)."""
  import os
  require(isinstance(path, str), f"init_from={path!r} must be a path.")
  if not path or "://" in path:
    return
  require(os.path.exists(path), f"init_from={path}: no such file or "
          "directory (a torchvision / timm checkpoint, odin_jax's "
          "backbone.npz or a run's workdir).")
  require(os.path.isdir(path) or
          path.lower().endswith(INIT_FROM_SUFFIXES),
          f"init_from={path}: unknown checkpoint type; give one of "
          f"{INIT_FROM_SUFFIXES} or a workdir.")
