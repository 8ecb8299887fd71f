"""Generated video clips: a DAVIS stand-in for label propagation.

`make_clip` generates clips of textured shapes (cut from the photos bundled
with scikit-image) moving at constant velocity over a textured background,
with exact visible-pixel masks: a DAVIS stand-in that needs no download.
"""

from __future__ import annotations

import dataclasses
import functools

import numpy as np

# Photos bundled with scikit-image (load offline).
CLIP_PHOTOS = ("astronaut", "coffee", "chelsea", "rocket",
               "immunohistochemistry", "camera", "coins", "moon", "brick",
               "grass", "gravel")
SHAPES = ("ellipse", "rectangle", "triangle")


@dataclasses.dataclass(frozen=True, eq=False)
class Clip:
  """A generated clip.

  frames: uint8 [T, H, W, 3].
  masks: int32 [T, H, W]; 0 = background, j = object j (visible pixels;
    later objects occlude earlier ones).
  velocities: float [N, 2] (dy, dx) pixels per frame of objects 1..N.
  """
  frames: np.ndarray
  masks: np.ndarray
  velocities: np.ndarray


@functools.lru_cache(maxsize=None)
def _photo(name: str) -> np.ndarray:
  """A bundled photo as float32 RGB [H, W, 3] in [0, 1]."""
  from skimage import data as skdata
  image = np.asarray(getattr(skdata, name)())
  if image.ndim == 2:
    image = np.repeat(image[..., None], 3, axis=-1)
  return image[..., :3].astype(np.float32) / 255.0


def _crop(rng, photo: np.ndarray, out_hw) -> np.ndarray:
  """A random square-ish crop of a photo resized to out_hw, float [h, w, 3]."""
  from skimage import transform
  h, w = photo.shape[:2]
  side = int(rng.integers(min(h, w) // 3, min(h, w) + 1))
  y = int(rng.integers(0, h - side + 1))
  x = int(rng.integers(0, w - side + 1))
  return transform.resize(photo[y:y + side, x:x + side], tuple(out_hw),
                          order=1, anti_aliasing=True).astype(np.float32)


def _shape_mask(rng, shape: str, size: int) -> np.ndarray:
  """bool [size, size] shape filling most of its box."""
  yy, xx = np.mgrid[0:size, 0:size] + 0.5
  c = size / 2
  if shape == "ellipse":
    ry, rx = c * rng.uniform(0.7, 1.0), c * rng.uniform(0.7, 1.0)
    return ((yy - c) / ry) ** 2 + ((xx - c) / rx) ** 2 <= 1.0
  if shape == "rectangle":
    hy, hx = c * rng.uniform(0.6, 1.0), c * rng.uniform(0.6, 1.0)
    return (np.abs(yy - c) <= hy) & (np.abs(xx - c) <= hx)
  # Triangle: apex at the top, base at the bottom (half-plane tests).
  top, bottom = size * 0.05, size * 0.95
  frac = np.clip((yy - top) / (bottom - top), 0.0, 1.0)
  return (yy >= top) & (yy <= bottom) & (np.abs(xx - c) <= frac * c * 0.95)


def make_clip(seed: int = 0, num_frames: int = 8, image_size: int = 64,
              num_objects: int = 2,
              object_size: tuple[float, float] = (0.3, 0.45),
              max_speed: float = 2.0) -> Clip:
  """Clip of textured shapes moving at constant velocity (exact masks).

  Background: a crop of one bundled photo. Each object: an ellipse,
  rectangle or triangle cut from a crop of another photo (with a random
  colour gain, so it differs from the background), moving in a straight
  line at a constant velocity (|v| <= max_speed px/frame per axis) chosen so
  the object's box stays inside the image for all frames. Later objects
  are drawn over earlier ones. Deterministic given the arguments.

  Args:
    seed: numpy seed.
    num_frames: T.
    image_size: H = W.
    num_objects: N.
    object_size: range of object box side as a fraction of image_size.
    max_speed: largest |velocity| component, pixels per frame.
  Returns:
    `Clip`.
  """
  rng = np.random.default_rng(seed)
  size = int(image_size)
  photo_order = rng.permutation(len(CLIP_PHOTOS))
  background = _crop(rng, _photo(CLIP_PHOTOS[photo_order[0]]), (size, size))
  objects = []
  for j in range(num_objects):
    side = int(round(size * rng.uniform(*object_size)))
    side = max(2, min(side, size))
    photo = _photo(CLIP_PHOTOS[photo_order[(j + 1) % len(CLIP_PHOTOS)]])
    texture = _crop(rng, photo, (side, side))
    texture = np.clip(texture * rng.uniform(0.6, 1.4, size=3), 0.0, 1.0)
    shape = _shape_mask(rng, SHAPES[int(rng.integers(len(SHAPES)))], side)
    travel_max = (size - side) / max(num_frames - 1, 1)
    velocity = rng.uniform(-1.0, 1.0, size=2) * min(max_speed, travel_max)
    span = velocity * (num_frames - 1)
    low = np.maximum(0.0, -span)
    high = np.maximum(low, (size - side) - np.maximum(0.0, span))
    start = rng.uniform(low, high)
    objects.append((side, texture, shape, velocity, start))
  frames = np.empty((num_frames, size, size, 3), np.float32)
  masks = np.zeros((num_frames, size, size), np.int32)
  for t in range(num_frames):
    canvas = background.copy()
    for j, (side, texture, shape, velocity, start) in enumerate(objects):
      y, x = np.round(start + velocity * t).astype(int)
      y0, x0 = max(y, 0), max(x, 0)
      y1, x1 = min(y + side, size), min(x + side, size)
      if y1 <= y0 or x1 <= x0:
        continue
      sub = shape[y0 - y:y1 - y, x0 - x:x1 - x]
      canvas[y0:y1, x0:x1][sub] = texture[y0 - y:y1 - y, x0 - x:x1 - x][sub]
      masks[t, y0:y1, x0:x1][sub] = j + 1
    frames[t] = canvas
  frames = np.round(frames * 255.0).astype(np.uint8)
  velocities = np.array([o[3] for o in objects], np.float64).reshape(-1, 2)
  return Clip(frames=frames, masks=masks, velocities=velocities)
