"""Image-computable segment-id maps (DetCon mask sources).

Every source returns the same thing: an int32 [H, W] map aligned with the
image whose ids are 0..n-1, contiguous. The DetCon reference stored ids in
8 bits and silently merged every segment past 255; we keep int32 from the
segmenter to the model, so ids never wrap.

  'fh'   Felzenszwalb-Huttenlocher graph segmentation (DetCon's default),
         scikit-image's implementation, the one DetCon's masks come from
  'fh_opencv' the same algorithm and parameters, OpenCV's C++
         implementation (cv2.ximgproc; extra `opencv`): ~3.5x faster, for
         ImageNet-scale precompute; its segments are not identical to
         scikit-image's (adjusted Rand index 0.67-0.89 on the bundled photos)
  'slic' SLIC superpixels
  'grid' n x n spatial grid (n=1: one global mask, i.e. BYOL/SimCLR)
  'gt'   a given ground-truth instance map (background is its own segment)
  'hierarchy' the leaves (<= 40 regions) of a region tree (hierarchy.py);
         the tree's distances come from hierarchy.hierarchy_from_config
"""

from __future__ import annotations

import numpy as np
from skimage import segmentation

METHODS = ("fh", "fh_opencv", "slic", "grid", "gt", "hierarchy")


def relabel_sequential(segments: np.ndarray) -> np.ndarray:
  """Any integer label map [H, W] -> int32 [H, W] with ids 0..n-1.

  Ids keep their relative order (smallest input label -> 0). Distinct input
  labels always stay distinct: this is a bijection, never a cast.
  """
  segments = np.asarray(segments)
  _, inverse = np.unique(segments, return_inverse=True)
  if inverse.max(initial=0) >= np.iinfo(np.int32).max:
    raise ValueError("Too many segments for int32 ids.")
  return inverse.reshape(segments.shape).astype(np.int32)


def _channel_axis(image: np.ndarray):
  """None for grayscale [H, W] (single channel), -1 for [H, W, C]."""
  if image.ndim == 2:
    return None
  if image.ndim == 3:
    return -1
  raise ValueError(f"Expected an image [H, W] or [H, W, C], got {image.shape}.")


def felzenszwalb_segments(image, scale: float = 1000.0, sigma: float = 0.8,
                          min_size: int = 1000) -> np.ndarray:
  """Felzenszwalb-Huttenlocher segments of one image.

  Args:
    image: uint8 or float [H, W, 3], or grayscale [H, W].
    scale: FH k; larger -> larger segments.
    sigma: Gaussian pre-smoothing width.
    min_size: segments smaller than this are merged into a neighbour.
  Returns:
    int32 [H, W], ids 0..n-1 contiguous.
  """
  image = np.asarray(image)
  labels = segmentation.felzenszwalb(
      image, scale=scale, sigma=sigma, min_size=int(min_size),
      channel_axis=_channel_axis(image))
  return relabel_sequential(labels)


_OPENCV_HINT = ("mask method 'fh_opencv' needs OpenCV's contrib modules: "
                "pip install 'odin_jax[opencv]' (opencv-contrib-python-"
                "headless; uninstall a plain opencv-python first, both "
                "provide cv2), or use method 'fh' (scikit-image).")


def felzenszwalb_segments_opencv(image, scale: float = 1000.0,
                                 sigma: float = 0.8,
                                 min_size: int = 1000) -> np.ndarray:
  """Felzenszwalb-Huttenlocher segments by OpenCV (same args as above).

  cv2.ximgproc's GraphSegmentation runs the paper's algorithm (Gaussian
  smoothing, 8-connected grid graph with colour-distance weights, the
  k/|C| merge criterion with k = scale, then merging of components smaller
  than min_size) in C++ on one thread here (the precompute parallelises over
  processes). Channel order does not matter (euclidean colour distance).
  Returns int32 [H, W], ids 0..n-1 contiguous.
  """
  try:
    import cv2  # pylint: disable=g-import-not-at-top
    segmenter = cv2.ximgproc.segmentation.createGraphSegmentation(
        sigma=float(sigma), k=float(scale), min_size=int(min_size))
  except (ImportError, AttributeError) as e:
    raise ImportError(f"{_OPENCV_HINT} ({e})") from None
  cv2.setNumThreads(1)
  image = np.asarray(image)
  if image.dtype != np.uint8:     # floats in [0, 1] as scikit-image takes
    image = np.clip(np.round(image * 255.0), 0, 255).astype(np.uint8)
  return relabel_sequential(segmenter.processImage(np.ascontiguousarray(image)))


def slic_segments(image, n_segments: int = 100,
                  compactness: float = 10.0) -> np.ndarray:
  """SLIC superpixels of one image [H, W, 3] (or [H, W]) -> int32 [H, W]."""
  image = np.asarray(image)
  labels = segmentation.slic(
      image, n_segments=int(n_segments), compactness=float(compactness),
      start_label=0, channel_axis=_channel_axis(image))
  return relabel_sequential(labels)


def grid_segments(height: int, width: int, n: int) -> np.ndarray:
  """n x n grid of near-equal cells: int32 [height, width], id = row*n + col.

  Cell boundaries are floor(i * size / n), so cell sizes differ by at most
  one pixel and every cell is non-empty when n <= min(height, width).
  """
  if n < 1 or n > min(height, width):
    raise ValueError(f"grid_size must be in [1, {min(height, width)}] for a "
                     f"{height}x{width} image, got {n}.")
  rows = (np.arange(height) * n) // height   # cell row of each pixel row
  cols = (np.arange(width) * n) // width
  return (rows[:, None] * n + cols[None, :]).astype(np.int32)


def _field(mask_config, name: str):
  """mask_config.<name> with an error that names the missing field."""
  try:
    return getattr(mask_config, name)
  except (AttributeError, KeyError):
    raise ValueError(f"mask_config.{name} is required for mask_config.method="
                     f"{getattr(mask_config, 'method', None)!r}.") from None


def compute_segments(image, mask_config, gt_instances=None) -> np.ndarray:
  """Segment-id map of one image for the source named by mask_config.method.

  Args:
    image: [H, W, 3] (or [H, W]) uint8/float image.
    mask_config: ConfigDict (or any attribute object) with `method` in
      METHODS and the fields that method reads: fh_scale, fh_sigma,
      fh_min_size | slic_n_segments, slic_compactness | grid_size.
    gt_instances: int [H, W] instance map, required for method 'gt'.
  Returns:
    int32 [H, W], ids 0..n-1 contiguous.
  """
  method = _field(mask_config, "method")
  image = np.asarray(image)
  if method == "fh":
    return felzenszwalb_segments(image, _field(mask_config, "fh_scale"),
                                 _field(mask_config, "fh_sigma"),
                                 _field(mask_config, "fh_min_size"))
  if method == "fh_opencv":
    return felzenszwalb_segments_opencv(
        image, _field(mask_config, "fh_scale"), _field(mask_config, "fh_sigma"),
        _field(mask_config, "fh_min_size"))
  if method == "slic":
    return slic_segments(image, _field(mask_config, "slic_n_segments"),
                         _field(mask_config, "slic_compactness"))
  if method == "grid":
    return grid_segments(image.shape[0], image.shape[1],
                         int(_field(mask_config, "grid_size")))
  if method == "gt":
    if gt_instances is None:
      raise ValueError("mask_config.method='gt' needs gt_instances (a ground-"
                       "truth instance map); this image has none.")
    gt_instances = np.asarray(gt_instances)
    if gt_instances.shape != image.shape[:2]:
      raise ValueError(f"gt_instances {gt_instances.shape} does not match the "
                       f"image {image.shape[:2]}.")
    return relabel_sequential(gt_instances)
  if method == "hierarchy":
    from odin_jax.data import hierarchy  # pylint: disable=g-import-not-at-top
    return hierarchy.hierarchy_from_config(image, mask_config).leaves
  raise ValueError(f"mask_config.method must be one of {METHODS}, "
                   f"got {method!r}.")


def mask_config_key(mask_config) -> str:
  """Short stable name of a mask config for cache files, e.g. 'grid5'."""
  method = _field(mask_config, "method")
  if method in ("fh", "fh_opencv"):
    return (f"{'fh' if method == 'fh' else 'fhcv'}_s{_field(mask_config, 'fh_scale'):g}"
            f"_sig{_field(mask_config, 'fh_sigma'):g}"
            f"_min{_field(mask_config, 'fh_min_size'):g}")
  if method == "slic":
    return (f"slic_n{_field(mask_config, 'slic_n_segments'):g}"
            f"_c{_field(mask_config, 'slic_compactness'):g}")
  if method == "grid":
    return f"grid{int(_field(mask_config, 'grid_size'))}"
  if method == "gt":
    return "gt"
  if method == "hierarchy":
    return (f"hier_l{int(_field(mask_config, 'hier_max_leaves'))}"
            f"_n{int(_field(mask_config, 'hier_superpixels'))}"
            f"_c{_field(mask_config, 'hier_compactness'):g}"
            f"_sig{_field(mask_config, 'hier_sigma'):g}"
            f"_min{_field(mask_config, 'hier_min_leaf_area'):g}")
  raise ValueError(f"mask_config.method must be one of {METHODS}, "
                   f"got {method!r}.")
