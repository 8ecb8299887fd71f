"""Checkpoints written by an older odin_jax restore and train on.

The fixtures (tests/fixtures/old_checkpoints, README there) are DetCon-B and
Odin `:test` runs at step 2 written by commit 65332c5, whose config lacks
fields added since (loss.mask_sampling, loss.negatives, ...) and holds one
renamed since (loss.local_negatives). config_compat.translate_config reads them
as the behaviour of the code that wrote them.
"""
import json
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest

from configs import detcon_b, odin
from odin_jax import checkpoint, config_compat, reporting, train
from tests import helpers

FIXTURES = "tests/fixtures/old_checkpoints"


def test_translation_of_an_old_config():
  old = {"loss.local_negatives": True, "eval.tfds_image_size": 256,
         "loss.name": "detcon"}
  new, notes = config_compat.translate_config(old)
  assert new == {"loss.negatives": "device", "loss.name": "detcon",
                 "loss.mask_sampling": "shared", "warmup_fraction": 0.0}
  assert len(notes) == 4 and "loss.local_negatives=True" in notes[0]
  # Method sections were switched by '<section>.enabled' in every config;
  # config.method selects the method now and only its config has them.
  odin_then = {"method": "odin", "odin.enabled": True, "odin.num_clusters": 16,
               "odin.image_every_steps": 200, "r2o.enabled": False,
               "r2o.k_start": 128, "warmup_fraction": 0.0,
               "loss.mask_sampling": "shared"}
  new, notes = config_compat.translate_config(odin_then)
  assert new == {"method": "odin", "odin.num_clusters": 16,
                 "warmup_fraction": 0.0, "loss.mask_sampling": "shared"}
  assert len(notes) == 3, notes
  r2o_then = {"method": "r2o", "odin.enabled": False, "odin.span_scale": 1.0,
              "odin.num_clusters": 16, "r2o.enabled": True,
              "r2o.k_start": 128, "warmup_fraction": 0.01,
              "loss.mask_sampling": "all"}
  new, _ = config_compat.translate_config(r2o_then)
  assert new == {"method": "r2o", "r2o.k_start": 128, "r2o.span_scale": 1.0,
                 "r2o.cluster_view": "spanning", "warmup_fraction": 0.01,
                 "loss.mask_sampling": "all"}
  # Today's checkpoints hold every field: nothing to translate.
  now = {"loss.local_negatives": None, "loss.negatives": "global",
         "loss.mask_sampling": "per_view", "warmup_fraction": 0.01,
         "r2o.cluster_view": "image"}
  assert config_compat.translate_config(now) == (
      {k: v for k, v in now.items() if k != "loss.local_negatives"}, [])


@pytest.mark.parametrize("module", [detcon_b, odin], ids=["detcon_b", "odin"])
def test_old_checkpoint_restores_and_trains_on(module, tmp_path):
  name = module.__name__.split(".")[-1]
  workdir = tmp_path / name
  shutil.copytree(f"{FIXTURES}/{name}", workdir)
  saved, meta, used = checkpoint.read(str(workdir))
  assert used == 2 and meta["step"] == 2
  config = module.get_config("test")
  config.total_steps, config.log_every_steps = 4, 1
  # Today's defaults differ from what the old code did: resuming needs the
  # old behaviour, and the refusal says which field and value.
  with pytest.raises(ValueError, match="loss.mask_sampling"):
    train.train_and_evaluate(config, str(workdir))
  config.loss.mask_sampling = "shared"   # (r2o.* is off: not compared)
  state = train.train_and_evaluate(config, str(workdir))
  assert int(state.step) == 4
  records = reporting.read_metrics(str(workdir))
  assert [r["step"] for r in records] == [3, 4]
  assert all(np.isfinite(r["train/loss"]) for r in records)
  # The run went on from the old parameters: step 3's state is one update
  # away from them (same tree, arrays that moved but stayed close).
  final = jax.device_get(state.params)
  old = saved["params"]
  flat_old = jax.tree.leaves(old)
  flat_new = jax.tree.leaves(final)
  assert len(flat_old) == len(flat_new)
  moved = [float(np.abs(a - b).max()) for a, b in zip(flat_old, flat_new)]
  assert max(moved) > 0 and max(moved) < 1.0


@pytest.mark.parametrize("module", [detcon_b, odin], ids=["detcon_b", "odin"])
def test_checkpoint_continues_to_the_recorded_losses(module, tmp_path):
  # Written at c97bd70 (step 2 of 4); the uninterrupted run's losses at
  # steps 3 and 4 are recorded beside it. Restoring and training on must
  # give them again, whatever the code's layout has become since.
  name = module.__name__.split(".")[-1]
  fixture = f"tests/fixtures/checkpoints_c97bd70/{name}"
  workdir = tmp_path / name
  shutil.copytree(f"{fixture}/checkpoints", workdir / "checkpoints")
  with open(f"{fixture}/expected_losses.json", encoding="utf-8") as f:
    expected = {int(k): v for k, v in json.load(f).items()}
  # The losses were recorded at XLA's default optimisation level; the suite
  # compiles at -O0 (conftest.py), whose ~1e-7 rounding differences can flip
  # one of Odin's k-means assignments. So the run is the user's command, in
  # a subprocess at the default level.
  done = subprocess.run(
      [sys.executable, "-m", "odin_jax.main",
       f"--config=configs/{name}.py:test", f"--workdir={workdir}",
       "--config.total_steps=4", "--config.log_every_steps=1",
       "--config.checkpoint_every_steps=2", "--config.max_to_keep=2"],
      env=helpers.default_optimisation_env(), capture_output=True, text=True,
      timeout=1200, check=False)
  assert done.returncode == 0, done.stderr[-4000:]
  assert checkpoint.read(str(workdir))[1]["step"] == 4
  got = {r["step"]: r["train/loss"]
         for r in reporting.read_metrics(str(workdir))}
  assert sorted(got) == sorted(expected)
  for s in expected:   # float32 on another CPU: rounding, not behaviour
    np.testing.assert_allclose(got[s], expected[s], rtol=1e-4)
