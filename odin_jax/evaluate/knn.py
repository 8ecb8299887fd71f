"""k-NN image classification of pooled frozen features.

  * Features pooled (mean over cells, optionally within a mask) and
    L2-normalised; cosine similarity to every training feature; the k most
    similar vote with weight exp(similarity / T); the class with the largest
    summed weight wins. Defaults k=20, T=0.07 (weighted k-NN of Wu et al.
    2018 as used by DINO; the papers here do not fix them).

`run(ctx)` classifies the probes' demo split (`probes.split`). Demo scenes
carry no image label, so the label is the class of the object covering the
most pixels (`dominant_class`: a weak, imbalanced proxy; compare with info
'knn/majority_accuracy').
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from odin_jax import numerics
from odin_jax.evaluate import context as context_lib
from odin_jax.evaluate import probes

KNN_K = 20
KNN_TEMPERATURE = 0.07


def pool_features(features, masks=None) -> np.ndarray:
  """Mean of the cells of each feature map (within a mask if given).

  Args:
    features: float [N, h, w, D].
    masks: optional bool/float [N, h, w] cell weights.
  Returns:
    float32 [N, D].
  """
  features = np.asarray(features, np.float32)
  if masks is None:
    return features.mean(axis=(1, 2))
  m = np.asarray(masks, np.float32)[..., None]
  return (features * m).sum((1, 2)) / np.maximum(m.sum((1, 2)), 1e-12)


@functools.partial(jax.jit, static_argnames=("num_classes", "k"))
def _knn_scores(train, train_labels, queries, *, num_classes, k, temperature):
  sim = jnp.einsum("md,nd->mn", queries, train,
                   precision=jax.lax.Precision.HIGHEST)
  values, indices = jax.lax.top_k(sim, k)
  votes = jax.nn.one_hot(train_labels[indices], num_classes)  # [M, k, C]
  return jnp.einsum("mk,mkc->mc", jnp.exp(values / temperature), votes)


def knn_classify(train_features, train_labels, test_features,
                 num_classes: int, k: int = KNN_K,
                 temperature: float = KNN_TEMPERATURE,
                 chunk_size: int = 1024):
  """Temperature-weighted k-NN classification with cosine similarity.

  Args:
    train_features: float [N, D]; train_labels int [N] in [0, C).
    test_features: float [M, D].
    num_classes: C.
    k: neighbours (clipped to N).
    temperature: vote weight exp(cos / temperature).
    chunk_size: queries per batch.
  Returns:
    (predictions int32 [M], scores float32 [M, C]).
  """
  def norm(x):
    return numerics.l2_normalize(np.asarray(x, np.float32))

  train = jnp.asarray(norm(train_features))
  labels = jnp.asarray(np.asarray(train_labels, np.int32))
  test = norm(test_features)
  k = min(int(k), train.shape[0])
  scores = [np.asarray(_knn_scores(train, labels,
                                   jnp.asarray(test[i:i + chunk_size]),
                                   num_classes=num_classes, k=k,
                                   temperature=temperature))
            for i in range(0, test.shape[0], chunk_size)]
  scores = (np.concatenate(scores) if scores
            else np.zeros((0, num_classes), np.float32))
  return scores.argmax(axis=-1).astype(np.int32), scores


def knn_accuracy(train_features, train_labels, test_features, test_labels,
                 num_classes: int, k: int = KNN_K,
                 temperature: float = KNN_TEMPERATURE) -> float:
  """Top-1 accuracy of `knn_classify` (features [N, D] / [M, D])."""
  pred, _ = knn_classify(train_features, train_labels, test_features,
                         num_classes, k, temperature)
  test_labels = np.asarray(test_labels).reshape(-1)
  return float((pred == test_labels).mean()) if test_labels.size else math.nan


def dominant_class(class_maps) -> np.ndarray:
  """Image label of each scene: the object class covering most pixels.

  class_maps: int [N, H, W] (0 = background). Returns int [N] in 1..C (0 for
  a scene without objects); ties go to the smaller class id.
  """
  class_maps = np.asarray(class_maps)
  num = int(class_maps.max(initial=0)) + 1
  counts = np.stack([np.bincount(c.reshape(-1), minlength=num)
                     for c in class_maps])
  counts[:, 0] = 0
  labels = counts.argmax(axis=1)
  return np.where(counts.max(axis=1) > 0, labels, 0)


def run(ctx) -> context_lib.Output | None:
  """k-NN accuracy of pooled features on each scene's dominant class."""
  if ctx.no_features("knn"):
    return None
  scenes, feats, train, test = probes.split(ctx)
  labels = dominant_class(scenes.classes)
  num_classes = len(scenes.class_names) + 1
  pooled = pool_features(feats)
  out = context_lib.Output()
  out.metrics["knn/accuracy"] = knn_accuracy(
      pooled[train], labels[train], pooled[test], labels[test], num_classes)
  majority = np.bincount(labels[train], minlength=num_classes).argmax()
  out.info["knn/majority_accuracy"] = float((labels[test] == majority).mean())
  return out
