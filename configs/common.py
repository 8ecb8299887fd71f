"""Defaults shared by every method; method files override only what differs.

`get_config(arg)` in a method file calls `base_config(method)` and then
`apply_preset(config, arg)`. Presets (the part after ':' in --config):
  imagenet (default) the papers' ImageNet settings: ResNet-50, 224 px,
                     batch 4096, 1000 epochs, FH scale 1000, 16 masks.
  coco               COCO pretraining: FH scales 500/1000/1500 (one here:
                     1000, min size = scale).
  demo               the embedded demo scenes, a small ResNet-18, 96 px;
                     minutes on 2 CPU cores.
  test               tiny everything, for the test suite (seconds).
Backbone presets put a transformer in place of the ResNet, alone (the
paper's settings) or before one of the above (`vit_b16_coco`, `vit_demo`):
  vit_s16, vit_b16, vit_b8   ViT, AdamW (Odin App. A.3), 300 epochs
  swin_t, swin_s             Swin, LARS + gradient clipping at norm 1
  vit_demo, swin_demo, ...   'vit' / 'swin' name the family; at demo / test
                             scale every size becomes the family's tiny net.
Every field can be overridden on the command line: --config.batch_size=64.
"""

import ml_collections

from odin_jax.evaluate import settings as eval_settings

PRESETS = ("imagenet", "coco", "demo", "test")
BACKBONE_PRESETS = ("vit_s16", "vit_b16", "vit_b8", "swin_t", "swin_s")


def base_config(method: str) -> ml_collections.ConfigDict:
  """The paper (ImageNet) settings common to all methods."""
  c = ml_collections.ConfigDict()
  c.method = method
  c.seed = 0

  # Schedule. total_steps > 0 overrides num_epochs.
  c.batch_size = 4096            # global, over all devices and hosts
  c.num_epochs = 1000
  c.total_steps = 0
  c.warmup_epochs = 10.0
  c.warmup_fraction = 0.0        # > 0: warm-up = this fraction of all steps,
                                 #   derived at run start (R2O: 0.01); it
                                 #   then replaces warmup_epochs
  c.grad_accum_steps = 1         # >1 splits the batch into micro-batches
  c.log_every_steps = 100
  c.checkpoint_every_steps = 5000
  # Training health (odin_jax/health.py): collapse statistics of the
  # projections, logged as health/*, and a one-time WARNING when, for
  # `patience` consecutive logs, health/projection_std < std_fraction /
  # sqrt(model.projector_dim) or health/rankme < min_rankme.
  hl = c.health = ml_collections.ConfigDict()
  hl.enabled = True              # compute health/* inside the train step
  hl.std_fraction = 0.1          # of the healthy 1/sqrt(D)
  hl.min_rankme = 1.5            # RankMe ~1: one direction for all inputs
  hl.patience = 3                # consecutive logs before warning
  # TensorBoard masks pictures, at the first step and every this many
  # steps; 0 = off. Data masks (DetCon, BYOL, SimCLR, cached Odin):
  # 'masks/sampled', view | masks | the sampled masks; discovered masks
  # (Odin, R2O): 'discovery/masks', span | segments | both views' masks.
  c.mask_pictures_every_steps = 5000
  c.max_to_keep = 3
  # Resume from this checkpoint step. None: the newest readable one (an
  # unreadable newer one is kept as checkpoints/<step>.unreadable); a step:
  # exactly it (newer ones kept as <step>.superseded; set it for one launch
  # only, a relaunch with it goes back again). See checkpoint.py.
  c.restore_step = ml_collections.FieldReference(None, field_type=int)
  # Start θ (and ξ, τ) from these backbone weights, fresh runs only (a
  # workdir's own checkpoint wins): a torchvision / timm .pth,
  # .safetensors or .npz, odin_jax's backbone.npz, or another run's workdir
  # (odin_jax/export/weights_in.py). '': the random initialisation.
  c.init_from = ""
  # None: block on every step's metrics only on CPU (XLA:CPU collectives
  # deadlock otherwise); True/False forces it.
  c.block_every_step = ml_collections.FieldReference(None, field_type=bool)

  c.image_size = 224
  c.num_masks = 16               # mask ids sampled per view

  c.dataset = ml_collections.ConfigDict()
  c.dataset.name = "imagenet2012"  # 'demo', 'folder' or a TFDS name
  c.dataset.split = "train"
  c.dataset.data_dir = ml_collections.FieldReference(None, field_type=str)
  c.dataset.folder = ml_collections.FieldReference(None, field_type=str)
  c.dataset.cache_dir = ml_collections.FieldReference(None, field_type=str)
  # Precomputed images + masks (python -m odin_jax.data.precompute); when
  # set, training reads them instead of computing masks on the fly.
  c.dataset.records_dir = ml_collections.FieldReference(None, field_type=str)
  # How hosts split the data (data/pipeline.py): 'examples' (any source; host
  # h reads its slice of every global batch from all files) | 'shards' (host
  # h reads only the shard files s % P == h of records / TFDS ArrayRecord).
  c.dataset.host_split = "examples"
  # tf.data: examples decoded + augmented in parallel, batches prefetched
  # (-1 = AUTOTUNE), threads of the input pipeline (0 = TF's default pool).
  # There is no shuffle buffer: the order is an exact per-epoch permutation
  # (index_shuffle over random access), a pure function of (seed, position).
  c.dataset.num_parallel_calls = -1
  c.dataset.prefetch_batches = -1
  c.dataset.private_threads = 0
  # An example whose image or mask fails to load is skipped (a deterministic
  # substitute stands in, train/skipped_examples counts it); the run stops
  # when more than this fraction of the examples read fail (data/pipeline.py).
  c.dataset.max_bad_fraction = 0.05
  c.dataset.demo_num_scenes = 256
  c.dataset.demo_image_size = 128

  c.masks = ml_collections.ConfigDict()
  c.masks.method = "fh"          # 'fh' | 'slic' | 'grid' | 'gt' | 'hierarchy'
                                 # | 'fh_opencv' (OpenCV's FH, same fields)
  c.masks.fh_scale = 1000.0
  c.masks.fh_sigma = 0.8
  c.masks.fh_min_size = 1000
  c.masks.fh_scales = ()         # several FH scales in the records (min size
                                 # = scale): one is picked per example
  c.masks.slic_n_segments = 64
  c.masks.slic_compactness = 10.0
  c.masks.grid_size = 5
  # 'hierarchy': leaves of a region tree + its distances (data/hierarchy.py)
  c.masks.hier_max_leaves = 40   # leaves (paper: at most 40)
  c.masks.hier_superpixels = 400  # watershed markers before merging
  c.masks.hier_compactness = 0.0  # > 0: compact watershed
  c.masks.hier_sigma = 1.0       # smoothing of the colour-gradient edge map
  c.masks.hier_min_leaf_area = 0.005  # fraction of the image

  # BYOL's asymmetric recipe (DetCon-B, BYOL, Odin A.1, R2O); DetCon-S and
  # SimCLR replace it with SimCLR's (simclr_augmentation below). Ops and
  # order: odin_jax/data/augment.py.
  a = c.augment = ml_collections.ConfigDict()
  a.crop_area_min, a.crop_area_max = 0.08, 1.0
  a.aspect_min, a.aspect_max = 3 / 4, 4 / 3
  a.flip_prob = 0.5
  # Jitter ranges: brightness adds delta ~ U[-b, b] (BYOL / SimCLR v1, not a
  # factor); contrast, saturation multiply by U[1 - x, 1 + x]; hue shifts
  # by U[-h, h] (h <= 0.5).
  a.brightness, a.contrast, a.saturation, a.hue = 0.4, 0.4, 0.2, 0.1
  a.color_jitter_prob = 0.8
  a.grayscale_prob = 0.2
  a.blur_prob = (1.0, 0.1)       # view 1, view 2; zero-padded, ~S/10 kernel
  a.blur_sigma_min, a.blur_sigma_max = 0.1, 2.0
  a.solarize_prob = (0.0, 0.2)   # view 1, view 2; threshold 0.5

  m = c.model = ml_collections.ConfigDict()
  m.depth = 50
  m.width = 1.0
  m.projector_hidden = 4096
  m.projector_dim = 256
  m.predictor_hidden = 4096      # 0: no predictor (DetCon-S, SimCLR)
  m.feature_stage = "stage4"     # or 'p2' (FPN, stride 4; needs fpn_channels)
  m.fpn_channels = 0             # > 0 adds an FPN on stages 1-4 (Odin)
  m.zero_init_residual = False
  # ResNet output stride: 32 (standard), 16 / 8 dilate stage4 / stages 3-4
  # (same parameters; DetCon pools a finer map: 6x6 instead of 3x3 at 96 px)
  m.output_stride = 32
  m.dtype = "float32"

  c.loss = ml_collections.ConfigDict()
  c.loss.name = "contrastive_detection"   # | 'byol' | 'simclr'
  c.loss.temperature = 0.1
  # Where the negatives come from: 'global' every image of the global batch
  # (DetCon, DeepMind's cross-replica loss) | 'device' only this device's
  # images (DetCon Table 5 ablation).
  c.loss.negatives = "global"
  # Which mask ids each view's rows pool (odin_jax/objects.py):
  # 'per_view' num_masks draws per view, each view its own key, uniform over
  #   the masks present in that view (DetCon paper §3.1, DeepMind's code)
  # 'shared' the same draws for both views, among ids visible in both
  # 'all' every id present, padded to num_masks rows (R2O's all K masks)
  c.loss.mask_sampling = "per_view"
  # Renamed: DeepMind's `local_negatives` means "negatives from the same
  # image", ours meant "from this device". Kept only so that setting it
  # fails with a message naming loss.negatives (config_check).
  c.loss.local_negatives = ml_collections.FieldReference(None,
                                                         field_type=bool)

  o = c.optimizer = ml_collections.ConfigDict()
  o.base_learning_rate = 0.2     # × batch_size / 256
  o.weight_decay = 1.5e-6
  o.momentum = 0.9
  o.trust_coefficient = 1e-3

  # Backbone family and the optimiser that goes with it (docs/transformers.md;
  # the presets vit_s16 / vit_b16 / vit_b8 / swin_t / swin_s set them).
  m.backbone = "resnet"          # 'resnet' | 'vit' | 'swin'
  vt = m.vit = ml_collections.ConfigDict()   # with feature_stage 'tokens'
  vt.patch_size, vt.depth, vt.width, vt.num_heads = 16, 12, 768, 12
  vt.mlp_ratio = 4.0
  vt.pos_size = 0                # input side the position embeddings are
                                 #   learnt at (0: image_size); resampled else
  vt.cls_token = True
  sw = m.swin = ml_collections.ConfigDict()  # stages 'stage1'..'stage4'
  sw.embed_dim, sw.depths, sw.num_heads = 96, (2, 2, 6, 2), (3, 6, 12, 24)
  sw.window, sw.patch_size, sw.mlp_ratio = 7, 4, 4.0
  o.name = "lars"                # | 'adamw' (ViT: Odin App. A.3) | 'adam'
  o.adam_b1, o.adam_b2 = 0.9, 0.95
  o.clip_norm = 0.0              # > 0: clip gradients to this global norm
  o.schedule = "cosine"          # | 'piecewise': lr × decay_factor at each
  o.decay_at = ()                #   fraction in decay_at of all steps (a
  o.decay_factor = 0.1           #   warm-up, if any, still comes first)

  c.ema = ml_collections.ConfigDict()
  c.ema.enabled = True           # target network ξ = EMA of θ
  c.ema.base_decay = 0.996       # cosine-increased to 1

  # A method's own settings are a section that only its config has
  # (config.odin in configs/odin.py, config.r2o in configs/r2o.py,
  # config.hiergroup in configs/hiergroup.py); its module in
  # odin_jax/methods/ checks them.

  # Evaluation (python -m odin_jax.evaluate, and every eval.every_steps
  # during training). Every field and its default lives in
  # odin_jax/evaluate/settings.py (EvalSettings, documented there); the
  # presets below only override fields.
  c.eval = eval_settings.config_section()

  # Scale: precision, memory, profiling (docs/scale.md). The compute dtype
  # is model.dtype above ('bfloat16' on TPU/GPU; parameters, BatchNorm
  # statistics and the loss stay float32 whatever it is).
  m.remat = "none"               # 'blocks' | 'stages': recompute the ResNet's
                                 #   activations in the backward pass
  sh = c.sharding = ml_collections.ConfigDict()
  sh.fsdp = False                # split θ, ξ, τ and optimizer state over
                                 #   'data' (all-gathered in the step)
  sh.fsdp_min_size = 2**16       # arrays with fewer elements stay replicated
  p = c.profile = ml_collections.ConfigDict()
  p.start_step = 10              # trace train steps [start, start + num_steps)
  p.num_steps = 0                #   into workdir/profile; 0 = off
  p.all_processes = True         # every host writes its trace (False: host 0)
  return c


def simclr_augmentation(c: ml_collections.ConfigDict) -> None:
  """SimCLR v1's symmetric colour recipe, for DetCon-S and SimCLR.

  DetCon S3.1, "Data augmentation": DetCon-S "adopt[s] the augmentation
  pipelines of SimCLR". SimCLR v1 (ImageNet): jitter of strength s = 1, i.e.
  (0.8s, 0.8s, 0.8s, 0.2s), with p 0.8, grayscale 0.2, blur 0.5 in BOTH
  views, no solarisation. Its crop, flip and blur sigma range are the
  defaults above (BYOL took them from SimCLR).
  """
  a = c.augment
  a.brightness, a.contrast, a.saturation, a.hue = 0.8, 0.8, 0.8, 0.2
  a.color_jitter_prob = 0.8
  a.grayscale_prob = 0.2
  a.blur_prob = (0.5, 0.5)
  a.solarize_prob = (0.0, 0.0)


def global_masks(c: ml_collections.ConfigDict) -> None:
  """BYOL/SimCLR: one global mask per view (a 1x1 grid), one latent."""
  c.masks.method = "grid"
  c.masks.grid_size = 1
  c.num_masks = 1


def apply_preset(c: ml_collections.ConfigDict, arg) -> ml_collections.ConfigDict:
  """Applies a named preset (see module docstring) in place."""
  backbone, preset = split_backbone_preset(arg)
  if preset not in PRESETS:
    raise ValueError(f"Unknown preset {arg!r} for {c.method}; choose one "
                     f"of {PRESETS} (e.g. --config=configs/{c.method}.py:demo),"
                     f" optionally after a backbone: {BACKBONE_PRESETS} or "
                     "'vit' / 'swin' (e.g. vit_b16, swin_t_coco, vit_demo).")
  if backbone:
    use_backbone(c, backbone, preset)
  if preset == "coco":
    c.dataset.name = "coco/2017"
    c.masks.fh_scale, c.masks.fh_min_size = 1000.0, 1000
    c.masks.fh_scales = (500.0, 1000.0, 1500.0)   # DetCon on COCO
  elif preset in ("demo", "test"):
    c.dataset.name = "demo"
    # Small images need small FH regions, whatever the method trains on:
    # the evaluation's FH baseline (masks:fh) reads these fields too.
    c.masks.fh_scale, c.masks.fh_min_size = 200.0, 100
    c.model.depth = 18
    c.model.projector_hidden = 512
    c.model.projector_dim = 128
    c.warmup_epochs = 1
    c.log_every_steps = 10
    c.ema.base_decay = 0.99
    # Evaluation at 256 px, x2 the 128-px demo scenes: App. A.4 resizes
    # COCO's ~480-px central crops x2.1 to 1024, and x2 stays inside the
    # scale range the demo views train at (x0.75-x2.7 of a scene). stage4
    # then gives 8x8 cells (2-4 across a demo object; K <= 64), an FPN's p2
    # 64x64. At 512 px (16x16) or 1024 px (32x32) the demo-trained DetCon-B
    # does not beat its random init either (docs/evaluation.md,
    # "Resolution"), and they cost 4-16x on CPU (an FPN's k-means most).
    c.eval.image_size = 256
    if preset == "demo":
      # stage4 at 256 px is an 8x8 grid, too coarse for any k-means cluster
      # to match a 30-65 px demo object at IoU > 0.5 (docs/evaluation.md,
      # "Resolution"): the demo clusters stage3 (16x16) instead.
      c.eval.resnet_feature = "stage3"
      c.image_size = 96
      c.model.width = 0.5
      c.batch_size = 16
      # LARS steps each layer by lr * 1e-3 * |w|: the paper's 0.2 x B/256
      # (0.0125 at B=16) barely moves the weights in 200 steps. lr 3.0 (the
      # paper's value at B=4096 is 3.2) makes the loss fall visibly here.
      c.optimizer.base_learning_rate = 3.0 * 256 / c.batch_size
      c.total_steps = 200
      c.checkpoint_every_steps = 100
      c.mask_pictures_every_steps = 100
      c.eval.every_steps = 100
      c.eval.final_report = True   # θ vs random init vs FH masks at the end
      c.dataset.demo_num_scenes = 256
      # imagenet_linear on a small TFDS dataset (--set=linear_dataset=NAME):
      # the demo's view size, a few epochs.
      c.eval.linear_image_size, c.eval.linear_batch_size = 96, 32
      c.eval.linear_epochs = 10
    else:
      c.image_size = 80
      c.model.width = 0.125
      c.batch_size = 8
      c.total_steps = 4
      c.log_every_steps = 2
      c.checkpoint_every_steps = 2
      c.dataset.demo_num_scenes = 16
      c.dataset.demo_image_size = 96
      c.model.projector_hidden = 32
      c.model.projector_dim = 16
      c.eval.num_images, c.eval.batch_size = 4, 4
      c.eval.discovery_ks = (1, 2, 4)
      c.eval.video_clips, c.eval.video_frames = 1, 4
      c.eval.probe_train_images, c.eval.probe_test_images = 6, 4
      c.eval.probe_steps = 20
      c.eval.linear_image_size, c.eval.linear_batch_size = 64, 8
      c.eval.linear_epochs = 3
    if c.model.predictor_hidden:
      c.model.predictor_hidden = c.model.projector_hidden
    if backbone:
      small_backbone(c, preset)
  return c


# --- Transformer backbones (docs/transformers.md) -------------------------

# name -> (patch_size, depth, width, num_heads), as odin_jax/models/vit.py.
_VIT_SIZES = {"vit_s16": (16, 12, 384, 6), "vit_b16": (16, 12, 768, 12),
              "vit_b8": (8, 12, 768, 12)}
# name -> (embed_dim, depths, num_heads), as odin_jax/models/swin.py.
_SWIN_SIZES = {"swin_t": (96, (2, 2, 6, 2), (3, 6, 12, 24)),
               "swin_s": (96, (2, 2, 18, 2), (3, 6, 12, 24))}
_FAMILIES = {"vit": "vit_b16", "swin": "swin_t"}


def split_backbone_preset(arg) -> tuple:
  """'swin_t_coco' -> ('swin_t', 'coco'), 'vit_demo' -> ('vit_b16', 'demo'),
  'vit_b8' -> ('vit_b8', 'imagenet'), 'demo' -> (None, 'demo'),
  None -> (None, 'imagenet'). The second part is not validated here."""
  arg = arg or "imagenet"
  for name in sorted((*BACKBONE_PRESETS, *_FAMILIES), key=len, reverse=True):
    if arg == name or arg.startswith(name + "_"):
      return _FAMILIES.get(name, name), arg[len(name) + 1:] or "imagenet"
  return None, arg


def use_backbone(c: ml_collections.ConfigDict, name: str, preset: str) -> None:
  """Puts the named transformer in place of the ResNet, with its optimiser."""
  m, o = c.model, c.optimizer
  if name in _VIT_SIZES:
    m.backbone = "vit"
    m.vit.patch_size, m.vit.depth, m.vit.width, m.vit.num_heads = (
        _VIT_SIZES[name])
    m.feature_stage = "tokens"   # the patch-token grid is the hidden map h
    m.fpn_channels = 0           # one map: no pyramid (Odin App. A.1)
    if "r2o" in c:
      c.r2o.region_stage = "tokens"
    # Odin App. A.3: Adam, lr 3e-4 at batch 2048, weight decay 0.1,
    # β = (0.9, 0.95), 300 epochs. Decoupled decay (AdamW); the lr scales
    # with batch / 256 like every lr here, so it is 3e-4 at 2048.
    o.name = "adamw"
    c.batch_size = 2048
    o.base_learning_rate = 3e-4 * 256 / 2048
    o.weight_decay = 0.1
    o.adam_b1, o.adam_b2 = 0.9, 0.95
    c.num_epochs = 300
    if preset not in ("demo", "test"):
      c.eval.image_size = 448    # Odin App. A.4 (B/8: a 56x56 token grid)
  elif name in _SWIN_SIZES:
    m.backbone = "swin"
    m.swin.embed_dim, m.swin.depths, m.swin.num_heads = _SWIN_SIZES[name]
    o.clip_norm = 1.0            # Odin App. A.3: LARS + clipping at norm 1
  else:
    raise ValueError(f"Unknown backbone preset {name!r}; choose one of "
                     f"{BACKBONE_PRESETS}.")


def small_backbone(c: ml_collections.ConfigDict, preset: str) -> None:
  """The family's tiny network at demo / test scale (cf. ResNet-18 x0.5)."""
  m, o = c.model, c.optimizer
  demo = preset == "demo"
  if m.backbone == "vit":
    # Patch 8: 12x12 tokens at 96 px, 10x10 at 80 px. Demo: 4 blocks of
    # width 128 (~1.6x the FLOPs of the ResNet-18 x0.5 demo at 96 px).
    m.vit.patch_size, m.vit.depth, m.vit.width, m.vit.num_heads = (
        (8, 4, 128, 4) if demo else (8, 2, 32, 2))
    # AdamW at a peak lr of 1e-3 (the paper's 3e-4 is for batch 2048).
    o.base_learning_rate = 1e-3 * 256 / c.batch_size
  elif m.backbone == "swin":
    m.swin.embed_dim, m.swin.depths, m.swin.num_heads = (
        (32, (2, 2, 2, 2), (1, 2, 4, 8)) if demo else
        # test: one W-MSA + SW-MSA pair (on a padded 20x20 map at 80 px),
        # then one block per stage: transformer blocks are slow to compile.
        (16, (2, 1, 1, 1), (1, 1, 2, 2)))
