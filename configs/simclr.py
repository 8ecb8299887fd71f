"""SimCLR: DetCon-S's step with one global mask and NT-Xent (τ = 0.1); the
same SimCLR v1 framework (augmentation, head, optimisation) as DetCon-S."""
from configs import common, detcon_s


def get_config(arg=None):
  c = common.base_config("simclr")
  common.global_masks(c)
  detcon_s.simclr_framework(c)
  c.loss.name = "simclr"
  return common.apply_preset(c, arg)
