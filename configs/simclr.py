"""SimCLR: DetCon-S's step with one global mask and NT-Xent (τ = 0.1)."""
from configs import common


def get_config(arg=None):
  c = common.base_config("simclr")
  common.global_masks(c)
  c.model.predictor_hidden = 0
  c.ema.enabled = False
  c.loss.name = "simclr"
  c.optimizer.base_learning_rate = 0.3
  c.optimizer.weight_decay = 1e-6
  return common.apply_preset(c, arg)
