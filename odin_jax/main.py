"""Entry point: python -m odin_jax.main --config=configs/detcon_b.py --workdir=DIR

Everything but the config file and the workdir is a config field, e.g.
  --config=configs/detcon_b.py:demo --config.batch_size=64
"""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Config file, optionally with a preset: "
    "configs/detcon_b.py:demo", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None,
                               "Checkpoints, TensorBoard events, metrics.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  # Imported here so --help is fast and TF/JAX start after flag parsing.
  from odin_jax import runtime, train
  runtime.setup()
  logging.info("Config:\n%s", _CONFIG.value)
  train.train_and_evaluate(_CONFIG.value, _WORKDIR.value)


if __name__ == "__main__":
  app.run(main)
