"""Odin: object discovery and representation networks (Hénaff et al. 2022).

DetCon-B's step, but the masks are discovered: a discovery network τ (the
same ResNet + FPN + projector, its own parameters) embeds the un-augmented
spanning view at twice the view resolution, k-means (K=16) segments each
image's L2-normalised per-pixel projections, and the segments are cropped,
flipped and resized into both views. τ follows θ continuously (λ_τ = 1e-3)
or by copies every `odin.copy_every_epochs` (`--config.odin.tau_update=copy`).
The hidden map h is the FPN's stride-4 output 'p2'.

  python -m odin_jax.main --config=configs/odin.py --workdir=DIR
  python -m odin_jax.main --config=configs/odin.py:demo --workdir=DIR
  python -m odin_jax.main --config=configs/odin.py:vit_b8 --workdir=DIR
  python -m odin_jax.main --config=configs/odin.py:swin_t --workdir=DIR
"""
import ml_collections

from configs import common


def get_config(arg=None):
  c = common.base_config("odin")
  # Odin's own settings (odin_jax/methods/odin.py checks them).
  d = c.odin = ml_collections.ConfigDict()
  d.span_scale = 2.0             # spanning view side / view side (448/224)
  d.num_clusters = 16            # K (Odin Table 6)
  d.kmeans_iters = 10            # Lloyd iterations after k-means++ seeding
  d.tau_update = "ema"           # 'ema': τ ← τ + λ_τ(θ - τ) every step;
  d.ema_rate = 1e-3              #   'copy': τ ← θ every copy_every_epochs
  d.copy_every_epochs = 100.0
  d.cached = False               # with 'copy': masks refreshed once per copy
                                 #   period over the dataset and read as
                                 #   records (methods/odin_cache.py)
  c.mask_pictures_every_steps = 200   # TensorBoard 'discovery/masks'
  c.model.fpn_channels = 256
  c.model.feature_stage = "p2"
  # The data's masks are not used (Odin discovers its own); a 1x1 grid costs
  # nothing to compute.
  c.masks.method = "grid"
  c.masks.grid_size = 1
  c = common.apply_preset(c, arg)
  if c.model.backbone == "vit":
    # Odin App. A.1: the spanning view is 224 px for ViTs (448 otherwise);
    # k-means runs on the token grid's projections (no FPN).
    c.odin.span_scale = 1.0
    if c.dataset.name != "demo":
      c.num_epochs = 100           # Odin §4.2: ViT-B/8 for 100 epochs
  if c.dataset.name != "demo":
    # The paper's batch 4096 puts 128 images on each v4-64 chip. In float32
    # Odin's step (θ, ξ on two 224-px views and τ on the 448-px spanning
    # view) needs ~26 GiB of temporaries at 64 images per chip (issue 17),
    # so twice that cannot fit a 32 GiB chip: compute in bfloat16 and
    # recompute each block's activations in the backward pass
    # (bench/aot_table.py measures the fit).
    c.model.dtype = "bfloat16"
    c.model.remat = "blocks"
  if c.dataset.name == "demo":     # demo / test presets: a small FPN
    if c.model.fpn_channels:
      c.model.fpn_channels = 64 if c.model.width >= 0.5 else 16
    c.mask_pictures_every_steps = 50
    # Periodic evaluation (~1 min a call on 2 CPU cores, nearly all of it
    # the k-means of the FPN's 64x64 grid; it compiles only once) would push
    # the demo past 5 minutes: --config.eval.every_steps=100 turns it on.
    c.eval.every_steps = 0
  return c
