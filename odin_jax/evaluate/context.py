"""What every evaluation's `run(ctx)` receives, and what it returns.

`Context` holds one `runner.evaluate` call's state: the config, its
`EvalSettings`, the feature source (None for a mask source), the mask
method (for 'masks:<m>'), the PRNG key, the CLU writer (or None), the
results of the evaluations that already ran, and the demo scenes and their
features, loaded / computed once and shared by the evaluations. `run(ctx)`
returns an `Output` (or None when the source cannot be evaluated that way).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Iterator

import numpy as np
from absl import logging

from odin_jax.evaluate import datasets
from odin_jax.evaluate import settings as settings_lib

# Fixed per-evaluation PRNG streams: results do not depend on which
# evaluations run, or in which order.
_STREAMS = {name: i + 1 for i, name in enumerate(
    settings_lib.EVALUATIONS + settings_lib.OPT_IN_EVALUATIONS)}


def json_float(value) -> float | None:
  """A metric as JSON: a float, or None for NaN / inf."""
  value = float(value)
  return value if math.isfinite(value) else None


@dataclasses.dataclass
class Output:
  """What one evaluation returns.

  metrics: {name: float} (TensorBoard and the table); info: JSON-able
  details (counts, per-class values); pictures: {name: uint8 [H, W, 3]}.
  """
  metrics: dict = dataclasses.field(default_factory=dict)
  info: dict = dataclasses.field(default_factory=dict)
  pictures: dict = dataclasses.field(default_factory=dict)

  def update(self, other: "Output") -> None:
    self.metrics.update(other.metrics)
    self.info.update(other.info)
    self.pictures.update(other.pictures)


@dataclasses.dataclass(eq=False)
class Context:
  """Shared state of one evaluation call (see the module docstring).

  features: a `features.FeatureSource` (images -> [N, h, w, D]) or None.
  mask_method: 'fh' | 'slic' | 'grid' | 'gt' | 'hierarchy' for a mask
    source (features None), else None.
  results: {metric: float} of the evaluations that ran before this one.
  """
  config: Any
  settings: settings_lib.EvalSettings
  features: Any = None
  mask_method: str | None = None
  writer: Any = None
  results: dict = dataclasses.field(default_factory=dict)
  _scenes: datasets.Scenes | None = dataclasses.field(default=None,
                                                      repr=False)
  _scene_features: np.ndarray | None = dataclasses.field(default=None,
                                                         repr=False)

  @property
  def key(self):
    import jax  # Local: datasets and settings load without JAX.
    return jax.random.PRNGKey(self.settings.seed)

  def stream(self, name: str, chunk: int | None = None):
    """The PRNG key of evaluation `name` (fixed, whatever else runs); of
    its chunk `chunk` of a chunked dataset when given."""
    import jax
    key = jax.random.fold_in(self.key, _STREAMS[name])
    return key if chunk is None else jax.random.fold_in(key, chunk)

  def scenes(self, n: int) -> datasets.Scenes:
    """The first n demo scenes (one pool, loaded once per call)."""
    s = self.settings
    pool = max(n, s.num_images, s.picture_images,
               s.probe_train_images + s.probe_test_images
               if {"linear_probe", "knn"} & set(s.evals) else 0)
    if self._scenes is None or len(self._scenes) < n:
      self._scenes = datasets.demo_scenes(self.config, max(pool, n),
                                          s.demo_seed)
    return self._scenes.head(n)

  def scene_features(self, n: int) -> np.ndarray:
    """Features [n, h, w, D] of the first n demo scenes (computed once)."""
    cached = self._scene_features
    if cached is None or len(cached) < n:
      images = self.scenes(n).images
      start = 0 if cached is None else len(cached)
      new = self.features(images[start:n])
      self._scene_features = new if cached is None else np.concatenate(
          [cached, new])
    return self._scene_features[:n]

  def ks(self, grid_hw) -> tuple:
    """eval.discovery_ks usable on a grid (K <= cells), ascending."""
    cells = int(grid_hw[0]) * int(grid_hw[1])
    ks = tuple(sorted({int(k) for k in self.settings.discovery_ks
                       if 1 <= int(k) <= cells}))
    return ks or (min(cells, 1),)

  def no_features(self, name: str) -> bool:
    """True (after a log line) when the source is a mask set."""
    if self.features is None:
      logging.info("Skipping %s for masks:%s: a mask set has no features.",
                   name, self.mask_method)
      return True
    return False

  def scene_chunks(self, evaluation: str, out: Output
                   ) -> Iterator[tuple[str, int, datasets.Scenes,
                                       np.ndarray]]:
    """(prefix, c, scenes, features) of each chunk of the scene datasets
    beyond the demo that `evaluation` covers: 'coco' (eval.tfds_discovery;
    discovery, instances) and 'folder' (eval.folder_discovery; discovery,
    instances, pictures). Features are computed per chunk at
    eval.image_size; sets out.info['<prefix>/image_size']."""
    s = self.settings
    sets = (("coco", s.tfds_discovery, ("discovery", "instances"),
             datasets.coco_scene_chunks),
            ("folder", s.folder_discovery,
             ("discovery", "instances", "pictures"),
             datasets.folder_scene_chunks))
    for prefix, enabled, serves, chunks in sets:
      if not enabled or evaluation not in serves:
        continue
      if self.features is None:
        if prefix == "folder":
          logging.warning("eval.folder_discovery needs a network (--source="
                          "checkpoint or random); skipped for masks:%s.",
                          self.mask_method)
        continue
      count = 0
      for c, scenes in enumerate(chunks(s)):
        count += 1
        out.info[f"{prefix}/image_size"] = int(s.image_size)
        yield prefix, c, scenes, self.features(scenes.images)
      if count == 0:
        _no_chunks(prefix, s)


def _no_chunks(prefix: str, s: settings_lib.EvalSettings) -> None:
  """COCO without a usable image warns; a folder without one stops."""
  if prefix == "coco":
    logging.warning("No COCO image with a thing instance; skipping.")
    return
  raise ValueError(f"eval.folder_discovery={s.folder_discovery}: no image "
                   "has an instance (a mask id outside eval."
                   f"folder_background_ids={s.folder_background_ids}) in its "
                   "central square crop.")
