"""Set-up code shared by several test files (fixtures are in conftest.py).

What lives here, and the arrays it hands out:

* `REPO`: the repository root (the cwd of the command-line subprocesses).
* Tiny train steps: `train_setup(config)` builds a config's model, optimizer
  and initial state (100-step schedules, PRNGKey(0)); `jit_train_step` jits
  the shared train step over a mesh of `devices` (state replicated, batch
  sharded); `run_steps` runs it. `synthetic_batch(config, seed)` is their
  batch: views uint8 [B, S, S, 3], masks int32 [B, S, S] of 16x16 blocks
  with ids 0..5, index int32 [B] (B = config.batch_size, S =
  config.image_size). One definition keeps the compiled programs identical
  across files, so they come from the persistent XLA cache.
* Checkpoints without training: `perturbed(params)` moves every array off
  its initialisation; `write_checkpoint` saves a state as train.py does.
* Offline TFDS datasets: `OfflineCodePath` (builder mixin) and
  `prepare_offline`; `OdinTestPhotos`, six JPEG photo crops 90x120 with
  labels and file names (`photos()`), as ArrayRecord files in two shards
  (`prepare_photos`), and `photos_config`, a :test config reading it.
* Photos: `photo(name, ...)`, a uint8 [h, w, 3] (or [h, w]) crop of a
  photo bundled with scikit-image.
* Evaluation: `central_square` (an independent crop + nearest resize) and
  `run_eval_cli` (`python -m odin_jax.evaluate` at random init).
"""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys

from etils import epath
import jax
import numpy as np
from skimage import data as skdata
import tensorflow_datasets as tfds

from configs import detcon_b
from odin_jax import checkpoint, methods, sharding, step

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# The FH setting of the photo tests (records, TFDS source, precompute).
FH = "fh:scale=100,sigma=0.8,min_size=50"


# --- Tiny train steps ---------------------------------------------------------


def train_setup(config):
  """(model, tx, lr, ema, initial state) of `config` (100-step schedules
  with 10 warm-up steps, PRNGKey(0))."""
  model = methods.get(config).network()
  lr = step.learning_rate_schedule(config, 100, 10)
  ema = step.ema_decay_schedule(config, 100)
  tx = step.make_optimizer(config, lr)
  state = step.create_train_state(config, model, tx, jax.random.PRNGKey(0))
  return model, tx, lr, ema, state


def jit_train_step(config, devices):
  """(jitted train step, initial state, mesh, replicated sharding) on a
  mesh of `devices`: the state replicated, the batch sharded."""
  model, tx, lr, ema, state = train_setup(config)
  mesh = sharding.make_mesh(devices)
  rep = sharding.replicated(mesh)
  fn = jax.jit(step.make_train_step(config, model, tx, lr, ema, mesh),
               in_shardings=(rep, sharding.batch_sharded(mesh)),
               out_shardings=(rep, rep))
  return fn, state, mesh, rep


def synthetic_batch(config, seed=0):
  """Random views and blocky masks (16x16 blocks, ids 0..5), batch `seed`."""
  rng = np.random.default_rng(seed)
  b, s = config.batch_size, config.image_size
  blocks = rng.integers(0, 6, size=(2, b, s // 16, s // 16))
  masks = np.kron(blocks, np.ones((16, 16), np.int64)).astype(np.int32)
  views = rng.integers(0, 256, (2, b, s, s, 3), dtype=np.uint8)
  return {"view1": views[0], "view2": views[1],
          "mask1": masks[0], "mask2": masks[1],
          "index": np.arange(seed * b, (seed + 1) * b, dtype=np.int32)}


def run_steps(config, devices, steps=2):
  """(losses, final host state) of `steps` steps on synthetic batches."""
  fn, state, mesh, rep = jit_train_step(config, devices)
  state = jax.device_put(state, rep)
  losses = []
  for i in range(steps):
    state, metrics = fn(state, sharding.to_global(mesh,
                                                  synthetic_batch(config, i)))
    losses.append(float(metrics["train/loss"]))   # blocks: see the brief
  return losses, jax.device_get(state)


# --- Checkpoints without training ---------------------------------------------


def perturbed(params, seed=0, scale=0.3):
  """Host arrays: each leaf plus scale x its std x standard normal noise."""
  noise = np.random.default_rng(seed)
  return jax.tree.map(
      lambda x: np.asarray(x) + scale * np.std(x) * noise.standard_normal(
          x.shape).astype(np.float32), params)


def write_checkpoint(workdir, state, config) -> None:
  """Saves `state` in workdir/checkpoints as train.py's writer does."""
  mngr = checkpoint.manager(str(workdir), config.max_to_keep)
  checkpoint.save(mngr, state, config)
  mngr.wait_until_finished()
  mngr.close()


# --- Offline TFDS datasets ----------------------------------------------------


class OfflineCodePath:
  """Mixin (first base) for a builder defined in a tests.* module.

  TFDS 4.9.10 finds the code of a builder in a dotted module through the
  package `importlib_resources`, which it requires only on Python < 3.9
  and is not installed here; this file is the code path (tests/ holds no
  checksums.tsv: nothing is downloaded).
  """

  @tfds.core.utils.classproperty
  @classmethod
  def code_path(cls):
    return epath.Path(__file__)


def prepare_offline(builder, **download_config):
  """builder.download_and_prepare without GCS; returns the builder."""
  builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
      try_download_gcs=False, **download_config))
  return builder


# --- Photos -------------------------------------------------------------------


def photo(name, top=0, left=0, h=90, w=120):
  """A 90x120 (strided 2x) crop of a bundled photo, uint8 RGB or gray."""
  image = np.asarray(getattr(skdata, name)())
  return np.ascontiguousarray(image[top:top + 2 * h:2, left:left + 2 * w:2])


PHOTOS_NAME = "odin_test_photos"
_CROPS = [("astronaut", 40, 60), ("coffee", 100, 200), ("chelsea", 50, 100),
          ("rocket", 100, 200), ("immunohistochemistry", 0, 0),
          ("astronaut", 250, 200)]


@functools.lru_cache(maxsize=None)
def photos() -> dict:
  """OdinTestPhotos' examples: {file name: (uint8 [90, 120, 3], label)}."""
  return {f"photo{i}.jpg": (photo(n, top, left), i % 3)
          for i, (n, top, left) in enumerate(_CROPS)}


class OdinTestPhotos(OfflineCodePath, tfds.core.GeneratorBasedBuilder):
  """Six 90x120 RGB photo crops, JPEG-encoded, labels 0..2."""

  VERSION = tfds.core.Version("1.0.0")

  def _info(self):
    features = tfds.features.FeaturesDict({
        "image": tfds.features.Image(shape=(None, None, 3),
                                     encoding_format="jpeg"),
        "label": tfds.features.ClassLabel(names=["a", "b", "c"]),
        "file_name": tfds.features.Text()})
    return tfds.core.DatasetInfo(builder=self, features=features)

  def _split_generators(self, dl_manager):
    del dl_manager   # nothing to download
    return {"train": self._generate_examples()}

  def _generate_examples(self):
    for name, (image, label) in photos().items():
      yield name, {"image": image, "label": label, "file_name": name}


def photos_config(data_dir: str):
  """detcon_b :test reading OdinTestPhotos from data_dir: 32-px views, FH
  masks (scale 100, min size 50) recomputed on its pixels."""
  c = detcon_b.get_config("test")
  c.image_size = 32
  c.dataset.name, c.dataset.data_dir = PHOTOS_NAME, data_dir
  c.masks.method, c.masks.fh_scale, c.masks.fh_min_size = "fh", 100.0, 50
  return c


def prepare_photos(data_dir: str) -> str:
  """Writes OdinTestPhotos (ArrayRecord, shards of 3 and 3) in data_dir."""
  builder = prepare_offline(
      OdinTestPhotos(data_dir=data_dir, file_format="array_record"),
      num_shards=2)
  assert builder.info.splits["train"].shard_lengths == [3, 3]
  return data_dir


# --- Evaluation ---------------------------------------------------------------


def central_square(array, size):
  """Independent of the runner: central square, nearest sampling."""
  h, w = array.shape[:2]
  side = min(h, w)
  crop = array[(h - side) // 2:(h - side) // 2 + side,
               (w - side) // 2:(w - side) // 2 + side]
  idx = np.floor((np.arange(size) + 0.5) * side / size).astype(int)
  return crop[np.ix_(idx, idx)]


def default_optimisation_env() -> dict:
  """This process's environment without conftest.FAST_COMPILE_FLAGS: for a
  subprocess whose numbers must match ones recorded at XLA's default
  optimisation level."""
  from tests import conftest  # pylint: disable=g-import-not-at-top
  env = dict(os.environ)
  flags = env.get("XLA_FLAGS", "")
  for flag in conftest.FAST_COMPILE_FLAGS.split():
    flags = flags.replace(flag, "")
  env["XLA_FLAGS"] = " ".join(flags.split())
  return env


def run_eval_cli(workdir, evals: str, sets: dict):
  """`python -m odin_jax.evaluate` on the :test network at random init with
  --set=KEY=VALUE for each of `sets`; returns (process, results JSON)."""
  proc = subprocess.run(
      [sys.executable, "-m", "odin_jax.evaluate",
       "--config=configs/detcon_b.py:test", f"--workdir={workdir}",
       "--source=random", f"--evals={evals}", "--tensorboard=false",
       *[f"--set={k}={v}" for k, v in sets.items()]],
      cwd=REPO, capture_output=True, text=True, env=dict(os.environ),
      timeout=600, check=False)
  assert proc.returncode == 0, proc.stderr[-3000:]
  with open(os.path.join(workdir, "eval", "results_random.json"),
            encoding="utf-8") as f:
    return proc, json.load(f)
