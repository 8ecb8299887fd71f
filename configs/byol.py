"""BYOL: DetCon-B's step with one global mask and the normalised-MSE loss."""
from configs import common


def get_config(arg=None):
  c = common.base_config("byol")
  common.global_masks(c)
  c.loss.name = "byol"
  return common.apply_preset(c, arg)
