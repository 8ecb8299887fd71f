"""BYOL's frozen-encoder linear evaluation on a TFDS classification dataset.

`run(ctx)` (evaluation 'imagenet_linear', `--evals=imagenet_linear`) trains
a linear classifier on the global-average-pooled backbone output of the
network the runner evaluates and reports top-1 / top-5 accuracy on the test
split. The protocol is BYOL's (paper App. C.1; deepmind-research
byol/configs/eval.py and eval_experiment.py), which DetCon and Odin reuse:

  network   the runner's source: by default the ONLINE encoder θ of the
            checkpoint, as BYOL evaluates (its eval_experiment loads
            `online_params` / `online_state`); --params=target_params gives
            the EMA ξ instead. Frozen, BatchNorm in inference mode.
  features  eval.linear_feature: 'auto' = the backbone's last map ('stage4'
            of a ResNet / Swin: 2048-d for R50; a ViT's patch 'tokens'),
            averaged over all cells. No FPN, projector or normalisation:
            the representation y of BYOL.
  train     eval.linear_train_split ('train': BYOL's TRAIN_AND_VALID, all
            1,281,167 images), random resized crop (area 8-100 %, aspect
            3/4-4/3; augment.sample_crop_box) + horizontal flip (p 0.5),
            bicubic resize to eval.linear_image_size (224); shuffled
            as BYOL (files, then a buffer of 10 batches of still-encoded
            images).
  test      eval.linear_test_split ('validation': ImageNet val, 50,000
            images), central square crop of eval.linear_crop_fraction
            (0.875 = 224 / (224 + 32)) of the short side, bicubic to 224.
  optimiser SGD, Nesterov momentum eval.linear_momentum (0.9), batch
            eval.linear_batch_size (1024), eval.linear_epochs (80) epochs
            of whole batches, lr eval.linear_base_lr (0.2) x batch / 256
            cosine-decayed to 0 over all steps without warm-up
            (byol/utils/schedules.py), no weight decay
            (eval.linear_weight_decay = 0: BYOL uses no regulariser),
            softmax cross-entropy averaged over the batch. The classifier
            is initialised like haiku's Linear (truncated normal, std
            1/sqrt(D); bias 0).
  metrics   'imagenet_linear/top1', 'imagenet_linear/top5' (k capped at
            the number of classes) over the whole test split.

Images are cropped and resized by TF (CPU; linear_data.py, the input
pipeline) and sent as uint8 (the bicubic output rounded: at most 0.5/255
from BYOL's float pixels) to the evaluation's feature function
(`FeatureSource.map_fn` of the runner's network, which scales to [0, 1];
the network normalises with the ImageNet mean / std itself), pooled on
device. Batches
are split over the local devices when they divide the batch. The dataset
is read from eval.tfds_data_dir and is never downloaded: an unprepared one
is skipped with a message saying how to prepare it (`tfds build
imagenet2012 --manual_dir=...`).

What differs from BYOL: crop boxes retry up to 10 times (torchvision's
rule) where BYOL clips a single draw to the image; no checkpointing of the
classifier during its 80 epochs (a preempted run starts over).
"""

from __future__ import annotations

import functools
import math
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging

from odin_jax.evaluate import context as context_lib
from odin_jax.evaluate import datasets
from odin_jax.evaluate import features as features_lib
from odin_jax.evaluate import linear_data

NAME = "imagenet_linear"
TOP_K = (1, 5)


# --- The classifier and its optimiser -------------------------------------


def peak_learning_rate(base_lr: float, batch_size: int) -> float:
  """BYOL's scaled lr: base_lr x batch / 256 (0.2 x 1024 / 256 = 0.8)."""
  return float(base_lr) * int(batch_size) / 256.0


def learning_rate(step, total_steps, peak):
  """Cosine decay from peak to 0 over total_steps, no warm-up (BYOL)."""
  t = jnp.minimum(jnp.asarray(step, jnp.float32), total_steps)
  return peak * 0.5 * (1.0 + jnp.cos(jnp.pi * t / total_steps))


def init_classifier(key, dim: int, num_classes: int) -> dict:
  """{'kernel' [D, C], 'bias' [C]}: haiku Linear's init (truncated normal,
  std 1/sqrt(D), bias 0)."""
  std = 1.0 / math.sqrt(dim)
  kernel = jax.random.truncated_normal(key, -2.0, 2.0, (dim, num_classes),
                                       jnp.float32) * std
  return {"kernel": kernel, "bias": jnp.zeros((num_classes,), jnp.float32)}


def logits_of(params: dict, features):
  """features [B, D] -> logits float32 [B, C]."""
  return jnp.asarray(features, jnp.float32) @ params["kernel"] + \
      params["bias"]


def init_state(key, dim: int, num_classes: int, momentum: float):
  """(classifier params, Nesterov momentum state)."""
  params = init_classifier(key, dim, num_classes)
  return params, _momentum(momentum).init(params)


def _momentum(momentum: float):
  return optax.trace(decay=momentum, nesterov=True)


@functools.partial(jax.jit, static_argnames=("momentum",))
def train_step(state, features, labels, step, total_steps, peak_lr,
               weight_decay, *, momentum: float):
  """One SGD step of the classifier on a batch.

  Args:
    state: (params, momentum state) from `init_state`.
    features: float [B, D] frozen features; labels: int [B].
    step: this step's index (0-based; the lr of `learning_rate`).
    total_steps, peak_lr, weight_decay: scalars (traced: one compilation
      serves every schedule).
    momentum: Nesterov momentum (static).
  Returns:
    (new state, mean cross-entropy of the batch before the step).
  """
  params, opt_state = state

  def loss_fn(p):
    logits = logits_of(p, features)
    return optax.softmax_cross_entropy_with_integer_labels(
        logits, labels).mean()

  loss, grads = jax.value_and_grad(loss_fn)(params)
  grads = dict(grads, kernel=grads["kernel"] + weight_decay *
               params["kernel"])   # coupled L2 (BYOL: weight_decay = 0)
  updates, opt_state = _momentum(momentum).update(grads, opt_state, params)
  lr = learning_rate(step, total_steps, peak_lr)
  params = jax.tree_util.tree_map(lambda p, u: p - lr * u, params, updates)
  return (params, opt_state), loss


@functools.partial(jax.jit, static_argnames=("ks",))
def topk_correct(logits, labels, ks: tuple = TOP_K):
  """bool [len(ks), B]: labels among the k largest logits, per k.

  k is capped at the number of classes (top-5 of 3 classes = top-3).
  """
  num_classes = logits.shape[-1]
  _, order = jax.lax.top_k(logits, min(max(ks), num_classes))
  hits = order == labels[:, None]
  return jnp.stack([hits[:, :min(k, num_classes)].any(axis=1) for k in ks])


def train_classifier(batches, num_steps: int, dim: int, num_classes: int, *,
                     key, peak_lr: float, momentum: float = 0.9,
                     weight_decay: float = 0.0, log_every: int = 0):
  """Trains the linear classifier on `num_steps` batches.

  Args:
    batches: iterator of (features float [B, D], labels int [B]) (device or
      host arrays), at least num_steps of them.
    num_steps: SGD steps (the cosine schedule's length).
    dim, num_classes: D and C.
    key: PRNG key of the initialisation.
    peak_lr, momentum, weight_decay: the recipe.
    log_every: log the loss every this many steps (0: never).
  Returns:
    (params {'kernel', 'bias'}, mean loss of the last min(100, num_steps)
    steps).
  """
  if num_steps < 1:
    raise ValueError(f"num_steps must be >= 1, got {num_steps}")
  state = init_state(key, dim, num_classes, momentum)
  losses = []
  for step in range(num_steps):
    try:
      features, labels = next(batches)
    except StopIteration:
      raise ValueError(f"The batches ran out after {step} of {num_steps} "
                       "steps.") from None
    state, loss = train_step(state, features, labels, step, num_steps,
                             peak_lr, weight_decay, momentum=momentum)
    losses.append(loss)
    if log_every and (step + 1) % log_every == 0:
      logging.info("Linear evaluation: step %d/%d, loss %.4f.", step + 1,
                   num_steps, float(loss))
  tail = np.asarray(jax.device_get(losses[-100:]), np.float64)
  return state[0], float(tail.mean())


def accuracy(params: dict, batches, ks: tuple = TOP_K) -> tuple:
  """(top-k accuracies [len(ks)] over every example, number of examples).

  batches: iterator of (features [B, D], labels [B], valid bool [B]);
  invalid rows (padding) are not counted.
  """
  correct = np.zeros(len(ks), np.int64)
  count = 0
  for features, labels, valid in batches:
    hits = np.asarray(topk_correct(logits_of(params, features),
                                   jnp.asarray(labels), ks))
    valid = np.asarray(valid, bool)
    correct += hits[:, valid].sum(axis=1)
    count += int(valid.sum())
  if count == 0:
    raise ValueError("No test example.")
  return correct / count, count


# --- Features --------------------------------------------------------------


def default_feature(config) -> str:
  """eval.linear_feature 'auto': a ViT's 'tokens', else 'stage4' (the
  backbone's last map; an FPN, if any, is not part of the backbone)."""
  if config.model.get("backbone", "resnet") == "vit":
    return "tokens"
  return "stage4"


_POOLED_FNS: dict = {}


class PooledFeatures:
  """Frozen pooled features on device: uint8 [B, S, S, 3] -> float32 [B, D].

  Wraps the evaluation's feature function (FeatureSource.map_fn) and
  averages the map over its cells, in one program per (network, feature,
  size). The batch is split over the local
  devices when their number divides it.
  """

  def __init__(self, source: "features_lib.FeatureSource", feature: str,
               size: int, batch_size: int):
    devices = jax.local_devices()
    if batch_size % len(devices):
      devices = devices[:1]
    mesh = jax.sharding.Mesh(np.asarray(devices), ("data",))
    self._batch = jax.sharding.NamedSharding(
        mesh, jax.sharding.PartitionSpec("data"))
    self._variables = jax.device_put(
        source.variables,
        jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))
    maps, key = source.map_fn(feature, (size, size))
    if key not in _POOLED_FNS:
      _POOLED_FNS[key] = jax.jit(
          lambda variables, images: maps(variables, images).mean(axis=(1, 2)))
    self._fn = _POOLED_FNS[key]
    self.num_devices = len(devices)

  def __call__(self, images) -> jax.Array:
    return self._fn(self._variables, jax.device_put(images, self._batch))


# --- The evaluation --------------------------------------------------------


def _skipped(message: str) -> context_lib.Output:
  logging.warning(message)
  return context_lib.Output(info={f"{NAME}/skipped": message})


def run(ctx) -> context_lib.Output | None:
  """The linear evaluation of the runner's network (see the module
  docstring); None for a mask source (no network)."""
  if ctx.features is None:
    logging.info("Skipping %s for masks:%s: a mask set has no features.",
                 NAME, ctx.mask_method)
    return None
  s = ctx.settings
  _check_settings(s)
  ok, message = datasets.tfds_prepared(s.linear_dataset, s.tfds_data_dir)
  if not ok:
    if s.linear_dataset.startswith("imagenet2012"):
      message += (" ImageNet needs its archives ILSVRC2012_img_train.tar and "
                  "ILSVRC2012_img_val.tar in --manual_dir (docs/finetune.md"
                  ", \"Linear evaluation\").")
    return _skipped(message)
  start = time.time()
  train = linear_data.Split(s.linear_dataset, s.linear_train_split,
                            s.tfds_data_dir, s.linear_num_train)
  test = linear_data.Split(s.linear_dataset, s.linear_test_split,
                           s.tfds_data_dir, s.linear_num_test)
  size, batch = int(s.linear_image_size), int(s.linear_batch_size)
  steps_per_epoch = train.num_examples // batch
  if steps_per_epoch < 1:
    raise ValueError(f"eval.linear_batch_size={batch} is larger than the "
                     f"{train.num_examples} training examples of "
                     f"{s.linear_dataset}[{s.linear_train_split}].")
  num_steps = int(s.linear_epochs) * steps_per_epoch
  feature = (default_feature(ctx.config) if s.linear_feature == "auto"
             else s.linear_feature)
  pooled = PooledFeatures(ctx.features, feature, size, batch)
  images = linear_data.train_batches(train, size, batch, int(s.seed))
  batches = ((pooled(x), y) for x, y in images)
  first = next(batches)
  dim = int(first[0].shape[-1])
  peak = peak_learning_rate(s.linear_base_lr, batch)
  logging.info("Linear evaluation on %s: %d steps (%d epochs of %d "
               "examples, batch %d), %s features (%d-d), peak lr %.3g.",
               s.linear_dataset, num_steps, s.linear_epochs,
               train.num_examples, batch, feature, dim, peak)
  params, final_loss = train_classifier(
      _chain(first, batches), num_steps, dim, train.num_classes,
      key=ctx.stream(NAME), peak_lr=peak, momentum=float(s.linear_momentum),
      weight_decay=float(s.linear_weight_decay),
      log_every=max(1, num_steps // 20))
  train_seconds = time.time() - start
  test_images = linear_data.center_batches(test, size, batch,
                                           s.linear_crop_fraction)
  acc, count = accuracy(params, ((pooled(x), y, v)
                                 for x, y, v in test_images))
  out = context_lib.Output()
  for k, value in zip(TOP_K, acc):
    out.metrics[f"{NAME}/top{k}"] = float(value)
  out.info.update({
      f"{NAME}/dataset": s.linear_dataset,
      f"{NAME}/num_train": train.num_examples,
      f"{NAME}/num_test": count,
      f"{NAME}/num_classes": train.num_classes,
      f"{NAME}/feature": feature, f"{NAME}/feature_dim": dim,
      f"{NAME}/steps": num_steps, f"{NAME}/peak_lr": peak,
      f"{NAME}/final_train_loss": final_loss,
      f"{NAME}/num_devices": pooled.num_devices,
      f"{NAME}/train_seconds": round(train_seconds, 1)})
  return out


def _check_settings(s) -> None:
  """ValueError naming the first eval.linear_* value that cannot work."""
  checks = (("linear_batch_size", s.linear_batch_size >= 1, ">= 1"),
            ("linear_epochs", s.linear_epochs >= 1, ">= 1"),
            ("linear_image_size", s.linear_image_size >= 32, ">= 32"),
            ("linear_crop_fraction", 0 < s.linear_crop_fraction <= 1,
             "in (0, 1]"),
            ("linear_base_lr", s.linear_base_lr > 0, "> 0"),
            ("linear_momentum", 0 <= s.linear_momentum < 1, "in [0, 1)"),
            ("linear_weight_decay", s.linear_weight_decay >= 0, ">= 0"))
  for name, ok, want in checks:
    if not ok:
      raise ValueError(f"eval.{name}={getattr(s, name)!r} must be {want}.")


def _chain(first, rest):
  yield first
  yield from rest
