"""Multi-process training on loopback: 2 processes x 2 CPU devices == 1 x 4.

The 2-process run is `python -m odin_jax.main` twice with ODIN_JAX_COORDINATOR
= 127.0.0.1:<free port> (runtime.py joins the JAX distributed runtime; CPU
collectives between the processes go through gloo, JAX's default). Each
process feeds its half of every global batch; the loss is computed on the
global batch over the 4-device mesh, so the run must reproduce the
1-process, 4-device run of the same config step for step.

The 2-process run starts from the reference's step-2 checkpoint (all
processes restore), is preempted (process 1 alone gets SIGTERM; both save
the same step and exit cleanly), and a second 2-process launch resumes from
that multi-process checkpoint to the end.
"""
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from configs import detcon_b
from odin_jax import checkpoint, reporting, runtime, train
from tests import conftest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))))
STEPS = 6
RESUME_AT = 2      # the reference checkpoint the 2-process run starts from
# A launch takes 1-4 minutes on 2 loaded cores (imports, tf.data tracing,
# compiling at -O0: CPU processes share no compile cache); a hang fails
# earlier through the collective timeout, ODIN_JAX_INIT_TIMEOUT and the
# distributed runtime's heartbeat.
LAUNCH_TIMEOUT_S = 600


# Grid masks: FH on the fly would make each process spend most of its time
# segmenting (and waiting for tf.data's in-flight FH work at exit); the
# distribution is what is under test here.
_OVERRIDES = {"total_steps": STEPS, "log_every_steps": 1,
              "checkpoint_every_steps": RESUME_AT, "masks.method": "grid"}
_FLAGS = ("--config=configs/detcon_b.py:test",
          *(f"--config.{k}={v}" for k, v in _OVERRIDES.items()))


def _config():
  config = detcon_b.get_config("test")
  for key, value in _OVERRIDES.items():
    section, _, name = key.rpartition(".")
    setattr(config[section] if section else config, name, value)
  return config


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _env(process_id: int, port: int) -> dict:
  env = {k: v for k, v in os.environ.items()
         if not k.startswith(("ODIN_JAX_", "SLURM_", "JAX_COORDINATOR"))}
  env.update(
      JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1",
      # Replaces conftest's 4 devices: 2 per process, 4 in the mesh. No
      # persistent cache for CPU processes (runtime.setup says why), so every
      # launch compiles: with conftest's fast-compile flags, as the in-process
      # reference does (numbers within ~1e-7 of -O2's, far below the
      # tolerance below).
      XLA_FLAGS="--xla_force_host_platform_device_count=2 "
                "--xla_cpu_collective_call_terminate_timeout_seconds=60 "
                + conftest.FAST_COMPILE_FLAGS,
      ODIN_JAX_COORDINATOR=f"127.0.0.1:{port}", ODIN_JAX_NUM_PROCESSES="2",
      ODIN_JAX_PROCESS_ID=str(process_id), ODIN_JAX_INIT_TIMEOUT="120")
  return env


class _Launch:
  """Two `python -m odin_jax.main` processes of one run; logs in files."""

  def __init__(self, workdir, log_dir, name: str):
    port = _free_port()
    self.logs = [os.path.join(log_dir, f"{name}_{i}.log") for i in range(2)]
    self.procs = []
    for i in range(2):
      with open(self.logs[i], "w", encoding="utf-8") as log:
        self.procs.append(subprocess.Popen(
            [sys.executable, "-m", "odin_jax.main", *_FLAGS,
             f"--workdir={workdir}"], cwd=REPO, env=_env(i, port),
            stdout=log, stderr=subprocess.STDOUT))

  def output(self, i: int) -> str:
    with open(self.logs[i], encoding="utf-8", errors="replace") as f:
      return f.read()

  def wait_for(self, i: int, text: str, timeout: float) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
      if text in self.output(i):
        return
      assert all(p.poll() is None for p in self.procs), self.tails()
      time.sleep(0.2)
    raise AssertionError(f"no {text!r} in process {i}'s log:\n{self.tails()}")

  def wait(self) -> list[int]:
    deadline = time.time() + LAUNCH_TIMEOUT_S
    for p in self.procs:
      try:
        p.wait(timeout=max(1.0, deadline - time.time()))
      except subprocess.TimeoutExpired:
        for q in self.procs:
          q.kill()
        raise AssertionError("2-process run timed out:\n" + self.tails())
    return [p.returncode for p in self.procs]

  def tails(self) -> str:
    return "\n".join(f"--- process {i} ---\n{self.output(i)[-2500:]}"
                     for i in range(2))


def _losses(workdir) -> dict[int, float]:
  return {r["step"]: r["train/loss"] for r in reporting.read_metrics(
      str(workdir))}


def _line_count(path) -> int:
  with open(path, encoding="utf-8") as f:
    return sum(1 for _ in f)


@pytest.mark.slow
def test_two_processes_match_one_and_resume_after_preemption(tmp_path):
  config = _config()
  seconds = {"start": time.time()}
  reference = train.train_and_evaluate(config, str(tmp_path / "reference"))
  seconds["reference"] = time.time()
  expected = _losses(tmp_path / "reference")
  assert sorted(expected) == list(range(1, STEPS + 1))
  workdir = tmp_path / "multi"
  shutil.copytree(tmp_path / "reference" / "checkpoints" / str(RESUME_AT),
                  workdir / "checkpoints" / str(RESUME_AT))

  # Launch 1 restores step 2 on both processes. Process 1 alone gets
  # SIGTERM once the run has reported its start step (the log line comes
  # after that), long before the first step is compiled: the notice reaches
  # process 0 through the coordination service, and both save after the
  # first step and exit cleanly.
  first = _Launch(workdir, tmp_path, "first")
  first.wait_for(1, f"starting at step {RESUME_AT}.", LAUNCH_TIMEOUT_S)
  first.procs[1].send_signal(signal.SIGTERM)
  assert first.wait() == [0, 0], first.tails()
  seconds["launch 1"] = time.time()
  stopped = RESUME_AT + 1
  saved = sorted(int(s) for s in os.listdir(workdir / "checkpoints")
                 if s.isdigit())
  assert saved == [RESUME_AT, stopped], (saved, first.tails())
  for i in range(2):
    assert "Preemption notice: all processes save step " \
        f"{stopped}" in first.output(i), first.tails()
  # Only process 0 writes metrics: one line per step, one events file.
  assert _line_count(workdir / "metrics.jsonl") == 1
  assert len([f for f in os.listdir(workdir)
              if f.startswith("events.out.tfevents")]) == 1

  # Launch 2: both processes restore the 2-process checkpoint and finish.
  second = _Launch(workdir, tmp_path, "second")
  assert second.wait() == [0, 0], second.tails()
  seconds["launch 2"] = time.time()
  assert f"Resumed from {workdir / 'checkpoints'} at step {stopped}" in \
      second.output(0)
  assert _line_count(workdir / "metrics.jsonl") == STEPS - RESUME_AT

  got = _losses(workdir)
  assert sorted(got) == list(range(RESUME_AT + 1, STEPS + 1))
  # Not bit-equal: gloo's cross-process all-reduce sums in another order than
  # XLA:CPU's in-process one (measured differences ~1e-7 relative).
  got_losses = np.array([got[s] for s in sorted(got)])
  want_losses = np.array([expected[s] for s in sorted(got)])
  np.testing.assert_allclose(got_losses, want_losses, rtol=2e-5)
  # The final 2-process checkpoint, restored on this process's 4 devices,
  # holds the reference's parameters, EMA target, BatchNorm statistics and
  # optimizer state (its momentum is the sum of the steps' gradients, so
  # another batch would show at the percent level).
  mngr = checkpoint.manager(str(workdir), config.max_to_keep)
  assert mngr.latest_step() == STEPS
  final = checkpoint.restore(mngr, reference, config)
  ref_leaves = jax.tree_util.tree_leaves_with_path(jax.device_get(reference))
  got_leaves = jax.tree.leaves(jax.device_get(final))
  assert len(ref_leaves) == len(got_leaves)
  for (path, want), have in zip(ref_leaves, got_leaves):
    np.testing.assert_allclose(have, want, rtol=1e-4, atol=1e-5,
                               err_msg=jax.tree_util.keystr(path))
  worst = max(float(np.max(np.abs(np.asarray(have, np.float64) - want)))
              for (_, want), have in zip(ref_leaves, got_leaves))
  print(f"2 vs 1 process: losses within "
        f"{np.max(np.abs(got_losses / want_losses - 1)):.1e} (relative), "
        f"state within {worst:.1e} (absolute); seconds: " + ", ".join(
            f"{name} {t - prev:.0f}" for (name, t), prev in zip(
                list(seconds.items())[1:], list(seconds.values())[:-1])))


# --- detect_distributed: which environment asks for which initialisation ---

_EXPLICIT = {"ODIN_JAX_COORDINATOR": "10.0.0.2:8476",
             "ODIN_JAX_NUM_PROCESSES": "4", "ODIN_JAX_PROCESS_ID": "3"}
_SLURM = {"SLURM_JOB_ID": "77", "SLURM_STEP_NODELIST": "gpu[001-002]",
          "SLURM_NTASKS": "16", "SLURM_PROCID": "9", "SLURM_LOCALID": "1"}


def _detect(env, tpu=False):
  return runtime.detect_distributed(env, on_tpu_vm=tpu)


def test_detect_single_process_environments():
  assert _detect({}) is None
  assert _detect({"SLURM_NTASKS": "1", "SLURM_PROCID": "0"}) is None
  assert _detect(dict(_EXPLICIT, ODIN_JAX_NUM_PROCESSES="1",
                      ODIN_JAX_PROCESS_ID="0")) is None
  # Off switch wins over every detected environment.
  assert _detect(dict(_SLURM, ODIN_JAX_DISTRIBUTED="0"), tpu=True) is None


def test_detect_explicit_slurm_tpu_and_forced():
  d = _detect(dict(_EXPLICIT, ODIN_JAX_INIT_TIMEOUT="30"))
  assert (d.source, d.coordinator_address, d.num_processes, d.process_id,
          d.initialization_timeout) == ("env", "10.0.0.2:8476", 4, 3, 30)
  # Explicit settings take precedence over SLURM's.
  assert _detect(dict(_SLURM, **_EXPLICIT)).source == "env"
  d = _detect(_SLURM)
  assert d.source == "slurm" and d.coordinator_address is None
  assert _detect({}, tpu=True).source == "tpu"
  assert _detect({"ODIN_JAX_DISTRIBUTED": "1"}).source == "auto"


def test_detect_slurm_batch_script_runs_alone():
  # The sbatch script itself sees SLURM_NTASKS but is no srun task.
  env = {k: v for k, v in _SLURM.items() if k != "SLURM_STEP_NODELIST"}
  assert _detect(env) is None


@pytest.mark.parametrize("env,match", [
    ({"ODIN_JAX_COORDINATOR": "10.0.0.2:8476"},
     "ODIN_JAX_NUM_PROCESSES, ODIN_JAX_PROCESS_ID not"),
    (dict(_EXPLICIT, ODIN_JAX_PROCESS_ID="4"), r"must be in \[0, "),
    (dict(_EXPLICIT, ODIN_JAX_PROCESS_ID="-1"), r"must be in \[0, "),
    (dict(_EXPLICIT, ODIN_JAX_NUM_PROCESSES="0"), "must be >= 1"),
    (dict(_EXPLICIT, ODIN_JAX_NUM_PROCESSES="two"), "is not an integer"),
    (dict(_EXPLICIT, ODIN_JAX_COORDINATOR="10.0.0.2"), "host:port"),
    (dict(_SLURM, SLURM_PROCID="16"), "SLURM_PROCID=16 must be in"),
    ({"ODIN_JAX_DISTRIBUTED": "maybe"}, "use 1 .* or 0"),
], ids=["partial", "id_too_big", "id_negative", "zero_processes", "not_int",
        "no_port", "slurm_rank", "bad_switch"])
def test_detect_rejects_inconsistent_settings(env, match):
  with pytest.raises(runtime.DistributedConfigError, match=match):
    _detect(env)
