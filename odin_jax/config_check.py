"""Early, clear errors for configs that cannot work.

ml_collections already rejects unknown fields given on the command line;
this checks values and combinations before any data is read or any
parameter is created, naming the field and what to do.

Free of JAX, Flax and TensorFlow on purpose: `python -m odin_jax.main`
validates the config before they load, so a bad value fails in a fraction
of a second. The sets of valid names below therefore live here as plain
tuples; each mirrors the registry of the module that implements it
(tests/test_cli.py checks that they agree).
"""

from __future__ import annotations

# NumPy only (no JAX): its mask encodings are checked here.
from odin_jax.evaluate import folder as eval_folder

# losses.LOSSES, plus hiergroup.LOSS_NAME (which has its own step).
LOSS_NAMES = ("byol", "contrastive_detection", "mask_byol", "simclr")
HIERGROUP_LOSS = "hiergroup"
MASK_METHODS = ("fh", "fh_opencv", "slic", "grid", "gt", "hierarchy")
MASK_SAMPLING = ("per_view", "shared", "all")    # objects.MASK_SAMPLING
RESNET_DEPTHS = (18, 34, 50, 101, 152, 200)      # resnet.STAGE_SIZES
OUTPUT_STRIDES = (8, 16, 32)                     # resnet.OUTPUT_STRIDES
REMAT_MODES = ("none", "blocks", "stages")       # resnet.REMAT_MODES
HIERGROUP_OBJECTIVES = ("log_likelihood", "paper")  # hiergroup.OBJECTIVES
FEATURE_STAGES = ("stage1", "stage2", "stage3", "stage4")
FPN_STAGES = ("p2", "p3", "p4", "p5")
ODIN_UPDATES = ("ema", "copy")
R2O_CLUSTER_VIEWS = ("image", "spanning")


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
  _require(0.0 <= config.get("warmup_fraction", 0.0) < 1.0,
           f"warmup_fraction={config.get('warmup_fraction')} must be in "
           "[0, 1): the share of all steps spent warming up (0: use "
           "warmup_epochs; R2O: 0.01).")
  _require(config.grad_accum_steps >= 1 and
           config.batch_size % config.grad_accum_steps == 0,
           f"batch_size={config.batch_size} must be divisible by "
           f"grad_accum_steps={config.grad_accum_steps} (>= 1).")
  _require(config.log_every_steps > 0 and config.checkpoint_every_steps > 0,
           "log_every_steps and checkpoint_every_steps must be > 0.")
  _require(config.image_size >= 32, f"image_size={config.image_size} is too "
           "small for a ResNet (needs >= 32 px).")
  _validate_augment(config.augment)
  _validate_init_from(config.get("init_from") or "")
  _require(config.num_masks >= 1, "num_masks must be >= 1.")
  bad_fraction = config.dataset.get("max_bad_fraction", 0.05)
  _require(0.0 <= bad_fraction <= 1.0,
           f"dataset.max_bad_fraction={bad_fraction} must be in [0, 1]: the "
           "share of examples that may fail to load before the run stops.")
  _require(config.loss.name in LOSS_NAMES + (HIERGROUP_LOSS,),
           f"loss.name={config.loss.name!r}; choose one of "
           f"{LOSS_NAMES + (HIERGROUP_LOSS,)}.")
  _require(config.loss.temperature > 0, "loss.temperature must be > 0.")
  _validate_loss_sampling(config)
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
  _require(config.model.depth in RESNET_DEPTHS,
           f"model.depth={config.model.depth}; choose one of "
           f"{RESNET_DEPTHS}.")
  _require(config.model.width > 0, "model.width must be > 0.")
  output_stride = config.model.get("output_stride", 32)
  _require(output_stride in OUTPUT_STRIDES,
           f"model.output_stride={output_stride!r}; choose one of "
           f"{OUTPUT_STRIDES}.")
  _require(output_stride == 32 or (
      config.model.get("backbone", "resnet") == "resnet"
      and config.model.fpn_channels == 0 and config.loss.name != "hiergroup"),
           f"model.output_stride={output_stride} dilates a plain ResNet; an "
           "FPN (its levels are 2x apart), a ViT / Swin and the hiergroup "
           "network need model.output_stride=32.")
  _validate_backbone(config)
  stage = config.model.feature_stage
  maps = _backbone_maps(config)
  maps += FPN_STAGES if maps == FEATURE_STAGES else ()
  _require(stage in maps,
           f"model.feature_stage={stage!r}; choose one of {maps} for "
           f"model.backbone={config.model.get('backbone', 'resnet')!r}.")
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
    _require(not o.get("cached", False) or o.tau_update == "copy",
             "odin.cached=True needs odin.tau_update='copy' (masks of a "
             "continuously updated τ change every step and cannot be cached).")
  r = config.r2o
  if r.enabled:
    _require(not o.enabled, "odin.enabled and r2o.enabled are exclusive: "
             "each method discovers its own masks.")
    _require(config.ema.enabled, "R2O needs the target network "
             "(ema.enabled=True): its C4 features define the regions.")
    _require(config.masks.method in ("slic", "fh", "fh_opencv", "grid"),
             "r2o needs a region prior: masks.method 'slic' (paper), 'fh' "
             "('fh_opencv') or 'grid'.")
    _require(r.region_stage in _backbone_maps(config),
             f"r2o.region_stage={r.region_stage!r}; choose one of "
             f"{_backbone_maps(config)} ('stage3' = C4 in the paper, "
             "'tokens' for a ViT).")
    _require(1 <= r.k_end <= r.k_start, "r2o needs 1 <= k_end <= k_start.")
    _require(r.group_size >= 1 and config.batch_size % r.group_size == 0,
             f"r2o.group_size={r.group_size} must divide batch_size="
             f"{config.batch_size}; use the per-device batch as R2O does.")
    _require(o.span_scale >= 1.0, "odin.span_scale (the spanning view's "
             "scale, shared with R2O) must be >= 1.")
    _require(r.get("cluster_view", "image") in R2O_CLUSTER_VIEWS,
             f"r2o.cluster_view={r.get('cluster_view')!r}; choose one of "
             f"{R2O_CLUSTER_VIEWS} ('image': the whole image, as R2O).")
  # float16 would need loss scaling (its gradients underflow), which the
  # step does not do; bfloat16 has float32's exponent range and does not.
  _require(config.model.dtype in ("float32", "bfloat16"),
           f"model.dtype={config.model.dtype!r}; use 'float32' or "
           "'bfloat16'.")
  _validate_scale(config)
  if config.loss.name == "hiergroup":
    _validate_hiergroup(config)
  schedule = config.optimizer.get("schedule", "cosine")
  _require(schedule in ("cosine", "piecewise"), f"optimizer.schedule="
           f"{schedule!r}; choose 'cosine' or 'piecewise'.")
  if schedule == "piecewise":
    o = config.optimizer
    _require(all(0 < f <= 1 for f in o.decay_at) and o.decay_factor > 0,
             "optimizer.decay_at must be fractions of training in (0, 1] "
             "and optimizer.decay_factor > 0.")
  _require(0.0 <= config.ema.base_decay <= 1.0,
           "ema.base_decay must be in [0, 1].")
  _require(config.optimizer.base_learning_rate > 0,
           "optimizer.base_learning_rate must be > 0.")
  encoding = (config.get("eval") or {}).get("folder_mask_encoding", "ids")
  _require(encoding in eval_folder.MASK_ENCODINGS,
           f"eval.folder_mask_encoding={encoding!r}; choose 'ids' (palette / "
           "grayscale / 16-bit id PNGs) or 'coco_rgb' (COCO panoptic RGB).")


NEGATIVES = ("global", "device")


def _validate_loss_sampling(config) -> None:
  """loss.negatives, loss.mask_sampling and the renamed loss.local_negatives."""
  loss = config.loss
  _require(loss.get("local_negatives") is None,
           "loss.local_negatives was renamed: DeepMind's DetCon flag of that "
           "name means 'negatives from the same image', ours meant 'from "
           "this device only'. Use loss.negatives='device' (negatives from "
           "this device only) or loss.negatives='global' (the whole batch, "
           "the default), and remove loss.local_negatives.")
  _require(loss.negatives in NEGATIVES,
           f"loss.negatives={loss.negatives!r}; choose one of {NEGATIVES}.")
  _require(loss.mask_sampling in MASK_SAMPLING,
           f"loss.mask_sampling={loss.mask_sampling!r}; choose one of "
           f"{MASK_SAMPLING}.")
  if loss.mask_sampling == "all" and config.r2o.enabled:
    # Each view then has at most r2o.k_start ids; more would be dropped.
    _require(config.num_masks >= config.r2o.k_start,
             f"loss.mask_sampling='all' with R2O needs num_masks >= "
             f"r2o.k_start={config.r2o.k_start} (one row per cluster), got "
             f"num_masks={config.num_masks}.")


def _validate_scale(config) -> None:
  """model.remat, sharding.* and profile.* (docs/scale.md)."""
  _require(config.model.remat in REMAT_MODES,
           f"model.remat={config.model.remat!r}; choose one of "
           f"{REMAT_MODES}.")
  _require(config.sharding.fsdp_min_size >= 0,
           "sharding.fsdp_min_size must be >= 0 (elements).")
  p = config.profile
  _require(p.num_steps >= 0 and p.start_step >= 1,
           f"profile.start_step={p.start_step} must be >= 1 (steps count "
           f"from 1) and profile.num_steps={p.num_steps} >= 0 (0 = off).")


# --- Backbones and optimiser (docs/transformers.md) ------------------------

BACKBONES = ("resnet", "vit", "swin")
OPTIMIZERS = ("lars", "adamw", "adam")


def _backbone_maps(config) -> tuple[str, ...]:
  """The feature maps the backbone returns (without an FPN's)."""
  if config.model.get("backbone", "resnet") == "vit":
    return ("tokens",)
  return FEATURE_STAGES


def _validate_backbone(config) -> None:
  """model.backbone, model.vit.* / model.swin.*, optimizer.name / clip_norm."""
  m = config.model
  kind = m.get("backbone", "resnet")
  _require(kind in BACKBONES, f"model.backbone={kind!r}; choose one of "
           f"{BACKBONES}.")
  if kind == "vit":
    v = m.vit
    _require(v.patch_size >= 1 and v.depth >= 1 and v.mlp_ratio > 0,
             "model.vit.patch_size and model.vit.depth must be >= 1 and "
             "model.vit.mlp_ratio > 0.")
    _require(v.num_heads >= 1 and v.width % v.num_heads == 0,
             f"model.vit.width={v.width} must be a multiple of "
             f"model.vit.num_heads={v.num_heads}.")
    _require(m.fpn_channels == 0, "model.backbone='vit' has one map "
             "('tokens'): set model.fpn_channels=0 (Odin uses no FPN on "
             "ViTs).")
    _require(config.image_size % v.patch_size == 0,
             f"image_size={config.image_size} must be a multiple of "
             f"model.vit.patch_size={v.patch_size} (or masks and tokens "
             "would not align).")
    if config.odin.enabled or config.r2o.enabled:
      span = round(config.odin.span_scale * config.image_size)
      _require(span % v.patch_size == 0,
               f"the spanning view ({span} px = odin.span_scale x "
               f"image_size) must be a multiple of model.vit.patch_size="
               f"{v.patch_size}.")
  elif kind == "swin":
    s = m.swin
    _require(len(s.depths) == 4 and len(s.num_heads) == 4 and
             min(s.depths) >= 1,
             f"model.swin.depths={tuple(s.depths)} and model.swin.num_heads="
             f"{tuple(s.num_heads)} need 4 stages of >= 1 block.")
    _require(all(heads >= 1 and (s.embed_dim * 2**i) % heads == 0
                 for i, heads in enumerate(s.num_heads)),
             f"model.swin.num_heads={tuple(s.num_heads)} must divide each "
             f"stage's width (embed_dim={s.embed_dim} x 1, 2, 4, 8).")
    _require(s.window >= 1 and s.patch_size >= 1 and s.mlp_ratio > 0,
             "model.swin.window and model.swin.patch_size must be >= 1 and "
             "model.swin.mlp_ratio > 0.")
  o = config.optimizer
  _require(o.get("name", "lars") in OPTIMIZERS,
           f"optimizer.name={o.get('name')!r}; choose one of {OPTIMIZERS}.")
  _require(o.get("clip_norm", 0.0) >= 0,
           "optimizer.clip_norm must be >= 0 (0 = no clipping).")
  if o.get("name", "lars") in ("adamw", "adam"):
    _require(0 <= o.adam_b1 < 1 and 0 <= o.adam_b2 < 1,
             "optimizer.adam_b1 and optimizer.adam_b2 must be in [0, 1).")


def _validate_hiergroup(config) -> None:
  """loss.name='hiergroup' (hierarchical grouping, configs/hiergroup.py)."""
  h = config.get("hiergroup")
  _require(h is not None, "loss.name='hiergroup' needs the config.hiergroup "
           "section: start from configs/hiergroup.py.")
  _require(config.masks.method == "hierarchy",
           "loss.name='hiergroup' samples pixels by region-tree distance: "
           "set masks.method='hierarchy'.")
  _require(not config.ema.enabled, "loss.name='hiergroup' has no target "
           "network: set ema.enabled=False.")
  _require(not (config.odin.enabled or config.r2o.enabled or
                config.loss.negatives == "device"),
           "loss.name='hiergroup' works on the data's region trees: turn off "
           "odin.enabled and r2o.enabled, and use loss.negatives='global'.")
  _require(config.model.get("backbone", "resnet") == "resnet",
           "loss.name='hiergroup' uses the ResNet hypercolumn head: set "
           "model.backbone='resnet'.")
  _require(h.num_regions >= 1 and h.num_positives >= 1 and
           h.num_negatives >= 0 and h.cross_image_negatives >= 0,
           "hiergroup.num_regions and num_positives must be >= 1, "
           "num_negatives and cross_image_negatives >= 0.")
  _require(h.sigma_p > 0, "hiergroup.sigma_p must be > 0 (paper: 0.8).")
  _require(h.get("objective", "log_likelihood") in HIERGROUP_OBJECTIVES,
           f"hiergroup.objective={h.get('objective')!r}; choose one of "
           f"{HIERGROUP_OBJECTIVES} ('paper': eq. 1's Σ p at T = 1).")
  _require(set(h.stages) <= {"stage1", "stage2", "stage3", "stage4"},
           f"hiergroup.stages={tuple(h.stages)}; use ResNet stages "
           "('stage2', 'stage3' = res3, res4 in the paper).")


def _validate_augment(a) -> None:
  """augment.*: probabilities in [0, 1], per-view pairs, sane jitter ranges."""
  for name in ("flip_prob", "color_jitter_prob", "grayscale_prob"):
    _require(0.0 <= a[name] <= 1.0,
             f"augment.{name}={a[name]} must be a probability in [0, 1].")
  for name in ("blur_prob", "solarize_prob"):
    v = a[name]
    _require(isinstance(v, (tuple, list)) and len(v) == 2 and
             all(0.0 <= p <= 1.0 for p in v),
             f"augment.{name}={v!r} must be a pair of probabilities "
             "(view 1, view 2), e.g. (1.0, 0.1).")
  for name in ("brightness", "contrast", "saturation"):
    _require(a[name] >= 0.0, f"augment.{name}={a[name]} must be >= 0 (the "
             "jitter range; 0 turns the op off).")
  _require(0.0 <= a.hue <= 0.5, f"augment.hue={a.hue} must be in [0, 0.5] "
           "(a shift of the hue circle, whose period is 1).")
  _require(0.0 < a.blur_sigma_min <= a.blur_sigma_max,
           f"augment.blur_sigma_min={a.blur_sigma_min} and blur_sigma_max="
           f"{a.blur_sigma_max} must satisfy 0 < min <= max (pixels).")


# export/weights_in.FILE_SUFFIXES (tests/test_weights_in.py checks it).
INIT_FROM_SUFFIXES = (".pth", ".pt", ".bin", ".safetensors", ".npz")


def _validate_init_from(path) -> None:
  """init_from: '' or a checkpoint file / workdir that exists (URLs are
  checked when read)."""
  import os
  _require(isinstance(path, str), f"init_from={path!r} must be a path.")
  if not path or "://" in path:
    return
  _require(os.path.exists(path), f"init_from={path}: no such file or "
           "directory (a torchvision / timm checkpoint, odin_jax's "
           "backbone.npz or a run's workdir).")
  _require(os.path.isdir(path) or
           path.lower().endswith(INIT_FROM_SUFFIXES),
           f"init_from={path}: unknown checkpoint type; give one of "
           f"{INIT_FROM_SUFFIXES} or a workdir.")
