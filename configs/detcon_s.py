"""DetCon-S: SimCLR-style DetCon — one network, projector, no predictor, no
EMA; the online projections of both views are the targets. SimCLR's
optimisation (LARS, lr 0.3 × batch/256, weight decay 1e-6)."""
from configs import common


def get_config(arg=None):
  c = common.base_config("detcon_s")
  c.model.predictor_hidden = 0
  c.ema.enabled = False
  c.optimizer.base_learning_rate = 0.3
  c.optimizer.weight_decay = 1e-6
  return common.apply_preset(c, arg)
