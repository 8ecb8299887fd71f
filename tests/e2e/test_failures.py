"""Any failure ends the process by itself, non-zero, the cause printed last.

Each end-to-end case starts `python -m odin_jax.main` with
ODIN_JAX_INJECT_FAILURE at one of the places the issue names (input
pipeline, step, periodic evaluation, checkpoint save, picture writer) and
checks that the process exits on its own, non-zero, with the injected cause
as the last line on stderr. The timeouts only detect a hang (before the fix
a multi-process failure waited 300 s in JAX's shutdown barrier); they are
not speed assertions.
"""
import os
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from odin_jax import failure
from tests.e2e import test_multihost

REPO = os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))))
HANG_TIMEOUT_S = 600


# --- the injection hook and the bounded close, in this process -------------

def test_injection_parses_place_and_step():
  env = failure.ENV_INJECT
  assert failure.injection({}) is None
  assert failure.injection({env: ""}) is None
  assert failure.injection({env: "eval"}) == ("eval", None)
  assert failure.injection({env: "checkpoint:12"}) == ("checkpoint", 12)
  for bad in ("stepp", "step:x", "step:-1", "input:1:2"):
    with pytest.raises(ValueError, match=env):
      failure.injection({env: bad})


def test_inject_fires_only_at_its_place_and_step(monkeypatch):
  monkeypatch.delenv(failure.ENV_INJECT, raising=False)
  for place in failure.PLACES:   # unset: never raises
    failure.inject(place, 1)
  monkeypatch.setenv(failure.ENV_INJECT, "step:3")
  failure.inject("step", 2)
  failure.inject("eval", 3)
  with pytest.raises(failure.InjectedFailure, match="in the step at step 3"):
    failure.inject("step", 3)


def test_failing_input_passes_batches_then_fails_at_its_step(monkeypatch):
  batches = [{"x": np.full(2, i)} for i in range(5)]
  monkeypatch.delenv(failure.ENV_INJECT, raising=False)
  it = iter(batches)
  assert failure.failing_input(it, 0) is it   # unset: the iterator itself
  # A run resumed at step 10 reads the batches of steps 11, 12, ...
  monkeypatch.setenv(failure.ENV_INJECT, "input:13")
  got = failure.failing_input(iter(batches), 10)
  assert [int(next(got)["x"][0]) for _ in range(2)] == [0, 1]
  with pytest.raises(failure.InjectedFailure, match="in the input at step 13"):
    next(got)


def test_close_on_failure_is_bounded_and_keeps_the_cause():
  closed, never = [], threading.Event()

  def blocks_forever():
    never.wait()

  def raises():
    raise OSError("disk gone")

  # A close that blocks (a dead peer) is abandoned, one that raises is
  # logged; the others still run and the original exception propagates.
  with pytest.raises(KeyError, match="the cause"):
    with failure.close_on_failure(("stuck", blocks_forever),
                                  ("broken", raises),
                                  ("writer", lambda: closed.append(1)),
                                  timeout_s=0.2):
      raise KeyError("the cause")
  assert closed == [1]
  with failure.close_on_failure(("writer", lambda: closed.append(2))):
    pass   # no failure: nothing is closed
  assert closed == [1]
  never.set()


def _last_line(text: str) -> str:
  lines = [l for l in text.splitlines() if l.strip()]
  return lines[-1] if lines else ""


def test_exit_on_failure_outlives_no_thread():
  # Before: a non-daemon thread (like tf.data's or orbax's) kept the failed
  # interpreter alive forever after the traceback.
  code = (
      "import threading, time\n"
      "from odin_jax import failure\n"
      "def fail():\n"
      "  threading.Thread(target=time.sleep, args=(3600,)).start()\n"
      "  raise ValueError('the real cause')\n"
      "failure.exit_on_failure(fail)\n")
  proc = subprocess.run([sys.executable, "-c", code], cwd=REPO,
                        capture_output=True, text=True, timeout=120)
  assert proc.returncode == 1, proc.stderr
  assert _last_line(proc.stderr) == \
      "odin_jax failed: ValueError: the real cause", proc.stderr[-2000:]


# --- python -m odin_jax.main with a failure at each place -------------------

_DETCON = "--config=configs/detcon_b.py:test"
# (config flags, injection): steps are the earliest that reach each place.
_PLACES = {
    # After a step: the tf.data iterator runs with batches in flight.
    "input": ([_DETCON], "input:2"),
    "step": ([_DETCON], "step:1"),
    # The periodic evaluation of the initial parameters (step 0).
    "eval": ([_DETCON, "--config.eval.every_steps=2"], "eval:0"),
    # Right after the save of step 1 started: it is still in flight.
    "checkpoint": ([_DETCON, "--config.checkpoint_every_steps=1"],
                   "checkpoint:1"),
    # Odin's TensorBoard pictures of the masks it discovers (first step).
    "pictures": (["--config=configs/odin.py:test"], "pictures:1"),
}


def _single_process_env(injection: str) -> dict:
  # Passes conftest's 4 devices, collective timeout and XLA cache on.
  env = {k: v for k, v in os.environ.items()
         if not k.startswith(("ODIN_JAX_", "SLURM_", "JAX_COORDINATOR"))}
  env.update(JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1",
             ODIN_JAX_XLA_CACHE=os.environ["ODIN_JAX_XLA_CACHE"])
  env[failure.ENV_INJECT] = injection
  return env


@pytest.mark.parametrize("place", list(_PLACES))
def test_injected_failure_exits_by_itself(place, tmp_path):
  flags, injection = _PLACES[place]
  proc = subprocess.run(
      [sys.executable, "-m", "odin_jax.main", *flags,
       f"--workdir={tmp_path}"], cwd=REPO, env=_single_process_env(injection),
      capture_output=True, text=True, timeout=HANG_TIMEOUT_S)
  assert proc.returncode == 1, proc.stderr[-3000:]
  step = injection.split(":")[1]
  assert _last_line(proc.stderr) == (
      "odin_jax failed: odin_jax.failure.InjectedFailure: "
      f"{failure.ENV_INJECT}={injection}: injected failure in the {place} "
      f"at step {step}."), proc.stderr[-3000:]
  if place == "checkpoint":
    # The failure let the in-flight save land (bounded close of orbax's
    # manager) instead of abandoning a half-written step.
    assert os.listdir(tmp_path / "checkpoints") == ["1"]


# --- two processes: one's failure ends the other -----------------------------

def test_failure_of_process_0_ends_process_1(tmp_path):
  # Process 0 (which hosts the coordination service) fails after dispatching
  # step 1; process 1 would otherwise wait for it in step 2's collective,
  # then for 300 s in JAX's shutdown barrier.
  port = test_multihost._free_port()
  procs, logs = [], []
  for i in range(2):
    env = test_multihost._env(i, port)
    if i == 0:
      env[failure.ENV_INJECT] = "step:1"
    logs.append(tmp_path / f"process_{i}.log")
    with open(logs[i], "w", encoding="utf-8") as log:
      procs.append(subprocess.Popen(
          [sys.executable, "-m", "odin_jax.main", _DETCON,
           "--config.masks.method=grid", f"--workdir={tmp_path / 'run'}"],
          cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT))
  deadline = time.time() + HANG_TIMEOUT_S
  try:
    codes = [p.wait(timeout=max(1.0, deadline - time.time())) for p in procs]
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  out = [l.read_text(encoding="utf-8", errors="replace") for l in logs]
  tails = "\n".join(f"--- process {i} ---\n{o[-2500:]}"
                    for i, o in enumerate(out))
  assert codes == [1, 1], tails
  cause = (f"odin_jax.failure.InjectedFailure: {failure.ENV_INJECT}=step:1: "
           "injected failure in the step at step 1.")
  assert _last_line(out[0]) == \
      f"odin_jax failed (process 0 of 2): {cause}", tails
  assert _last_line(out[1]) == ("odin_jax stopped (process 1): another "
                                f"process failed, process 0: {cause}"), tails
