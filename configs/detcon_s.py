"""DetCon-S: SimCLR-style DetCon — one network, projector, no predictor, no
EMA; the online projections of both views are the targets. SimCLR v1's
framework (DetCon S3.1): its symmetric augmentation, its 2048 -> 128
projection head and its optimisation (LARS, lr 0.3 × batch/256, weight decay
1e-6)."""
from configs import common


def simclr_framework(c) -> None:
  """What DetCon-S and SimCLR take from SimCLR v1, in place on config c."""
  common.simclr_augmentation(c)
  # SimCLR v1's head: one hidden layer as wide as the ResNet-50 output (2048),
  # 128-d output. DetCon S3.1, "Computational cost": the SimCLR / DetCon-S
  # "projection head requires an additional 4M FLOPS" = 2048 x 2048 +
  # 2048 x 128 (4.5M multiply-adds; BYOL's 4096 / 256 head would be 9.4M).
  # The demo / test presets shrink it like every other head.
  c.model.projector_hidden = 2048
  c.model.projector_dim = 128
  c.model.predictor_hidden = 0
  c.ema.enabled = False
  c.optimizer.base_learning_rate = 0.3
  c.optimizer.weight_decay = 1e-6


def get_config(arg=None):
  c = common.base_config("detcon_s")
  simclr_framework(c)
  return common.apply_preset(c, arg)
