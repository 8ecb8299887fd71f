"""BYOL's linear evaluation (evaluate/linear.py, linear_data.py): the
classifier's training and top-k against independent computations, the
crops, and the `--evals=imagenet_linear` command on a small TFDS
classification dataset written here offline (six colour/stripe classes,
JPEG, 'train' and 'validation' splits, like imagenet2012's), evaluating a
`:test` checkpoint.
"""

from __future__ import annotations

import colorsys
import json
import math
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from configs import detcon_b
from odin_jax.evaluate import context
from odin_jax.evaluate import features
from odin_jax.evaluate import linear
from odin_jax.evaluate import linear_data
from odin_jax.evaluate import settings as settings_lib
from tests import helpers
from tests.helpers import REPO

NAME = "odin_linear_shapes"
NUM_CLASSES = 6
SHAPES = ((72, 96), (96, 72), (80, 80))
COUNTS = {"train": 36, "validation": 18}


def _image(label: int, index: int, rng) -> np.ndarray:
  """Class `label`: its own hue and stripe period, random phase and size."""
  h, w = SHAPES[index % len(SHAPES)]
  rgb = np.array(colorsys.hsv_to_rgb(label / NUM_CLASSES, 0.8, 0.9))
  period = 4 + 2 * label
  stripes = ((np.arange(w) + rng.integers(period)) // (period // 2)) % 2
  image = rgb * (0.6 + 0.4 * stripes)[None, :, None] * np.ones((h, 1, 1))
  image += 0.05 * rng.standard_normal(image.shape)
  return (np.clip(image, 0, 1) * 255).astype(np.uint8)


class OdinLinearShapes(helpers.OfflineCodePath,
                       tfds.core.GeneratorBasedBuilder):
  """Six classes of striped colour images, 36 train / 18 validation."""

  VERSION = tfds.core.Version("1.0.0")

  def _info(self):
    return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
        "image": tfds.features.Image(shape=(None, None, 3),
                                     encoding_format="jpeg"),
        "label": tfds.features.ClassLabel(num_classes=NUM_CLASSES)}))

  def _split_generators(self, dl_manager):
    del dl_manager   # nothing to download
    return {split: self._generate_examples(split, n)
            for split, n in COUNTS.items()}

  def _generate_examples(self, split, count):
    rng = np.random.default_rng(len(split))
    for i in range(count):
      label = i % NUM_CLASSES
      yield f"{split}{i}", {"image": _image(label, i // NUM_CLASSES, rng),
                            "label": label}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  root = str(tmp_path_factory.mktemp("tfds"))
  helpers.prepare_offline(OdinLinearShapes(data_dir=root))
  return root


# --- The classifier --------------------------------------------------------


def _numpy_topk(logits, labels, k):
  """Independent: the label's rank among the logits (stable sort) < k."""
  order = np.argsort(-logits, axis=1, kind="stable")
  return (order[:, :k] == labels[:, None]).any(axis=1)


def test_topk_matches_numpy():
  rng = np.random.default_rng(0)
  for num_classes in (3, 10):
    logits = rng.standard_normal((64, num_classes)).astype(np.float32)
    labels = rng.integers(0, num_classes, 64)
    got = np.asarray(linear.topk_correct(jnp.asarray(logits),
                                         jnp.asarray(labels), (1, 5)))
    np.testing.assert_array_equal(got[0], _numpy_topk(logits, labels, 1))
    np.testing.assert_array_equal(
        got[1], _numpy_topk(logits, labels, min(5, num_classes)))
    assert 0 < got[0].mean() < got[1].mean() <= 1
  # accuracy() skips padding rows.
  params = {"kernel": jnp.eye(10), "bias": jnp.zeros(10)}
  valid = np.arange(64) < 50
  acc, count = linear.accuracy(params, iter([(logits, labels, valid)]))
  assert count == 50
  np.testing.assert_allclose(acc, [
      _numpy_topk(logits, labels, k)[:50].mean() for k in (1, 5)])


def test_recipe_schedule_and_nesterov_step():
  """lr 0.2 x 1024 / 256 = 0.8, cosine to 0; one step = optax.sgd's
  Nesterov update at that step's lr (no weight decay)."""
  assert linear.peak_learning_rate(0.2, 1024) == pytest.approx(0.8)
  lrs = [float(linear.learning_rate(t, 100, 0.8)) for t in (0, 50, 100, 150)]
  np.testing.assert_allclose(lrs, [0.8, 0.4, 0.0, 0.0], atol=1e-7)
  rng = np.random.default_rng(1)
  x = jnp.asarray(rng.standard_normal((8, 5)), jnp.float32)
  y = jnp.asarray(rng.integers(0, 3, 8))
  state = linear.init_state(jax.random.PRNGKey(0), 5, 3, 0.9)
  ref_tx = optax.sgd(optax.cosine_decay_schedule(0.8, 10), momentum=0.9,
                     nesterov=True)
  ref_params, ref_opt = state[0], ref_tx.init(state[0])

  def loss(p):
    return optax.softmax_cross_entropy_with_integer_labels(
        linear.logits_of(p, x), y).mean()
  for t in range(3):
    state, _ = linear.train_step(state, x, y, t, 10, 0.8, 0.0, momentum=0.9)
    updates, ref_opt = ref_tx.update(jax.grad(loss)(ref_params), ref_opt,
                                     ref_params)
    ref_params = optax.apply_updates(ref_params, updates)
  for k in ("kernel", "bias"):
    np.testing.assert_allclose(state[0][k], ref_params[k], rtol=1e-5,
                               atol=1e-6)


def test_separable_features_reach_full_accuracy():
  """Features linearly separable by construction (class means far apart
  relative to the noise, in 32-d): the recipe's classifier classifies held-
  out points perfectly; with shuffled labels it stays near chance."""
  rng = np.random.default_rng(2)
  num_classes, dim, batch = 10, 32, 64
  means = 3.0 * rng.standard_normal((num_classes, dim))

  def sample(n, shuffle=False):
    labels = rng.integers(0, num_classes, n)
    feats = means[labels] + 0.5 * rng.standard_normal((n, dim))
    if shuffle:
      labels = rng.permutation(labels)
    return feats.astype(np.float32), labels

  def batches(shuffle=False):
    while True:
      yield sample(batch, shuffle)

  test_x, test_y = sample(500)
  for shuffle, lo, hi in ((False, 0.995, 1.0), (True, 0.0, 0.3)):
    params, loss = linear.train_classifier(
        batches(shuffle), 200, dim, num_classes, key=jax.random.PRNGKey(0),
        peak_lr=linear.peak_learning_rate(0.2, batch))
    acc, count = linear.accuracy(params, iter([(test_x, test_y,
                                                np.ones(500, bool))]))
    assert count == 500
    assert lo <= acc[0] <= hi, (shuffle, acc, loss)
    assert acc[1] >= acc[0]


# --- Crops -----------------------------------------------------------------


def test_center_view_takes_the_central_0875_square():
  """A 72x96 image whose central 63x63 square (int(0.875 x 72), offsets
  (72 - 63 + 1) // 2 = 5 and (96 - 63 + 1) // 2 = 17) is one colour and the
  rest another: the test view shows only the inside colour."""
  image = np.zeros((72, 96, 3), np.uint8)
  image[...] = (200, 20, 20)
  image[5:68, 17:80] = (20, 90, 210)
  view = linear_data.center_view(tf.constant(image), 64, 0.875).numpy()
  assert view.shape == (64, 64, 3) and view.dtype == np.uint8
  assert np.abs(view.astype(int) - (20, 90, 210)).max() <= 1
  # One pixel more on any side and the border colour bleeds in.
  wide = linear_data.center_view(tf.constant(image), 64, 0.9).numpy()
  assert np.abs(wide.astype(int) - (20, 90, 210)).max() > 20


def test_train_view_is_a_pure_function_of_its_seed():
  image = tf.constant(_image(2, 0, np.random.default_rng(0)))
  views = [linear_data.train_view(image, tf.constant([0, i], tf.int64),
                                 32).numpy() for i in (0, 0, 1)]
  assert views[0].shape == (32, 32, 3) and views[0].dtype == np.uint8
  np.testing.assert_array_equal(views[0], views[1])
  assert np.abs(views[0].astype(int) - views[2]).mean() > 1


# --- The command -----------------------------------------------------------


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
  """A :test DetCon-B checkpoint at step 2 (the initial state, online θ
  perturbed: tests/e2e/test_evaluate.py's recipe, without its optimizer)."""
  config = detcon_b.get_config("test")
  params, batch_stats = features.init_params(config)
  params = helpers.perturbed(params)
  from odin_jax import step as step_lib
  from odin_jax.models import network
  model = network.from_config(config)
  state = jax.eval_shape(lambda: step_lib.create_train_state(
      config, model, optax.identity(), jax.random.PRNGKey(0)))
  state = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), state)
  state = state.replace(step=np.asarray(2, np.int32), params=params,
                        target_params=params, batch_stats=batch_stats)
  workdir = tmp_path_factory.mktemp("run")
  helpers.write_checkpoint(workdir, state, config)
  return workdir


@pytest.mark.slow
def test_cli_linear_evaluation(data_dir, run_dir):
  proc = subprocess.run(
      [sys.executable, "-m", "odin_jax.evaluate",
       "--config=configs/detcon_b.py:test", f"--workdir={run_dir}",
       "--evals=imagenet_linear", "--tensorboard=false",
       f"--set=linear_dataset={NAME}", f"--set=tfds_data_dir={data_dir}"],
      cwd=REPO, capture_output=True, text=True, env=dict(os.environ),
      timeout=600, check=False)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "imagenet_linear/top1" in proc.stdout   # the printed table
  with open(run_dir / "eval" / "results_step_2.json", encoding="utf-8") as f:
    record = json.load(f)
  metrics, info = record["metrics"], record["info"]
  top1, top5 = metrics["imagenet_linear/top1"], metrics["imagenet_linear/top5"]
  for value in (top1, top5):
    assert value is not None and math.isfinite(value) and 0 <= value <= 1
  assert top5 >= top1
  # :test preset: 64 px, batch 8, 3 epochs of 36 // 8 = 4 steps; stage4 of
  # ResNet-18 x0.125 is 64-d; every validation image is scored.
  assert info["imagenet_linear/num_test"] == COUNTS["validation"]
  assert info["imagenet_linear/num_train"] == COUNTS["train"]
  assert info["imagenet_linear/steps"] == 3 * (COUNTS["train"] // 8)
  assert info["imagenet_linear/feature"] == "stage4"
  assert info["imagenet_linear/feature_dim"] == 64
  assert info["imagenet_linear/num_classes"] == NUM_CLASSES
  assert math.isfinite(info["imagenet_linear/final_train_loss"])
  assert info["imagenet_linear/num_devices"] == jax.local_device_count()
  assert record["seconds"]["imagenet_linear"] > 0


def test_the_protocol_learns_a_learnable_dataset(data_dir, run_dir,
                                                 tmp_path):
  """End to end (TFDS labels, crops, pooled features, SGD): the classes
  differ in hue and stripe period, so with enough steps (40 epochs, peak
  lr 5 x 8 / 256) the checkpoint's frozen features classify every
  validation image (measured: 1.0; 0.33 after the :test preset's 12 steps
  at lr 0.2 x 8 / 256). Labels out of step with the images could not."""
  from odin_jax.evaluate import runner
  config = detcon_b.get_config("test")
  params, batch_stats, _ = features.load_params(config, str(run_dir))
  metrics = runner.evaluate(
      config, str(tmp_path), params=params, batch_stats=batch_stats, step=0,
      which="imagenet_linear", overrides=dict(
          linear_dataset=NAME, tfds_data_dir=data_dir, linear_epochs=40,
          linear_base_lr=5.0))
  assert metrics["imagenet_linear/top1"] >= 0.9, metrics


def test_unprepared_dataset_is_skipped_with_instructions(tmp_path):
  config = detcon_b.get_config("test")
  settings = settings_lib.settings_from_config(
      config, linear_dataset="imagenet2012", tfds_data_dir=str(tmp_path))
  out = linear.run(context.Context(config, settings, features=object()))
  assert out.metrics == {}
  assert "tfds build imagenet2012" in out.info["imagenet_linear/skipped"]


def test_bad_settings_stop_with_the_field_name(data_dir):
  config = detcon_b.get_config("test")
  for name, value in (("linear_crop_fraction", 0.0), ("linear_epochs", 0),
                      ("linear_momentum", 1.0)):
    settings = settings_lib.settings_from_config(config, **{name: value})
    with pytest.raises(ValueError, match=f"eval.{name}="):
      linear.run(context.Context(config, settings, features=object()))
  settings = settings_lib.settings_from_config(
      config, linear_dataset=NAME, tfds_data_dir=data_dir,
      linear_batch_size=64)
  with pytest.raises(ValueError, match="larger than the 36 training"):
    linear.run(context.Context(config, settings, features=object()))
