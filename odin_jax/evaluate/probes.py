"""Frozen-feature linear probe: per-pixel semantic segmentation (mIoU).

Linear probe (semantic segmentation, mIoU):
  * Frozen features [N, h, w, D] are standardised per channel with the
    training set's mean and standard deviation (a parameter-free batch norm,
    as linear probes on frozen features commonly do).
  * Targets: the full-resolution labels [N, H, W] resized to the feature
    grid as per-cell label fractions (exact box filter; pixels labelled
    `ignore_label` (255) count for nothing); a cell's loss weight is its
    fraction of non-ignored pixels.
  * Softmax regression logits = x W + b, trained with optax Adam on the
    soft-target cross-entropy (+ optional L2 weight decay), a fixed number of
    full-batch or mini-batch steps inside one `lax.scan` (deterministic
    given the key).
  * Prediction: logits upsampled bilinearly to [H, W], argmax; mIoU from the
    confusion matrix over pixels whose label is not `ignore_label`, averaged
    over the classes present in the ground truth or the prediction.

`run(ctx)` trains it on eval.probe_train_images demo scenes and tests on
eval.probe_test_images others (background + 5 shape classes). On the demo
it cannot rank networks: classes are shapes with random photo textures and
the background is another random photo, so neither the class nor even
object-vs-background is a property of a cell's feature; the probe predicts
background (mIoU ~0.13 = background IoU / 6 for trained and random
networks alike). It is meant for datasets whose classes have an
appearance (VOC-like; TFDS has no VOC segmentation masks).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from odin_jax.evaluate import context as context_lib
from odin_jax.evaluate import grids

IGNORE_LABEL = 255


def downsample_labels(labels, grid_hw: Sequence[int], num_classes: int,
                      ignore_label: int = IGNORE_LABEL):
  """Per-cell label fractions of full-resolution label maps.

  Args:
    labels: int [N, H, W] in [0, num_classes) or ignore_label.
    grid_hw: (h, w).
    num_classes: C.
    ignore_label: pixels with this label (or out of range) count for no class.
  Returns:
    (targets float32 [N, h, w, C] summing to 1 where weight > 0,
     weights float32 [N, h, w] = fraction of labelled pixels in the cell).
  """
  labels = np.asarray(labels).astype(np.int64)
  h, w = int(grid_hw[0]), int(grid_hw[1])
  rows = grids.area_matrix(h, labels.shape[1]).astype(np.float32)
  cols = grids.area_matrix(w, labels.shape[2]).astype(np.float32)
  valid = (labels >= 0) & (labels < num_classes) & (labels != ignore_label)
  fractions = np.empty((labels.shape[0], h, w, num_classes), np.float32)
  for c in range(num_classes):  # One class at a time bounds memory.
    onehot = ((labels == c) & valid).astype(np.float32)
    fractions[..., c] = np.einsum("iy,nyx,jx->nij", rows, onehot, cols)
  weights = fractions.sum(-1)
  targets = fractions / np.maximum(weights, 1e-12)[..., None]
  return targets, weights


@dataclasses.dataclass(frozen=True)
class LinearProbe:
  """A trained per-pixel linear classifier.

  kernel [D, C], bias [C], mean [D], std [D] (feature standardisation).
  """
  kernel: jax.Array
  bias: jax.Array
  mean: jax.Array
  std: jax.Array

  def logits(self, features):
    """features [..., D] -> logits [..., C]."""
    x = (jnp.asarray(features, jnp.float32) - self.mean) / self.std
    return x @ self.kernel + self.bias


@functools.partial(jax.jit, static_argnames=(
    "num_classes", "num_steps", "batch_size", "learning_rate",
    "weight_decay"))
def _train(x, targets, weights, key, *, num_classes, num_steps, batch_size,
           learning_rate, weight_decay):
  """Softmax regression on standardised x [M, D] with soft targets [M, C]."""
  num_points, dim = x.shape
  params = {"kernel": jnp.zeros((dim, num_classes), jnp.float32),
            "bias": jnp.zeros((num_classes,), jnp.float32)}
  optimizer = optax.adam(learning_rate)
  state = optimizer.init(params)

  def loss_fn(p, xb, tb, wb):
    logp = jax.nn.log_softmax(xb @ p["kernel"] + p["bias"])
    ce = -jnp.sum(tb * logp, axis=-1)
    data = jnp.sum(wb * ce) / jnp.maximum(jnp.sum(wb), 1e-12)
    return data + 0.5 * weight_decay * jnp.sum(p["kernel"] ** 2)

  def step(carry, step_key):
    p, s = carry
    if batch_size is None or batch_size >= num_points:
      xb, tb, wb = x, targets, weights
    else:
      idx = jax.random.randint(step_key, (batch_size,), 0, num_points)
      xb, tb, wb = x[idx], targets[idx], weights[idx]
    loss, grads = jax.value_and_grad(loss_fn)(p, xb, tb, wb)
    updates, s = optimizer.update(grads, s, p)
    return (optax.apply_updates(p, updates), s), loss

  (params, _), losses = jax.lax.scan(step, (params, state),
                                     jax.random.split(key, num_steps))
  return params, losses


def train_linear_probe(features, labels, num_classes: int, *, key,
                       num_steps: int = 300, learning_rate: float = 0.05,
                       weight_decay: float = 0.0,
                       batch_size: int | None = None,
                       ignore_label: int = IGNORE_LABEL):
  """Trains a per-pixel linear classifier on frozen features.

  Args:
    features: float [N, h, w, D] frozen features.
    labels: int [N, H, W] full-resolution labels (ignore_label ignored).
    num_classes: C.
    key: jax PRNG key (mini-batch sampling).
    num_steps: Adam steps.
    learning_rate: Adam learning rate.
    weight_decay: L2 penalty coefficient on the kernel.
    batch_size: cells per step (None = all cells, full batch).
    ignore_label: label of ignored pixels.
  Returns:
    (LinearProbe, losses float32 [num_steps]).
  """
  features = np.asarray(features, np.float32)
  n, h, w, dim = features.shape
  targets, weights = downsample_labels(labels, (h, w), num_classes,
                                       ignore_label)
  x = features.reshape(-1, dim)
  mean = x.mean(axis=0)
  std = np.maximum(x.std(axis=0), 1e-6)
  params, losses = _train(
      jnp.asarray((x - mean) / std), jnp.asarray(targets.reshape(-1,
                                                                 num_classes)),
      jnp.asarray(weights.reshape(-1)), key, num_classes=num_classes,
      num_steps=int(num_steps), batch_size=batch_size,
      learning_rate=float(learning_rate), weight_decay=float(weight_decay))
  probe = LinearProbe(kernel=params["kernel"], bias=params["bias"],
                      mean=jnp.asarray(mean), std=jnp.asarray(std))
  return probe, losses


@functools.partial(jax.jit, static_argnames=("image_hw",))
def _predict(kernel, bias, mean, std, features, image_hw):
  logits = ((features - mean) / std) @ kernel + bias  # [B, h, w, C]
  up = jax.image.resize(
      logits, (logits.shape[0],) + image_hw + logits.shape[-1:], "bilinear")
  return jnp.argmax(up, axis=-1).astype(jnp.int32)


def predict_segmentation(probe: LinearProbe, features,
                         image_hw: Sequence[int],
                         batch_size: int = 16) -> np.ndarray:
  """Full-resolution predictions of a linear probe.

  Args:
    probe: `LinearProbe`.
    features: float [N, h, w, D].
    image_hw: (H, W).
    batch_size: images per upsampling batch (bounds [B, H, W, C] memory).
  Returns:
    int32 [N, H, W].
  """
  features = np.asarray(features, np.float32)
  hw = (int(image_hw[0]), int(image_hw[1]))
  out = [np.asarray(_predict(probe.kernel, probe.bias, probe.mean, probe.std,
                             jnp.asarray(features[i:i + batch_size]), hw))
         for i in range(0, features.shape[0], batch_size)]
  return np.concatenate(out) if out else np.zeros((0,) + hw, np.int32)


def confusion_matrix(pred, labels, num_classes: int,
                     ignore_label: int = IGNORE_LABEL) -> np.ndarray:
  """Pixel confusion counts int64 [C, C] (rows truth, columns prediction).

  pred, labels: int [...] of equal shape; pixels whose label is ignore_label
  or outside [0, C) are skipped (predictions outside [0, C) too).
  """
  pred = np.asarray(pred).reshape(-1).astype(np.int64)
  labels = np.asarray(labels).reshape(-1).astype(np.int64)
  keep = ((labels >= 0) & (labels < num_classes) & (labels != ignore_label)
          & (pred >= 0) & (pred < num_classes))
  codes = labels[keep] * num_classes + pred[keep]
  return np.bincount(codes, minlength=num_classes ** 2).reshape(
      num_classes, num_classes)


def miou_from_confusion(confusion) -> tuple[float, np.ndarray]:
  """(mIoU over classes with a non-empty union, per-class IoU [C] with NaN
  for classes absent from both truth and prediction)."""
  confusion = np.asarray(confusion, np.float64)
  inter = np.diag(confusion)
  union = confusion.sum(0) + confusion.sum(1) - inter
  iou = np.where(union > 0, inter / np.maximum(union, 1.0), np.nan)
  present = ~np.isnan(iou)
  return (float(iou[present].mean()) if present.any() else math.nan), iou


def linear_probe_miou(train_features, train_labels, test_features,
                      test_labels, num_classes: int, *, key,
                      ignore_label: int = IGNORE_LABEL, **train_kwargs):
  """Trains a linear probe and scores it (mIoU at full resolution).

  Args:
    train_features: float [N, h, w, D]; train_labels int [N, H, W].
    test_features: float [M, h, w, D]; test_labels int [M, H', W'].
    num_classes: C.
    key: jax PRNG key.
    **train_kwargs: forwarded to `train_linear_probe`.
  Returns:
    {'miou', 'pixel_accuracy', 'per_class_iou' [C], 'final_loss'}.
  """
  probe, losses = train_linear_probe(train_features, train_labels,
                                     num_classes, key=key,
                                     ignore_label=ignore_label,
                                     **train_kwargs)
  test_labels = np.asarray(test_labels)
  pred = predict_segmentation(probe, test_features, test_labels.shape[1:])
  conf = confusion_matrix(pred, test_labels, num_classes, ignore_label)
  miou, per_class = miou_from_confusion(conf)
  total = conf.sum()
  return {"miou": miou,
          "pixel_accuracy": float(np.trace(conf) / total) if total else
                            math.nan,
          "per_class_iou": per_class, "final_loss": float(losses[-1])}


def split(ctx):
  """The probes' demo split: (scenes, features [n, h, w, D], train slice,
  test slice); test = scenes 0..probe_test-1, train = the next
  probe_train scenes."""
  s = ctx.settings
  n_test, n_train = s.probe_test_images, s.probe_train_images
  if n_test < 1 or n_train < 1:
    raise ValueError("probe_train_images and probe_test_images must be >= 1")
  scenes = ctx.scenes(n_test + n_train)
  feats = ctx.scene_features(n_test + n_train)
  return scenes, feats, slice(n_test, n_test + n_train), slice(0, n_test)


def run(ctx) -> context_lib.Output | None:
  """Linear per-pixel probe mIoU on the demo classes."""
  if ctx.no_features("linear_probe"):
    return None
  scenes, feats, train, test = split(ctx)
  num_classes = len(scenes.class_names) + 1
  result = linear_probe_miou(
      feats[train], scenes.classes[train], feats[test], scenes.classes[test],
      num_classes, key=ctx.stream("linear_probe"),
      num_steps=ctx.settings.probe_steps)
  out = context_lib.Output()
  out.metrics["linear_probe/miou"] = float(result["miou"])
  out.metrics["linear_probe/pixel_accuracy"] = float(
      result["pixel_accuracy"])
  out.info["linear_probe/per_class_iou"] = dict(zip(
      ("background",) + tuple(scenes.class_names),
      [context_lib.json_float(v) for v in result["per_class_iou"]]))
  out.info["linear_probe/final_loss"] = float(result["final_loss"])
  return out
