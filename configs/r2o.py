"""R2O: region-to-object representation learning (Gokul et al. 2022).

BYOL's step with masks predicted on the fly: SLIC superpixels (the region
prior) are pooled on the target network's C4 features of the whole
un-augmented image (r2o.cluster_view 'image', at image_size), k-means over
the regions of each group of images (R2O clusters each GPU's mini-batch)
gives K clusters, every C4 cell takes its nearest centre, and the resulting
mask is mapped into both views. K follows the region-to-object curriculum
K(e) = 4 + 124 cos(π/2 · e/E). The loss is BYOL's normalised MSE per mask
(mask-pooled C5) over all K masks (not 16 sampled ones), weighted by
presence in both views.

  python -m odin_jax.main --config=configs/r2o.py --workdir=DIR
  python -m odin_jax.main --config=configs/r2o.py:demo --workdir=DIR
"""
import ml_collections

from configs import common


def get_config(arg=None):
  c = common.base_config("r2o")
  # R2O's own settings (odin_jax/methods/r2o.py checks them): k-means over
  # region (superpixel) features of the target network, with K following
  # the region-to-object curriculum.
  r = c.r2o = ml_collections.ConfigDict()
  r.k_start = 128                # K(e) = k_end + (k_start - k_end)
  r.k_end = 4                    #        * cos(pi/2 * e / E)
  r.region_stage = "stage3"      # C4 features of the clustered view
  r.group_size = 32              # images clustered jointly (per-device batch)
  r.kmeans_iters = 10
  # What k-means segments: 'image' = the whole un-augmented image squashed
  # to r2o.span_scale x image_size (R2O's raw view, do_kmeans(raw_image));
  # 'spanning' = Odin's spanning view of the two crops.
  r.cluster_view = "image"
  r.span_scale = 1.0             # clustered view side / view side (R2O: 224
                                 #   for 224-px views)
  c.mask_pictures_every_steps = 200   # TensorBoard 'discovery/masks'
  c.loss.name = "mask_byol"
  # R2O's recipe, checked in the paper (papers/r2o_region_to_object.txt,
  # §4 "Optimization", App. A.1 "Pretraining Details"; our text copy lost
  # the inline numbers of the EMA and weight decay) and in the official
  # code (KKallidromitis/r2o, config/train_imagenet_300.yaml):
  #   optimizer.total_epochs: 300 (paper: "pretraining which lasts for 300
  #     epochs"); optimizer.warmup_epochs: 3 (paper: "one percent of the
  #     total pretraining time, e.g. 300 epochs ... 3 warmup epochs");
  #   model.base_momentum: 0.99 (the EMA's start, cosine-increased to 1 in
  #     trainer/r2o_trainer.py adjust_mm); optimizer.weight_decay: 1.0e-6;
  #   optimizer.base_lr: 0.3 (x global batch / 256); global batch 4096
  #     (data.train_batch_size: 32 per GPU x 128 GPUs);
  #   data.resize_size: 224 and data/r2o_transform.py's third 'raw' view:
  #     the whole image (box 0, 0, H, W), resized to 224 x 224, no flip,
  #     no colour; model/r2o_model.py do_kmeans(raw_image, slic_mask) runs
  #     the target C4 on it, and all K cluster masks (to_binary_mask(.,
  #     n_kmeans)) are roi-aligned into both views and enter the loss,
  #     weighted by presence in both (trainer's mask_exists).
  c.num_epochs = 300
  c.warmup_fraction = 0.01    # 1 % of the run, derived at run start (3 of
                              #   300 epochs; follows --config.num_epochs)
  c.ema.base_decay = 0.99
  c.optimizer.weight_decay = 1e-6
  c.optimizer.base_learning_rate = 0.3      # R2O App. A (BYOL's 0.3 × B/256)
  c.masks.method = "slic"                   # the region prior
  c.masks.slic_n_segments = 100
  c.loss.mask_sampling = "all"   # every cluster present in a view is a row
  c.num_masks = c.r2o.k_start    #   (K <= k_start; raise both together)
  c = common.apply_preset(c, arg)
  if c.dataset.name == "demo":              # demo / test presets
    c.warmup_fraction = 0.0   # keep the presets' warmup_epochs (1 epoch):
                              #   1 % of 4 or 200 steps is 0 or 2 steps
    c.r2o.span_scale = 2.0                  # C4 of 96 px is only 6x6
    c.masks.slic_n_segments = 64
    c.r2o.group_size = c.batch_size // 2
    c.eval.every_steps = 0   # as in odin.py's demo: keep it within minutes
  return c
