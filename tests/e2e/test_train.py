"""End-to-end: every method trains; resume is exact; NaN and SIGTERM."""
import os
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import byol, detcon_b, detcon_s, simclr
from odin_jax import checkpoint, reporting, step, train


def _config(module, steps=4):
  config = module.get_config("test")
  config.total_steps = steps
  config.log_every_steps = 1
  return config


@pytest.mark.parametrize("module", [detcon_b, detcon_s, byol, simclr],
                         ids=["detcon_b", "detcon_s", "byol", "simclr"])
def test_each_method_trains_end_to_end(module, tmp_path):
  config = _config(module, steps=2)
  state = train.train_and_evaluate(config, str(tmp_path))
  assert int(state.step) == 2
  records = reporting.read_metrics(str(tmp_path))
  assert [r["step"] for r in records] == [1, 2]
  for r in records:
    for key in ("train/loss", "train/learning_rate", "train/grad_norm",
                "train/images_per_sec"):
      assert np.isfinite(r[key]), key
  assert any(f.startswith("events.out.tfevents") for f in os.listdir(tmp_path))
  assert sorted(os.listdir(tmp_path / "checkpoints")) == ["2"]


def _run_main(workdir, *flags):
  return subprocess.Popen(
      [sys.executable, "-m", "odin_jax.main", *flags, f"--workdir={workdir}"],
      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
      env=dict(os.environ))


def test_kill9_and_resume_equals_uninterrupted(tmp_path):
  """A run SIGKILLed mid-training resumes to the uninterrupted run's numbers."""
  steps, every = 24, 4
  config = _config(detcon_b, steps=steps)
  config.checkpoint_every_steps = every
  full = train.train_and_evaluate(config, str(tmp_path / "full"))

  killed = tmp_path / "killed"
  proc = _run_main(killed, "--config=configs/detcon_b.py:test",
                   f"--config.total_steps={steps}", "--config.log_every_steps=1",
                   f"--config.checkpoint_every_steps={every}")
  deadline = time.time() + 300
  while time.time() < deadline and proc.poll() is None:
    if (killed / "checkpoints" / str(2 * every)).is_dir():
      break
    time.sleep(0.05)
  assert proc.poll() is None, "run ended before it could be killed:\n" + (
      proc.communicate()[0][-3000:])
  proc.kill()   # SIGKILL: no handler, no final save, maybe a save in flight
  proc.communicate(timeout=60)
  assert proc.returncode == -signal.SIGKILL
  done = reporting.read_metrics(str(killed))
  assert 2 * every <= len(done) < steps   # killed mid-run, after some steps

  resumed = train.train_and_evaluate(config, str(killed))
  assert int(resumed.step) == int(full.step) == steps
  for a, b in zip(jax.tree.leaves(jax.device_get(full)),
                  jax.tree.leaves(jax.device_get(resumed))):
    np.testing.assert_array_equal(a, b)
  # Same loss at every step (steps redone after the kill overwrite the killed
  # run's records): the input order resumed too.
  full_losses = [r["train/loss"] for r in reporting.read_metrics(str(tmp_path / "full"))]
  res_losses = [r["train/loss"] for r in reporting.read_metrics(str(killed))]
  assert len(full_losses) == steps and full_losses == res_losses
  assert len(set(full_losses)) == steps


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path, monkeypatch):
  config = _config(detcon_s, steps=6)
  config.checkpoint_every_steps = 2
  real = step.make_train_step

  def poisoned(*args, **kwargs):
    fn = real(*args, **kwargs)

    def wrapped(state, batch):
      new_state, metrics = fn(state, batch)
      bad = new_state.step >= 3
      metrics = dict(metrics, **{"train/loss": jnp.where(bad, jnp.nan, metrics["train/loss"])})
      return new_state, metrics
    return wrapped

  monkeypatch.setattr(step, "make_train_step", poisoned)
  with pytest.raises(train.NonFiniteLossError, match=r"step 3.*step 2.*intact"):
    train.train_and_evaluate(config, str(tmp_path))
  assert sorted(os.listdir(tmp_path / "checkpoints")) == ["2"]


def test_sigterm_saves_and_exits_cleanly(tmp_path):
  proc = _run_main(tmp_path, "--config=configs/simclr.py:test",
                   "--config.total_steps=100000", "--config.log_every_steps=1",
                   "--config.checkpoint_every_steps=100000")
  metrics = tmp_path / "metrics.jsonl"
  deadline = time.time() + 240
  while time.time() < deadline and proc.poll() is None:
    if metrics.exists() and metrics.read_text().count("\n") >= 2:
      break
    time.sleep(0.5)
  assert proc.poll() is None, proc.communicate()[0][-3000:]
  proc.send_signal(signal.SIGTERM)
  out, _ = proc.communicate(timeout=120)
  assert proc.returncode == 0, out[-3000:]
  saved = [int(s) for s in os.listdir(tmp_path / "checkpoints") if s.isdigit()]
  assert len(saved) == 1 and 2 <= saved[0] < 100000, out[-2000:]
  assert "SIGTERM" in out
