"""python -m odin_jax.evaluate --config=configs/detcon_b.py:demo --workdir=DIR

Evaluates the latest checkpoint in DIR (or --step=N), a random-init network
(--source=random) or a mask set (--source=masks:fh|slic|grid|gt), prints the
metrics table and writes DIR/eval/results_<tag>.json, DIR/eval/<tag>/*.png
and (with --tensorboard) TensorBoard events in DIR. See
odin_jax/evaluate/runner.py (the driver) and each evaluation's module for
the protocols, docs/evaluation.md for measured results. Examples:

  python -m odin_jax.evaluate --config=configs/detcon_b.py:demo --workdir=DIR
  python -m odin_jax.evaluate --config=configs/detcon_b.py:demo --workdir=DIR \\
      --evals=discovery,pictures --source=random
  python -m odin_jax.evaluate ... --set=num_images=64 --set=feature=stage3

Settings are config.eval fields (--config.eval.num_images=64 once the config
has an eval section) or --set=name=value (applied last).
"""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "The run's config file, optionally with a preset: "
    "configs/detcon_b.py:demo", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None,
                               "The run's workdir (checkpoints/, eval/).")
_STEP = flags.DEFINE_integer("step", None,
                             "Checkpoint step (default: the latest).")
_EVALS = flags.DEFINE_list(
    "evals", None, "Evaluations (default config.eval.evals, i.e. all): "
    "discovery, instances, video, linear_probe, knn, pictures, "
    "imagenet_linear (opt-in), or 'periodic'.")
_SOURCE = flags.DEFINE_string(
    "source", "checkpoint", "checkpoint | random | masks:fh | masks:slic | "
    "masks:grid | masks:gt | masks:hierarchy | init_from:PATH")
_PARAMS = flags.DEFINE_enum(
    "params", "params", ["params", "target_params", "tau",
                         "discovery_params"],
    "Which network of the checkpoint: online θ, EMA target ξ, or Odin's τ "
    "('discovery_params': τ's older name).")
_SET = flags.DEFINE_multi_string(
    "set", [], "Eval setting overrides name=value, e.g. --set=num_images=64.")
_TENSORBOARD = flags.DEFINE_bool(
    "tensorboard", True, "Also write scalars / images as TensorBoard events "
    "in the workdir.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  # Imported here so --help is fast and TF/JAX start after flag parsing.
  from odin_jax import failure
  from odin_jax import runtime
  from odin_jax.evaluate import runner
  from odin_jax.evaluate import settings
  runtime.setup()

  def run():
    # A failure (a missing dataset, a bad checkpoint or init_from file)
    # ends the process non-zero with `odin_jax failed: Type: message` as
    # the last line; the traceback is in the log above it.
    writer = None
    if _TENSORBOARD.value:
      from clu import metric_writers
      writer = metric_writers.create_default_writer(
          _WORKDIR.value, just_logging=False, asynchronous=False)
    which = _EVALS.value
    if which == ["periodic"]:
      which = "periodic"
    metrics = runner.evaluate(
        _CONFIG.value, _WORKDIR.value, step=_STEP.value, which=which,
        source=_SOURCE.value, params_key=_PARAMS.value, writer=writer,
        overrides=settings.parse_overrides(_SET.value), log_table=False)
    if writer is not None:
      writer.close()
    return metrics

  metrics = failure.exit_on_failure(run)
  logging.info("Done.")
  if _SOURCE.value.startswith("init_from:"):   # imported weights: no step
    title = f"{_SOURCE.value}: {_WORKDIR.value}"
  else:
    step = "latest" if _STEP.value is None else _STEP.value
    title = (f"{_SOURCE.value} ({_PARAMS.value}), step {step}: "
             f"{_WORKDIR.value}")
  print(runner.format_table(metrics, title), flush=True)


if __name__ == "__main__":
  app.run(main)
