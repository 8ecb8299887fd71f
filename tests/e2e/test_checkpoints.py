"""Checkpoint I/O (odin_jax/checkpoint.py): damage, atomicity, non-local paths.

One real 4-step BYOL :test run (checkpoints 2 and 4) is shared by every
test; each test damages or reads its own copy. The non-local path is gs://
served from a local folder at the epath layer and the TensorStore kvstore
layer (`fake_gcs`), the two places orbax and odin_jax touch storage: orbax
then takes its GCS code paths (commit_success.txt instead of a rename), and
odin_jax's own reads and writes must go through epath to land in the bucket.
Heavy modules (train, export, the evaluation runner) are imported inside
the tests: the kill -9 child process imports this module for fake_gcs only.
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import logging
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from unittest import mock

import jax
import numpy as np
import pytest
from etils.epath import backend as epath_backend
from etils.epath import gpath
from orbax.checkpoint._src.path import gcs_utils

from odin_jax import checkpoint

_REPO = os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))))


# --- A gs:// bucket in a local folder --------------------------------------


# pylint: disable-next=protected-access
class _LocalBucketBackend(epath_backend._OsPathBackend):
  """epath backend serving gs://<bucket>/<path> from <root>/<bucket>/<path>."""

  def __init__(self, root):
    self.root = str(root)

  def local(self, path) -> str:
    path = os.fspath(path)
    if path.startswith(self.root + os.sep):   # the base class calling itself
      return path
    assert path.startswith("gs://"), f"not a gs:// path: {path}"
    return os.path.join(self.root, path[len("gs://"):])

  def url(self, local) -> str:
    return "gs://" + os.path.relpath(local, self.root)

  def open(self, path, mode):
    return super().open(self.local(path), mode)

  def exists(self, path):
    return super().exists(self.local(path))

  def isdir(self, path):
    return super().isdir(self.local(path))

  def listdir(self, path):
    return super().listdir(self.local(path))

  def glob(self, path):
    return [self.url(p) for p in super().glob(self.local(path))]

  def walk(self, top, **kwargs):
    for d, dirs, files in super().walk(self.local(top), **kwargs):
      yield self.url(d), dirs, files

  def makedirs(self, path, **kwargs):
    return super().makedirs(self.local(path), **kwargs)

  def mkdir(self, path, **kwargs):
    return super().mkdir(self.local(path), **kwargs)

  def rmtree(self, path):
    return super().rmtree(self.local(path))

  def remove(self, path):
    return super().remove(self.local(path))

  def rename(self, path, dst):
    return super().rename(self.local(path), self.local(dst))

  def replace(self, path, dst):
    return super().replace(self.local(path), self.local(dst))

  def copy(self, path, dst, overwrite):
    return super().copy(self.local(path), self.local(dst), overwrite)

  def stat(self, path):
    return super().stat(self.local(path))


@contextlib.contextmanager
def fake_gcs(root):
  """gs://<bucket>/... read and written in <root>/<bucket>/... by epath
  (instead of tf.io.gfile) and by TensorStore (a 'file' kvstore instead of
  its 'gcs' driver); bucket metadata (hierarchical namespace) says no."""
  fake = _LocalBucketBackend(root)
  # pylint: disable-next=protected-access
  backends = dict(gpath._PREFIX_TO_BACKEND, gs=fake)

  def kvstore(path):
    bucket, inside = gcs_utils.parse_gcs_path(path, add_trailing_slash=False)
    return {"driver": "file", "path": os.path.join(fake.root, bucket, inside)}

  with mock.patch.object(gpath, "_PREFIX_TO_BACKEND", backends), \
      mock.patch.object(gpath, "_is_tf_installed", lambda: False), \
      mock.patch.object(gcs_utils, "get_kvstore_for_gcs", kvstore), \
      mock.patch.object(gcs_utils, "is_hierarchical_namespace_enabled",
                        lambda path: False):
    yield fake


# --- The shared run and damage --------------------------------------------


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  """(config, workdir, final state, {step: state dict}) of a 4-step run
  with checkpoints at steps 2 and 4 (byol :test, as test_export.py)."""
  from configs import byol
  from odin_jax import train
  config = byol.get_config("test")
  config.log_every_steps = 1
  workdir = tmp_path_factory.mktemp("run")
  state = train.train_and_evaluate(config, str(workdir))
  assert sorted(os.listdir(workdir / "checkpoints")) == ["2", "4"]
  saved = {s: checkpoint.read(str(workdir), s)[0] for s in (2, 4)}
  return config, workdir, state, saved


def _copy(run, tmp_path):
  _, workdir, _, _ = run
  shutil.copytree(workdir / "checkpoints", tmp_path / "checkpoints")
  return tmp_path


def _damage(workdir, kind: str, step: int = 4) -> str:
  """Damages checkpoints/<step>; returns the path a message should name."""
  step_dir = workdir / "checkpoints" / str(step)
  if kind == "truncated_metadata":   # the case
    path = step_dir / "meta" / "metadata"
    path.write_bytes(path.read_bytes()[:20])
    return str(path)
  if kind == "missing_array_file":
    files = glob.glob(str(step_dir / "state" / "ocdbt.process_0" / "d" / "*"))
    os.remove(max(files, key=os.path.getsize))   # the largest array data
    return str(step_dir / "state")
  assert kind == "empty_step_directory"
  shutil.rmtree(step_dir)
  step_dir.mkdir()
  return f"{step_dir} is an empty directory"


def _digest(folder) -> dict:
  """{relative path: sha256} of every file under `folder`."""
  out = {}
  for root, _, files in os.walk(folder):
    for name in files:
      path = os.path.join(root, name)
      with open(path, "rb") as f:
        out[os.path.relpath(path, folder)] = hashlib.sha256(
            f.read()).hexdigest()
  return out


def _assert_same(tree, expected) -> None:
  """Equal leaves (both trees with the same structure / sorted dict keys)."""
  leaves = jax.tree.leaves(jax.device_get(tree))
  expected = jax.tree.leaves(jax.device_get(expected))
  assert len(leaves) == len(expected) > 0
  for a, b in zip(leaves, expected):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


DAMAGE = ("truncated_metadata", "missing_array_file", "empty_step_directory")


@pytest.mark.parametrize("kind", DAMAGE)
def test_read_falls_back_to_newest_readable_step(run, tmp_path, kind, caplog):
  """Evaluate/export's reader: step 2 (equal to what was saved), a warning
  naming step 4 and the failing file; nothing on disk changes."""
  _, _, _, saved = run
  workdir = _copy(run, tmp_path)
  named = _damage(workdir, kind)
  before = _digest(workdir / "checkpoints")
  with caplog.at_level(logging.WARNING):
    state, meta, step = checkpoint.read(str(workdir))
  assert (step, meta["step"]) == (2, 2)
  _assert_same(state["params"], saved[2]["params"])
  assert f"Checkpoint step 4 in {workdir / 'checkpoints'} is unreadable" in \
      caplog.text
  assert named in caplog.text, caplog.text
  assert _digest(workdir / "checkpoints") == before   # read only

  # An explicit step never falls back: it fails, naming the file.
  with pytest.raises(checkpoint.UnreadableCheckpointError,
                     match=r"Checkpoint step 4 .* could not be read") as e:
    checkpoint.read(str(workdir), 4)
  assert named in str(e.value)


@pytest.mark.parametrize("kind", DAMAGE)
def test_training_restore_sets_unreadable_step_aside(run, tmp_path, kind,
                                                     caplog):
  """Training's restore: step 2; step 4 kept byte for byte as
  4.unreadable; new steps (4 included) are saved beside it."""
  config, _, state, saved = run
  workdir = _copy(run, tmp_path)
  named = _damage(workdir, kind)
  damaged = _digest(workdir / "checkpoints" / "4")
  mngr = checkpoint.manager(str(workdir), config.max_to_keep)
  with caplog.at_level(logging.WARNING):
    restored = checkpoint.restore(mngr, state, config)
  assert int(restored.step) == 2
  _assert_same(restored.params, saved[2]["params"])
  assert named in caplog.text and "4.unreadable" in caplog.text
  assert _digest(workdir / "checkpoints" / "4.unreadable") == damaged
  assert mngr.all_steps() == [2]
  for s in (3, 4, 5):   # max_to_keep=3 collects step 2, never 4.unreadable
    checkpoint.save(mngr, restored.replace(step=restored.step * 0 + s), config)
  mngr.wait_until_finished()
  mngr.close()
  assert sorted(os.listdir(workdir / "checkpoints")) == [
      "3", "4", "4.unreadable", "5"]
  assert _digest(workdir / "checkpoints" / "4.unreadable") == damaged
  assert checkpoint.read(str(workdir), with_state=False)[2] == 5


def test_resume_after_truncated_metadata_end_to_end(run, tmp_path, caplog):
  """The issue's case through train_and_evaluate: resumes from step 2 and
  reaches the uninterrupted run's step-4 state exactly."""
  from odin_jax import train
  config, _, final, _ = run
  workdir = _copy(run, tmp_path)
  _damage(workdir, "truncated_metadata")
  with caplog.at_level(logging.WARNING):
    resumed = train.train_and_evaluate(config, str(workdir))
  assert "Checkpoint step 4" in caplog.text and "meta/metadata" in caplog.text
  assert int(resumed.step) == 4
  _assert_same(resumed, final)
  assert sorted(os.listdir(workdir / "checkpoints")) == [
      "2", "4", "4.unreadable"]


def test_restore_step_picks_one_and_keeps_newer_ones(run, tmp_path, caplog):
  config, _, state, saved = run
  workdir = _copy(run, tmp_path)
  intact = _digest(workdir / "checkpoints" / "4")
  mngr = checkpoint.manager(str(workdir), config.max_to_keep)
  with pytest.raises(ValueError, match=r"No checkpoint for step 3 .*"
                                       r"available: \[2, 4\]"):
    checkpoint.restore(mngr, state, config, step=3)
  other = config.copy_and_resolve_references()
  other.model.projector_dim = 8   # a config error is not a damaged step
  with pytest.raises(ValueError, match="different config"):
    checkpoint.restore(mngr, state, other)
  assert sorted(os.listdir(workdir / "checkpoints")) == ["2", "4"]

  with caplog.at_level(logging.WARNING):
    restored = checkpoint.restore(mngr, state, config, step=2)
  mngr.close()
  assert int(restored.step) == 2
  _assert_same(restored.params, saved[2]["params"])
  assert sorted(os.listdir(workdir / "checkpoints")) == ["2", "4.superseded"]
  assert _digest(workdir / "checkpoints" / "4.superseded") == intact
  assert "4.superseded" in caplog.text
  with pytest.raises(ValueError, match=r"4\.superseded was set aside"):
    checkpoint.read(str(workdir), 4)


# --- kill -9 during an async save -----------------------------------------

_KILLED_SAVE = textwrap.dedent("""
    import contextlib, os, sys, time
    sys.path[:0] = [{repo!r}, {tests!r}]
    import flax.struct, jax.numpy as jnp, ml_collections
    from orbax.checkpoint._src.path import atomicity
    from odin_jax import checkpoint
    import test_checkpoints

    @flax.struct.dataclass
    class State:
      step: jnp.ndarray
      params: dict

    def state(step):
      return State(jnp.int32(step), {{"w": jnp.full((1024, 1024), step,
                                                    jnp.float32)}})

    async def never_commit(self):
      # Every array is written; only the commit (rename / commit_success.txt)
      # is left: the worst moment to be killed.
      open({marker!r}, "w").close()
      time.sleep(3600)

    config = ml_collections.ConfigDict({{"method": "byol"}})
    context = (test_checkpoints.fake_gcs({root!r}) if {gcs!r} else
               contextlib.nullcontext())
    with context:
      mngr = checkpoint.manager({workdir!r}, 3)
      checkpoint.save(mngr, state(2), config)
      mngr.wait_until_finished()
      atomicity.AtomicRenameTemporaryPath.finalize = never_commit
      atomicity.CommitFileTemporaryPath.finalize = never_commit
      checkpoint.save(mngr, state(4), config)   # async: returns at once
      time.sleep(3600)
""")


@pytest.mark.parametrize("gcs", [False, True], ids=["local", "gcs"])
def test_kill9_during_async_save_is_never_taken(tmp_path, gcs):
  """SIGKILL after step 4's arrays are written, before its commit: step 4
  is not listed (local: a *.orbax-checkpoint-tmp-* dir; GCS: 4/ without
  commit_success.txt), so readers take step 2 without a warning."""
  marker = tmp_path / "finalizing"
  workdir = "gs://bucket/run" if gcs else str(tmp_path / "run")
  here = os.path.dirname(os.path.abspath(__file__))   # test_checkpoints.py
  script = _KILLED_SAVE.format(repo=_REPO, tests=here,
                               marker=str(marker), root=str(tmp_path),
                               gcs=gcs, workdir=workdir)
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  proc = subprocess.Popen([sys.executable, "-c", script], env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
  deadline = time.time() + 240
  while not marker.exists() and proc.poll() is None and time.time() < deadline:
    time.sleep(0.05)
  assert proc.poll() is None and marker.exists(), proc.communicate()[0][-3000:]
  proc.send_signal(signal.SIGKILL)
  proc.communicate(timeout=60)
  assert proc.returncode == -signal.SIGKILL

  local = tmp_path / ("bucket/run" if gcs else "run") / "checkpoints"
  names = sorted(os.listdir(local))
  if gcs:
    assert names == ["2", "4"]
    assert not (local / "4" / "commit_success.txt").exists()
    assert (local / "4" / "state").is_dir()   # its arrays were written
  else:
    assert names[0] == "2" and len(names) == 2
    assert names[1].startswith("4.orbax-checkpoint-tmp")
  with fake_gcs(tmp_path) if gcs else contextlib.nullcontext():
    mngr = checkpoint.manager(workdir, 3)
    assert mngr.all_steps() == [2]
    mngr.close()
    state, meta, step = checkpoint.read(workdir)
  assert step == meta["step"] == 2
  np.testing.assert_array_equal(state["params"]["w"], 2.0)


# --- Evaluate and export from a gs:// workdir ------------------------------


def test_evaluate_and_export_from_a_gcs_workdir(run, tmp_path, monkeypatch):
  """Both read the checkpoint through checkpoint.read and write their files
  through epath into the bucket: the same numbers and bytes as from the
  local workdir, and nothing under a local ./gs:/ folder."""
  from odin_jax import export as export_lib
  from odin_jax.evaluate import runner
  config, workdir, _, _ = run
  shutil.copytree(workdir / "checkpoints", tmp_path / "bucket/run/checkpoints")
  monkeypatch.chdir(tmp_path)
  url = "gs://bucket/run"
  local_export = export_lib.export(str(workdir), formats="npz",
                                   out_dir=str(tmp_path / "local_export"))
  with fake_gcs(tmp_path):
    assert str(checkpoint.checkpoint_dir(url)) == f"{url}/checkpoints"
    info = export_lib.export(url, formats="npz")
    metrics = runner.evaluate(config, url, which=("pictures",),
                              overrides={"picture_images": 2, "image_size": 64},
                              log_table=False)
  out = tmp_path / "bucket/run/export/step_4"
  assert info["workdir"] == url and info["out_dir"] == f"{url}/export/step_4"
  assert sorted(os.listdir(out)) == ["README.md", "backbone.npz",
                                     "export_info.json"]
  assert info["files"]["backbone.npz"]["sha256"] == \
      local_export["files"]["backbone.npz"]["sha256"]
  with open(out / "backbone.npz", "rb") as f:
    assert hashlib.sha256(f.read()).hexdigest() == \
        info["files"]["backbone.npz"]["sha256"]
  results = tmp_path / "bucket/run/eval/results_step_4.json"
  assert results.exists(), metrics
  assert glob.glob(str(tmp_path / "bucket/run/eval/step_4/*.png"))
  assert not os.path.exists(tmp_path / "gs:")
