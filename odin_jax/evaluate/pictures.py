"""Pictures of object discovery (Odin Fig. 2 style) and PNG writing.

A panel is one row: image | ground truth | k-means segments | PCA of the
features, each [H, W, 3] uint8, side by side -> [H, 4W, 3]. Label maps are
coloured with a fixed palette (label l always gets the same colour, so
panels of one image are comparable across training steps); the feature PCA
maps the first three principal components of the cells' features to R, G,
B (each min-max scaled over the image; component signs fixed so the
picture does not flicker between evaluations). `run(ctx)` is the 'pictures'
evaluation: panels of the first eval.picture_images demo scenes (k-means at
K = eval.picture_k; a mask source shows its own segmentation) and of the
first folder images when eval.folder_discovery is set.
"""

from __future__ import annotations

import io
from typing import Sequence

import numpy as np

from odin_jax import checkpoint
from odin_jax import numerics
from odin_jax.evaluate import context as context_lib
from odin_jax.evaluate import abo as discovery

# Colour of negative (unlabelled) labels and of ignore_label pixels.
UNLABELLED = (0, 0, 0)


def palette(num_colors: int) -> np.ndarray:
  """A fixed palette uint8 [num_colors, 3]; colour 0 is dark grey.

  Colours step the hue by the golden angle (neighbouring labels contrast),
  with alternating saturation / value levels. Deterministic.
  """
  from skimage import color
  i = np.arange(num_colors, dtype=np.float64)
  hsv = np.stack([(i * 0.61803398875) % 1.0,
                  0.55 + 0.45 * ((i // 1) % 2 == 0),
                  0.65 + 0.35 * ((i // 2) % 2 == 0)], axis=-1)
  rgb = np.round(color.hsv2rgb(hsv[None])[0] * 255).astype(np.uint8)
  if num_colors:
    rgb[0] = (64, 64, 64)
  return rgb


def colorize(labels, ignore_label: int | None = 255) -> np.ndarray:
  """Colours a label map with `palette`.

  Args:
    labels: int [H, W]; negative labels and ignore_label are black.
    ignore_label: label drawn black (None: none).
  Returns:
    uint8 [H, W, 3].
  """
  labels = np.asarray(labels).astype(np.int64)
  invalid = labels < 0
  if ignore_label is not None:
    invalid |= labels == ignore_label
  safe = np.where(invalid, 0, labels)
  colors = palette(int(safe.max(initial=0)) + 1)
  out = colors[safe]
  out[invalid] = UNLABELLED
  return out


def pca_rgb(features) -> np.ndarray:
  """First three principal components of a feature map as colours.

  Args:
    features: float [h, w, D] (D >= 1; missing components are 0).
  Returns:
    uint8 [h, w, 3].
  """
  x = np.asarray(features, np.float64)
  h, w, dim = x.shape
  x = x.reshape(h * w, dim)
  x = x - x.mean(axis=0)
  _, _, vt = np.linalg.svd(x, full_matrices=False)
  comps = vt[:3]
  # Sign convention: each component's largest-magnitude loading positive.
  signs = np.sign(comps[np.arange(comps.shape[0]),
                        np.argmax(np.abs(comps), axis=1)])
  proj = x @ (comps * np.where(signs == 0, 1.0, signs)[:, None]).T
  proj = np.concatenate([proj, np.zeros((h * w, 3 - proj.shape[1]))], axis=1)
  lo, hi = proj.min(axis=0), proj.max(axis=0)
  scaled = (proj - lo) / np.where(hi > lo, hi - lo, 1.0)
  return np.round(scaled * 255).astype(np.uint8).reshape(h, w, 3)


def to_uint8_image(image) -> np.ndarray:
  """RGB image [H, W, 3] (uint8, or float in [0, 1]) or gray [H, W] ->
  uint8 [H, W, 3]."""
  image = np.asarray(image)
  if image.ndim == 2:
    image = np.repeat(image[..., None], 3, axis=-1)
  if image.dtype != np.uint8:
    image = np.round(np.clip(image.astype(np.float64), 0.0, 1.0) * 255)
    image = image.astype(np.uint8)
  return image[..., :3]


def discovery_panel(image, gt, segments, features,
                    ignore_label: int | None = 255) -> np.ndarray:
  """image | ground truth | segments | feature PCA, side by side.

  Args:
    image: [H, W, 3] uint8, or float in [0, 1].
    gt: int [H, W] ground-truth label map (instances or classes).
    segments: int [H, W] or [h, w] segmentation (e.g. one k-means map);
      resized to [H, W] (nearest) if needed.
    features: float [h, w, D] features, PCA'd and upsampled (nearest).
    ignore_label: label drawn black in gt / segments.
  Returns:
    uint8 [H, 4W, 3].
  """
  image = to_uint8_image(image)
  hw = image.shape[:2]
  gt = np.asarray(gt)
  if gt.shape != hw:
    raise ValueError(f"gt {gt.shape} must match the image {hw}")
  segments = np.asarray(segments)
  if segments.shape != hw:
    segments = numerics.resize_nearest(segments, hw)
  pca = numerics.resize_nearest(np.moveaxis(pca_rgb(features), -1, 0), hw)
  return np.concatenate([image, colorize(gt, ignore_label),
                         colorize(segments, ignore_label),
                         np.moveaxis(pca, 0, -1)], axis=1)


def stack_rows(panels: Sequence[np.ndarray], gap: int = 2) -> np.ndarray:
  """Stacks equally wide panels [H_i, W, 3] vertically with white gaps.

  Returns uint8 [sum H_i + gap (n - 1), W, 3].
  """
  if not panels:
    raise ValueError("no panels")
  width = panels[0].shape[1]
  rows = []
  for i, p in enumerate(panels):
    if p.shape[1] != width:
      raise ValueError(f"panel {i} is {p.shape[1]} wide, expected {width}")
    if i:
      rows.append(np.full((gap, width, 3), 255, np.uint8))
    rows.append(np.asarray(p, np.uint8))
  return np.concatenate(rows, axis=0)


def save_png(path: str, array) -> None:
  """Writes uint8 [H, W, 3] / [H, W] (or float in [0, 1]) as PNG, creating
  parent directories."""
  from PIL import Image
  array = np.asarray(array)
  if array.dtype != np.uint8:
    array = np.round(np.clip(array.astype(np.float64), 0.0, 1.0) * 255)
    array = array.astype(np.uint8)
  # Through epath (checkpoint.as_path): a gs:// workdir's eval/ is written
  # where its checkpoints are, not under a local ./gs:/ folder.
  path = checkpoint.as_path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  buffer = io.BytesIO()
  Image.fromarray(array).save(buffer, format="PNG")
  path.write_bytes(buffer.getvalue())


def overlay(image, labels, alpha: float = 0.55) -> np.ndarray:
  """The image tinted by each pixel's label colour; labels resized to fit.

  image: [H, W, 3] (uint8 or float in [0, 1]); labels: int [h, w].
  Returns uint8 [H, W, 3].
  """
  image = to_uint8_image(image)
  labels = numerics.resize_nearest(np.asarray(labels), image.shape[:2])
  tint = colorize(labels, ignore_label=None).astype(np.float64)
  return np.round(image * (1 - alpha) + tint * alpha).astype(np.uint8)


def training_masks_panel(span, span_segments, view1, mask1, view2,
                         mask2) -> np.ndarray:
  """What Odin / R2O train on for one image, Odin Fig. 1 style.

  Args:
    span: [P, P, 3] spanning view; span_segments: int [h, w] its segments.
    view1, view2: [S, S, 3] augmented views; mask1, mask2: int [S, S] (or
      any grid) the segments mapped into each view.
  Returns:
    uint8 [P, 5P/2, 3]: spanning view | segments | view 1 with its
    masks above view 2 with its masks. One colour per id, so a region keeps
    its colour across the span and both views.
  """
  span = to_uint8_image(span)
  p = span.shape[0]
  segments = colorize(
      numerics.resize_nearest(np.asarray(span_segments), (p, p)),
      ignore_label=None)
  views = np.concatenate([overlay(view1, mask1), overlay(view2, mask2)], 0)
  width = max(1, round(views.shape[1] * p / views.shape[0]))
  views = np.moveaxis(numerics.resize_nearest(
      np.moveaxis(views, -1, 0), (p, width)), 0, -1)
  return np.concatenate([span, segments, views], axis=1)


def sampled_masks_panel(view1, mask1, ids1, view2, mask2, ids2
                        ) -> np.ndarray:
  """What a data-mask method (DetCon, BYOL, SimCLR) trains on, one image.

  Args:
    view1, view2: [S, S, 3] augmented views (uint8, or float in [0, 1]).
    mask1, mask2: int [S, S] (or any grid) the views' segment ids.
    ids1, ids2: int [M] the ids the step sampled in each view (repeats
      allowed; negative = padding, ignored).
  Returns:
    uint8 [2S, 3S, 3]: per view, a row view | its masks | only the sampled
    masks in colour over a darkened view. Colours are the ids' palette
    colours, so an id has one colour in both columns.
  """
  rows = []
  for view, mask, ids in ((view1, mask1, ids1), (view2, mask2, ids2)):
    view = to_uint8_image(view)
    mask = numerics.resize_nearest(np.asarray(mask), view.shape[:2])
    sampled = np.isin(mask, np.asarray(ids)[np.asarray(ids) >= 0])
    dark = np.round(view * 0.25).astype(np.uint8)
    chosen = np.where(sampled[..., None], overlay(view, mask), dark)
    rows.append(np.concatenate([view, overlay(view, mask), chosen], axis=1))
  return np.concatenate(rows, axis=0)


def _onehot_features(segments) -> np.ndarray:
  """int [H, W] -> float32 [H, W, L] (so a mask set has a 'feature' PCA)."""
  segments = np.asarray(segments)
  labels = np.unique(segments)
  return (segments[..., None] == labels).astype(np.float32)


def _panels(ctx, scenes, feats, n: int) -> np.ndarray:
  """Stacked panels of the first n scenes, k-means at K = picture_k."""
  k = min(int(ctx.settings.picture_k), max(ctx.ks(feats.shape[1:3])))
  segs = discovery.kmeans_maps(ctx, feats[:n], ctx.stream("pictures"),
                               scenes.instances.shape[1:], ks=(k,))[:, 0]
  return stack_rows([discovery_panel(scenes.images[i], scenes.instances[i],
                                     segs[i], feats[i]) for i in range(n)])


def run(ctx) -> context_lib.Output:
  """image | instances | segments | feature PCA for the first scenes."""
  n = ctx.settings.picture_images
  scenes = ctx.scenes(n)
  out = context_lib.Output()
  if ctx.features is not None:
    out.pictures["discovery"] = _panels(ctx, scenes, ctx.scene_features(n), n)
  else:
    segs = scenes.segments(ctx.mask_method)
    out.pictures["discovery"] = stack_rows([
        discovery_panel(scenes.images[i], scenes.instances[i], segs[i],
                        _onehot_features(segs[i])) for i in range(n)])
  for prefix, _, chunk, feats in ctx.scene_chunks("pictures", out):
    n = min(n, len(chunk))
    out.pictures[f"{prefix}/discovery"] = _panels(ctx, chunk, feats, n)
    break  # the first chunk's first picture_images
  return out
