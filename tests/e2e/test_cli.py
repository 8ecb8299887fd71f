"""The command line answers at once (issue 20, point 6).

A mistyped field or a refused value ends `python -m odin_jax.main` with one
line naming the field, before JAX / Flax / TensorFlow are imported (checked
on Python's own import log, `-X importtime`, not on a clock); `--help` lists
the methods and presets; the progress line's ETA leaves out compilation;
the console gets one line per log step; hparams are readable.
"""

import json
import logging
import os
import subprocess
import sys

import ml_collections
import pytest

from configs import common
from odin_jax import config_check, reporting

REPO = os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))))
FRAMEWORKS = {"jax", "jaxlib", "flax", "tensorflow"}
HANG_TIMEOUT_S = 120   # only detects a hang; the real run is < 2 s


def _main(*args):
  """Runs the CLI with Python's import log on stderr; returns (returncode,
  stdout, the non-import stderr lines, top-level modules imported)."""
  proc = subprocess.run(
      [sys.executable, "-X", "importtime", "-m", "odin_jax.main", *args],
      cwd=REPO, capture_output=True, text=True, timeout=HANG_TIMEOUT_S)
  lines = proc.stderr.splitlines()
  # "import time: self [us] | cumulative | <indented module name>"
  imported = {l.rsplit("|", 1)[1].strip().split(".")[0]
              for l in lines if l.startswith("import time:") and "|" in l}
  other = [l for l in lines if not l.startswith("import time:")]
  return proc.returncode, proc.stdout, other, imported


def test_unknown_field_is_one_line_before_frameworks_load(tmp_path):
  # Before: a 55-line AttributeError traceback from inside ml_collections.
  rc, _, err, imported = _main("--config=configs/detcon_b.py:test",
                               f"--workdir={tmp_path / 'w'}",
                               "--config.model.dpeth=3")
  assert rc == 2, err
  assert len(err) == 1, err
  assert "'model.dpeth'" in err[0] and "did you mean 'model.depth'" in err[0]
  assert "odin_jax" in imported   # the import log did record our modules
  assert not imported & FRAMEWORKS, sorted(imported & FRAMEWORKS)
  assert not (tmp_path / "w").exists()


def test_refused_value_is_one_line_before_frameworks_load(tmp_path):
  # Before: JAX and TensorFlow loaded, then failure.py's traceback.
  rc, _, err, imported = _main("--config=configs/detcon_b.py:test",
                               f"--workdir={tmp_path / 'w'}",
                               "--config.loss.negatives=sideways")
  assert rc == 2, err
  assert err == ["error: loss.negatives='sideways'; choose one of "
                 f"{config_check.NEGATIVES}."], err
  assert not imported & FRAMEWORKS, sorted(imported & FRAMEWORKS)


def test_help_lists_every_method_and_preset():
  rc, out, err, imported = _main("--help")
  methods = sorted(f[:-3] for f in os.listdir(os.path.join(REPO, "configs"))
                   if f.endswith(".py") and f not in ("__init__.py",
                                                      "common.py"))
  assert len(methods) >= 7
  for name in (*methods, *common.PRESETS, *common.BACKBONE_PRESETS):
    assert name in out, (name, out)
  assert "--workdir" in out, out
  assert not imported & FRAMEWORKS, (rc, err)


def test_config_check_names_match_the_registries():
  """config_check keeps pure-Python copies of the valid names (so it runs
  without JAX); they must equal the modules' own registries."""
  from odin_jax import losses, objects
  from odin_jax.methods import hiergroup
  from odin_jax.data import masks
  from odin_jax.models import resnet
  assert sorted(config_check.LOSS_NAMES) == sorted(losses.LOSSES)
  assert config_check.HIERGROUP_LOSS == hiergroup.LOSS_NAME
  assert config_check.MASK_METHODS == masks.METHODS
  assert config_check.MASK_SAMPLING == objects.MASK_SAMPLING
  assert config_check.RESNET_DEPTHS == tuple(sorted(resnet.STAGE_SIZES))
  assert config_check.OUTPUT_STRIDES == resnet.OUTPUT_STRIDES
  assert config_check.REMAT_MODES == resnet.REMAT_MODES


class _Clock:
  """A hand-moved clock (seconds) for Progress."""

  def __init__(self):
    self.now = 0.0

  def __call__(self):
    return self.now


@pytest.mark.parametrize("logged_before", [(1,), (5, 10), ()])
def test_progress_rate_and_eta_leave_out_the_compiling_step(logged_before):
  """Step 1 takes 60 s (compilation), each later step 0.5 s: the rate is
  2 steps/s whichever steps were logged before, and the ETA follows it."""
  total, batch, compile_s, step_s = 100, 8, 60.0, 0.5
  clock = _Clock()
  progress = reporting.Progress(total, batch, start_step=0, clock=clock)
  scalars = {"train/loss": 1.0, "train/learning_rate": 0.1}
  for step in range(1, 12):
    clock.now = compile_s + (step - 1) * step_s   # when `step` ended
    progress.step_done(step)
    if step in logged_before:
      line = progress.line(step, {**scalars, **progress.rates(step)})
      if step == 1:   # nothing measured after compiling yet
        assert line.endswith(
            f"first step {compile_s:.1f}s (compiling), ETA ?"), line
  rates = progress.rates(11)
  assert rates["train/steps_per_sec"] == pytest.approx(1 / step_s)
  assert rates["train/images_per_sec"] == pytest.approx(batch / step_s)
  eta_s = (total - 11) * step_s   # 44.5 s, not the minutes compile implies
  line = progress.line(11, {**scalars, **rates})
  assert line.endswith(f"{batch / step_s:.1f} img/s ETA 0m{int(eta_s):02d}s")


def test_writer_logs_nothing_to_the_console_on_process_0(tmp_path, caplog):
  """The training loop prints one progress line per log step; the writer
  must not print a second one (CLU's LoggingWriter did)."""
  writer = reporting.create_writer(str(tmp_path))
  with caplog.at_level(logging.DEBUG):
    writer.write_hparams({"model.depth": 50})
    writer.write_scalars(3, {"train/loss": 1.25})
    writer.flush()
  logged = [r.getMessage() for r in caplog.records]
  assert not [m for m in logged if "train/loss" in m or "model.depth" in m], \
      logged
  with open(tmp_path / "metrics.jsonl") as f:
    assert json.loads(f.readline()) == {"step": 3, "train/loss": 1.25}
  assert any(f.startswith("events.out.tfevents") for f in os.listdir(tmp_path))
  writer.close()


def test_hparams_and_config_log_are_flat_sorted_and_readable():
  config = ml_collections.ConfigDict({
      "model": {"depth": 50, "name": "resnet"}, "batch_size": 8,
      "augment": {"blur_prob": (1.0, 0.1)}, "restore_step": None})
  assert list(reporting.flat_config(config).items()) == [
      ("augment.blur_prob", "1.0, 0.1"), ("batch_size", 8),
      ("model.depth", 50), ("model.name", "resnet"), ("restore_step", "None")]
  assert reporting.format_config(config).splitlines() == [
      "  augment.blur_prob = (1.0, 0.1)", "  batch_size = 8",
      "  model.depth = 50", "  model.name = 'resnet'",
      "  restore_step = None"]
