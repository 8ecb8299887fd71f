"""DetCon-B: BYOL-style DetCon (online + predictor vs EMA target), FH masks.

  python -m odin_jax.main --config=configs/detcon_b.py --workdir=DIR
  python -m odin_jax.main --config=configs/detcon_b.py:demo --workdir=DIR
  python -m odin_jax.main --config=configs/detcon_b.py:vit_b16 --workdir=DIR
  python -m odin_jax.main --config=configs/detcon_b.py:vit_demo --workdir=DIR
"""
from configs import common


def get_config(arg=None):
  c = common.base_config("detcon_b")
  return common.apply_preset(c, arg)
