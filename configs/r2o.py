"""R2O: region-to-object representation learning (Gokul et al. 2022).

BYOL's step with masks predicted on the fly: SLIC superpixels (the region
prior) are pooled on the target network's C4 features of the spanning view,
k-means over the regions of each group of images (R2O clusters each GPU's
mini-batch) gives K clusters, every C4 cell takes its nearest centre, and
the resulting mask is mapped into both views. K follows the region-to-object
curriculum K(e) = 4 + 124 cos(π/2 · e/E). The loss is BYOL's normalised MSE
per mask (mask-pooled C5), weighted by presence in both views.

  python -m odin_jax.main --config=configs/r2o.py --workdir=DIR
  python -m odin_jax.main --config=configs/r2o.py:demo --workdir=DIR
"""
from configs import common


def get_config(arg=None):
  c = common.base_config("r2o")
  c.r2o.enabled = True
  c.loss.name = "mask_byol"
  c.optimizer.base_learning_rate = 0.3      # R2O App. A (BYOL's 0.3 × B/256)
  c.warmup_epochs = 0.01 * c.num_epochs     # 1 % of training (R2O §4)
  c.masks.method = "slic"                   # the region prior
  c.masks.slic_n_segments = 100
  c.odin.span_scale = 1.0   # regions from the spanning view at view size
  c = common.apply_preset(c, arg)
  if c.dataset.name == "demo":              # demo / test presets
    c.odin.span_scale = 2.0                 # C4 of 96 px is only 6x6
    c.masks.slic_n_segments = 64
    c.r2o.group_size = c.batch_size // 2
    c.eval.every_steps = 0   # as in odin.py's demo: keep it within minutes
  return c
