"""The evaluation runner and `python -m odin_jax.evaluate` on a tiny run."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import threading

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from configs import detcon_b
from odin_jax import step
from odin_jax.evaluate import datasets, features, grids, knn, runner
from odin_jax.evaluate import settings as settings_lib
from odin_jax.models import network
from tests import helpers

# Small everything: 4 scenes, a 4x4 stage4 grid (96-px test scenes resized
# to 128, feature 'auto' = stage4), one short clip.
_SMALL = {"num_images": 4, "probe_train_images": 6, "probe_test_images": 4,
          "probe_steps": 50, "video_clips": 1, "video_frames": 4,
          "picture_images": 2, "discovery_ks": (1, 2, 4, 8),
          "spectral_ks": (2, 3), "image_size": 128, "batch_size": 8}


def _config():
  config = detcon_b.get_config("test")
  config.total_steps = 2
  return config


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
  """A workdir with a step-2 DetCon-B checkpoint, as train.py writes it.

  The state is `step.create_train_state`'s with the config's optimizer,
  saved by `checkpoint.save` (train.py's writer); the online parameters are
  perturbed so that they differ from the initialisation and from the
  target. Training two real steps instead costs ~100 s of XLA compilation
  on 2 CPU cores; test_train.py covers training.
  """
  config = _config()
  model = network.from_config(config)
  tx = step.make_optimizer(config, step.learning_rate_schedule(config, 2, 0))
  rng = jax.random.PRNGKey(config.seed)
  init = jax.jit(lambda r: step.create_train_state(config, model, tx, r))
  options = features._INIT_COMPILER_OPTIONS  # pylint: disable=protected-access
  state = init.lower(rng).compile(compiler_options=options)(rng)
  state = state.replace(step=jnp.asarray(2, jnp.int32),
                        params=helpers.perturbed(state.params))
  workdir = tmp_path_factory.mktemp("run")
  helpers.write_checkpoint(workdir, state, config)
  return workdir


def _in_unit_interval(metrics: dict) -> None:
  assert metrics
  for name, value in metrics.items():
    assert math.isfinite(value) and 0.0 <= value <= 1.0, (name, value)


@pytest.mark.slow
def test_cli_end_to_end(run_dir, tmp_path):
  """One command: every evaluation, JSON + PNG + table, finite metrics;
  TFDS datasets that are not prepared are skipped with a message."""
  sets = [f"--set={k}={','.join(map(str, v)) if isinstance(v, tuple) else v}"
          for k, v in _SMALL.items()]
  sets += ["--set=tfds_discovery=coco/2017_panoptic",
           "--set=tfds_video=davis/480p", f"--set=tfds_data_dir={tmp_path}"]
  proc = subprocess.run(
      [sys.executable, "-m", "odin_jax.evaluate",
       "--config=configs/detcon_b.py:test", f"--workdir={run_dir}", *sets],
      capture_output=True, text=True, env=dict(os.environ), timeout=600,
      check=False)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "discovery/abo_instance" in proc.stdout  # the printed table
  for name in ("coco/2017_panoptic", "davis/480p"):
    assert f"TFDS '{name}' is not prepared" in proc.stderr

  with open(run_dir / "eval" / "results_step_2.json", encoding="utf-8") as f:
    record = json.load(f)
  assert record["step"] == 2 and record["source"] == "checkpoint"
  metrics = record["metrics"]
  for name in ("discovery/abo_instance", "discovery/abo_class",
               "discovery/or_instance", "discovery/fh/abo_instance",
               "discovery/slic/abo_instance", "discovery/grid/abo_instance",
               "instances/recall_all", "video/J_mean", "video/F_mean",
               "video/JF_mean", "linear_probe/miou", "knn/accuracy"):
    assert name in metrics, name
  _in_unit_interval(metrics)
  info = record["info"]
  assert not any(k.startswith(("coco/", "davis/")) for k in metrics)
  # feature 'auto' = stage4 (no FPN, App. A.4's final hidden layer h):
  # 96-px scenes resized to 128 -> 4x4 cells, so K = 1, 2, 4, 8 all apply.
  assert info["discovery/feature"] == "stage4"
  assert info["discovery/grid"] == [4, 4]
  assert info["discovery/ks"] == [1, 2, 4, 8]
  assert info["discovery/num_images"] == 4
  png = Image.open(record["pictures"]["discovery"])
  # Two rows of image | gt | segments | PCA at the 96-px demo resolution.
  assert png.size == (4 * 96, 2 * 96 + 2)
  assert any(f.startswith("events.out.tfevents")
             for f in os.listdir(run_dir))


class _CompileCounter:
  """Names of the XLA compilations this thread runs inside the `with`.

  Listens to JAX's backend-compile duration event (jax.monitoring), which
  fires once per executable XLA builds and never for a cache hit; other
  threads (e.g. asynchronous checkpointing) are not counted.
  """

  EVENT = "/jax/core/compile/backend_compile_duration"

  def __enter__(self):
    self.names = []
    self._thread = threading.get_ident()
    jax.monitoring.register_event_duration_secs_listener(self._listen)
    return self

  def __exit__(self, *exc):
    jax.monitoring.unregister_event_duration_listener(self._listen)

  def _listen(self, event, duration, **kwargs):
    del duration
    if event == self.EVENT and threading.get_ident() == self._thread:
      self.names.append(kwargs.get("fun_name", "?"))


def test_compile_counter_sees_compilations():
  """The counter the no-recompilation tests rely on counts a fresh jit once
  and its cached second call not at all."""
  fn = jax.jit(lambda x: jnp.sin(x) * 3.0 + 1.0)
  with _CompileCounter() as first:
    fn(np.ones((3, 5), np.float32)).block_until_ready()
  with _CompileCounter() as second:
    fn(np.zeros((3, 5), np.float32)).block_until_ready()
  assert first.names == ["jit(<lambda>)"], first.names
  assert second.names == []


def test_second_evaluation_compiles_nothing(run_dir):
  """A second in-memory evaluation (what every periodic call after the first
  is) reuses the compiled feature extractor and k-means: no XLA compilation,
  even with other parameter values."""
  config = _config()
  params, batch_stats, _ = features.load_params(config, str(run_dir))
  # 160 px (stage4: 5x5), a grid no other test here compiles for, so the
  # first call has to compile.
  overrides = dict(_SMALL, image_size=160)
  kwargs = dict(which="periodic", overrides=overrides, log_table=False)
  workdir = str(run_dir / "recompile")
  with _CompileCounter() as first:
    before = runner.evaluate(config, workdir, params=params,
                             batch_stats=batch_stats, step=1, **kwargs)
  moved = jax.tree.map(lambda x: x * 1.5, params)
  with _CompileCounter() as second:
    after = runner.evaluate(config, workdir, params=moved,
                            batch_stats=batch_stats, step=2, **kwargs)
  assert any("kmeans" in n for n in first.names), first.names
  assert any("apply" in n for n in first.names), first.names
  assert second.names == [], second.names
  assert set(after) == set(before)
  _in_unit_interval(after)


class _Writer:
  """Records what `evaluate` writes (a CLU MetricWriter's interface)."""

  def __init__(self):
    self.scalars, self.images = {}, {}

  def write_scalars(self, step, scalars):
    self.scalars[step] = dict(scalars)

  def write_images(self, step, images):
    self.images[step] = {k: np.asarray(v) for k, v in images.items()}

  def flush(self):
    pass


def test_in_memory_params_match_checkpoint_and_feed_writer(run_dir):
  """The training loop's call (in-memory params, a writer) gives the
  checkpoint's numbers at that step."""
  config = _config()
  which = ("discovery", "pictures")
  from_ckpt = runner.evaluate(config, str(run_dir), which=which,
                              overrides=_SMALL)
  params, batch_stats, step = features.load_params(config, str(run_dir))
  assert step == 2
  writer = _Writer()
  in_memory = runner.evaluate(config, str(run_dir / "live"), params=params,
                              batch_stats=batch_stats, step=7, which=which,
                              writer=writer, overrides=_SMALL)
  assert in_memory == from_ckpt
  assert writer.scalars[7]["eval/discovery/abo_instance"] == \
      in_memory["discovery/abo_instance"]
  assert writer.images[7]["eval/discovery"].shape == (1, 2 * 96 + 2, 4 * 96,
                                                      3)
  assert (run_dir / "live" / "eval" / "results_step_7.json").is_file()
  assert (run_dir / "live" / "eval" / "step_7" / "discovery.png").is_file()


def test_each_evaluation_is_its_modules_run(run_dir):
  """runner.evaluate is a loop over the registry: each module's run(ctx),
  called directly, gives exactly the runner's numbers, and discovery's are
  clustering.kmeans_segmentations' proposals scored by discovery.score."""
  from odin_jax.evaluate import abo as discovery, clustering, instances
  config = _config()
  which = ("discovery", "instances", "knn")
  params, batch_stats, _ = features.load_params(config, str(run_dir))
  expected = runner.evaluate(config, str(run_dir / "direct"), params=params,
                             batch_stats=batch_stats, step=2, which=which,
                             overrides=_SMALL, log_table=False)
  settings = settings_lib.settings_from_config(config, **_SMALL)
  ctx = runner.make_context(config, settings, params, batch_stats,
                            "checkpoint")
  got = {}
  for module in (discovery, instances, knn):
    got.update(module.run(ctx).metrics)
  assert got == expected
  assert runner.REGISTRY["linear_probe"] == "probes"
  assert runner.run_fn("discovery") is discovery.run

  scenes = ctx.scenes(settings.num_images)
  feats = ctx.scene_features(settings.num_images)
  ks = ctx.ks(feats.shape[1:3])
  maps = clustering.kmeans_segmentations(
      feats, ks, key=ctx.stream("discovery"),
      image_hw=scenes.instances.shape[1:], batch_size=settings.batch_size,
      k_max=max(ks))
  assert maps.shape == (len(scenes), len(ks)) + scenes.instances.shape[1:]
  result = discovery.score(scenes, maps)
  assert expected["discovery/abo_instance"] == result["abo_instance"]


def test_random_init_and_mask_sources(run_dir):
  config = _config()
  random = runner.evaluate(config, str(run_dir), source="random",
                           which=("discovery",), overrides=_SMALL)
  _in_unit_interval(random)
  trained = runner.evaluate(config, str(run_dir), which=("discovery",),
                            overrides=_SMALL)
  # Different networks, same scenes and mask baselines.
  assert random["discovery/abo_instance"] != trained["discovery/abo_instance"]
  assert random["discovery/fh/abo_instance"] == \
      trained["discovery/fh/abo_instance"]
  assert (run_dir / "eval" / "results_random.json").is_file()

  fh = runner.evaluate(config, str(run_dir), source="masks:fh",
                       which=("discovery", "video", "pictures"),
                       overrides=_SMALL)
  # A mask set scored as the proposals = the same set as a baseline.
  assert fh["discovery/abo_instance"] == trained["discovery/fh/abo_instance"]
  assert not any(k.startswith("video/") for k in fh)  # no features: skipped
  with open(run_dir / "eval" / "results_masks_fh.json",
            encoding="utf-8") as f:
    assert "video/skipped" in json.load(f)["info"]


def test_ground_truth_masks_are_perfect_proposals(run_dir):
  gt = runner.evaluate(_config(), str(run_dir), source="masks:gt",
                       which=("discovery",), overrides=_SMALL)
  assert gt["discovery/abo_instance"] == 1.0
  assert gt["discovery/or_instance"] == 1.0
  grid = runner.evaluate(_config(), str(run_dir), source="masks:grid",
                         which=("discovery",), overrides=_SMALL)
  assert grid["discovery/abo_instance"] < 0.9


def test_load_params_errors(run_dir, tmp_path):
  config = _config()
  with pytest.raises(FileNotFoundError, match="No checkpoint"):
    features.load_params(config, str(tmp_path))
  with pytest.raises(ValueError, match="available: \\[2\\]"):
    features.load_params(config, str(run_dir), step=5)
  wider = _config()
  wider.model.width = 0.25
  with pytest.raises(ValueError, match="do not fit the network"):
    features.load_params(wider, str(run_dir))
  with pytest.raises(ValueError, match="has no 'tau'"):
    features.load_params(config, str(run_dir), params_key="tau")
  with pytest.raises(ValueError, match="has no 'tau'"):   # τ's older name
    features.load_params(config, str(run_dir), params_key="discovery_params")
  target, _, _ = features.load_params(config, str(run_dir),
                                    params_key="target_params")
  online, _, _ = features.load_params(config, str(run_dir))
  assert any(not np.array_equal(a, b) for a, b in
             zip(jax.tree.leaves(target), jax.tree.leaves(online)))


def test_settings_and_helpers():
  config = _config()
  with pytest.raises(ValueError, match="Unknown eval setting"):
    settings_lib.settings_from_config(config, num_imgs=3)
  parsed = settings_lib.parse_overrides(["discovery_ks=1,2,4", "image_size=64",
                                   "feature=stage3", "tfds_data_dir=None"])
  assert parsed == {"discovery_ks": (1, 2, 4), "image_size": 64,
                    "feature": "stage3", "tfds_data_dir": None}
  settings = settings_lib.settings_from_config(config, **parsed)
  assert settings.discovery_ks == (1, 2, 4)
  assert settings.num_images == config.eval.num_images  # from config.eval
  with pytest.raises(ValueError, match="Unknown evaluations"):
    runner.evaluate(config, "/nonexistent", which="discovry")

  # eval.feature='auto' = Odin App. A.4: the final hidden layer h of a plain
  # ResNet / Swin / ViT, the projections z with an FPN; 1024 px for the
  # paper presets (ResNet stage4: 32x32, FPN p2: 256x256), ViT 448 (B/8:
  # 56x56), 256 at demo scale.
  from configs import odin
  paper = detcon_b.get_config()
  assert features.default_feature(paper) == "stage4"
  assert paper.eval.image_size == 1024
  assert network.feature_grid(paper, 1024) == (32, 32)
  odin_paper = odin.get_config()
  assert features.default_feature(odin_paper) == "projection"
  assert network.feature_grid(odin_paper, odin_paper.eval.image_size) == (
      256, 256)
  assert features.default_feature(detcon_b.get_config("swin_t")) == "stage4"
  vit = detcon_b.get_config("vit_b8")
  assert features.default_feature(vit) == "tokens"
  assert network.feature_grid(vit, vit.eval.image_size) == (56, 56)
  demo = detcon_b.get_config("demo")
  assert demo.eval.image_size == 256
  # The demo's scenes are too small for stride 32 at 256 px (8x8 cells):
  # it clusters stage3 (16x16); an FPN keeps its projections.
  assert features.default_feature(demo) == "stage3"
  assert features.default_feature(odin.get_config("demo")) == "projection"
  assert features.default_feature(detcon_b.get_config("test")) == "stage4"
  # --set=resnet_feature=... (an EvalSettings override) reaches 'auto'.
  settings = settings_lib.settings_from_config(demo, resnet_feature="stage4")
  assert features.FeatureSource(demo, {}, {}, settings.feature,
                              resnet_feature=settings.resnet_feature
                              ).feature == "stage4"
  assert features.FeatureSource(demo, {}, {}).feature == "stage3"

  classes = np.zeros((3, 4, 4), np.int32)
  classes[0, :2] = 2       # class 2: 8 px
  classes[0, 3, :3] = 5    # class 5: 3 px
  classes[1, :, :1] = 1
  classes[1, :, 1:3] = 4
  np.testing.assert_array_equal(knn.dominant_class(classes), [2, 4, 0])

  feats = np.arange(8 * 8 * 2, dtype=np.float32).reshape(8, 8, 2)
  pool_cells = grids.pool_cells
  pooled = pool_cells(feats, 16)
  assert pooled.shape == (4, 4, 2)
  np.testing.assert_allclose(pooled[0, 0], feats[:2, :2].mean((0, 1)))
  assert pool_cells(feats, 64) is feats


def test_coco_panoptic_instances():
  """Thing instances from a panoptic id image; crowd and stuff dropped."""
  ids = np.zeros((4, 6), np.int64)
  ids[:2, :3] = 5           # thing, label 0
  ids[2:, :3] = 300         # crowd thing
  ids[:, 3:5] = 70000       # thing, label 79
  ids[:, 5] = 9             # stuff (label 80)
  pan = np.stack([ids % 256, (ids // 256) % 256, ids // 65536], -1)
  example = {"panoptic_image": pan.astype(np.uint8),
             "panoptic_objects": {"id": np.array([5, 300, 70000, 9]),
                                  "label": np.array([0, 3, 79, 80]),
                                  "is_crowd": np.array([False, True, False,
                                                        False])}}
  inst, cls = datasets.coco_panoptic_instances(example)
  expected_inst = np.zeros((4, 6), np.int32)
  expected_inst[:2, :3] = 1
  expected_inst[:, 3:5] = 2
  np.testing.assert_array_equal(inst, expected_inst)
  np.testing.assert_array_equal(cls, np.where(expected_inst == 1, 1,
                                              np.where(expected_inst == 2,
                                                       80, 0)))


@pytest.mark.slow
def test_periodic_eval_during_training(tmp_path, monkeypatch):
  """Periodic evaluations run before the first step and every every_steps;
  the second one compiles nothing (the first call's programs are reused)."""
  from configs import detcon_b
  from odin_jax import train
  config = detcon_b.get_config("test")
  config.total_steps, config.eval.every_steps = 2, 2
  compiled = {}
  evaluate = runner.evaluate

  def counted(*args, **kwargs):
    with _CompileCounter() as counter:
      out = evaluate(*args, **kwargs)
    compiled[kwargs["step"]] = counter.names
    return out

  monkeypatch.setattr(runner, "evaluate", counted)
  train.train_and_evaluate(config, str(tmp_path))
  for s in (0, 2):   # before the first step and at the end
    path = tmp_path / "eval" / f"results_step_{s}.json"
    assert path.exists(), sorted(os.listdir(tmp_path / "eval"))
  assert sorted(compiled) == [0, 2]
  assert compiled[2] == [], compiled[2]
