"""Entry point: python -m odin_jax.main --config=configs/detcon_b.py --workdir=DIR

Everything but the config file and the workdir is a config field, e.g.
  --config=configs/detcon_b.py:demo --config.batch_size=64

An unknown field or a value config_check refuses stops before JAX or
TensorFlow load, with one line naming the field (exit status 2). A failure
anywhere else exits non-zero promptly with the cause as the last line on
stderr (odin_jax/failure.py; ODIN_JAX_INJECT_FAILURE injects one).
"""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from odin_jax import cli  # noqa: E402  (pure Python: no JAX / TF)

# absl's --help prints this module's docstring: add the methods and presets.
__doc__ += cli.help_epilog()

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Config file, optionally with a preset: "
    "configs/detcon_b.py:demo", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None,
                               "Checkpoints, TensorBoard events, metrics.")
flags.mark_flags_as_required(["config", "workdir"])


def parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing, but a bad command line ends in one stderr line.

  An unknown `--config.<field>` raises deep inside ml_collections (a long
  AttributeError traceback); it is reported as the field's name and the
  nearest valid names. absl's own errors (a missing flag, a bad literal, a
  missing config file or preset) are put on one line too.
  """
  try:
    rest = flags.FLAGS(argv)
  except flags.UnrecognizedFlagError as e:
    cli.fail(_unknown_field(argv) or cli.last_line(e))
  except flags.Error as e:
    cli.fail(cli.last_line(e))   # a config file's traceback: its cause
  except (AttributeError, KeyError) as e:   # ml_collections: unknown field
    cli.fail(_unknown_field(argv) or f"{type(e).__name__}: {e}")
  try:   # config_flags loads the file lazily: a missing one fails here
    _CONFIG.value.keys()
  except OSError as e:
    cli.fail(f"--config={cli.config_spec(argv)}: {cli.last_line(e)}")
  return rest


def _unknown_field(argv: list[str]) -> str | None:
  """The message naming the first unknown `--config.<field>`, if any."""
  spec = cli.config_spec(argv)
  return cli.unknown_field_message(argv, cli.load_config(spec)) if spec \
      else None


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  # Values and combinations, still before JAX / TF load (config_check is
  # pure Python), so a refused value also ends at once on one line.
  from odin_jax import config_check
  try:
    config_check.validate(_CONFIG.value)
  except config_check.ConfigError as e:
    cli.fail(e)
  # Imported here so --help is fast and TF/JAX start after the checks.
  from odin_jax import failure, reporting, runtime, train

  def run():
    runtime.setup()
    logging.info("Config %s:\n%s", _CONFIG.value.get("method", ""),
                 reporting.format_config(_CONFIG.value))
    train.train_and_evaluate(_CONFIG.value, _WORKDIR.value)
  # Any failure ends the process at once, non-zero, the cause printed last
  # (and, with several processes, ends the others too): failure.py.
  failure.exit_on_failure(run)


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
