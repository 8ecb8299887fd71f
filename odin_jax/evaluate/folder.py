"""Your own evaluation data: a folder of images with instance-id masks.

eval.folder_discovery = PATH evaluates discovery, instance recall and the
picture panels on PATH (evaluate/datasets.py, metrics prefixed 'folder/').
Layout (the one COCO-style and DAVIS-style exports already have):

  PATH/images/**/<name>.<jpg|png|...>   (or PATH/JPEGImages/)
  PATH/masks/**/<name>.png              (or PATH/Annotations/)

Each image's mask has the same relative path and stem with the extension
.png (images/a/b.jpg -> masks/a/b.png). A mask is an id map, one id per
instance: a palette ('P'), grayscale ('L'), 16-bit ('I;16') or 32-bit
('I') PNG whose pixel values are the ids. Ids in eval.folder_background_ids
(default 0; add 255 for VOC / DAVIS 'void' borders) are not objects. Every
instance is of one class (the folder has no class names), so instance
recall's co-occurrence bins count the instances of an image.

An RGB mask is refused (colours are not ids) unless
eval.folder_mask_encoding = 'coco_rgb': COCO panoptic PNGs, id = R + 256 G
+ 65536 B. All pairs are checked before any network runs (PIL reads the
headers only: `check_folder`); a missing mask, a mask whose size differs
from its image, or an RGB / RGBA mask stops with a one-line
FolderDataError naming the file.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Iterator, Sequence

import numpy as np

# (image folder, mask folder) names tried in order under PATH.
LAYOUTS = (("images", "masks"), ("JPEGImages", "Annotations"))
MASK_ENCODINGS = ("ids", "coco_rgb")
# PIL modes whose pixel values are ids as they are.
_ID_MODES = ("P", "L", "I;16", "I;16L", "I;16B", "I", "1")
_RGB_MODES = ("RGB", "RGBA")


class FolderDataError(ValueError):
  """A folder-evaluation file is missing or unusable (names the file)."""


@dataclasses.dataclass(frozen=True)
class Pair:
  """One image and its instance mask (paths)."""
  image: str
  mask: str


def check_encoding(encoding: str) -> None:
  if encoding not in MASK_ENCODINGS:
    raise FolderDataError(
        f"eval.folder_mask_encoding={encoding!r}; choose one of "
        f"{MASK_ENCODINGS} ('ids': palette / grayscale / 16-bit id PNGs; "
        "'coco_rgb': COCO panoptic RGB, id = R + 256 G + 65536 B).")


def _layout(folder: str) -> tuple[str, str]:
  """(image dir, mask dir) under folder, the first LAYOUTS entry present."""
  if not os.path.isdir(folder):
    raise FolderDataError(f"eval.folder_discovery={folder!r} is not a "
                          "directory.")
  for images, masks in LAYOUTS:
    image_dir = os.path.join(folder, images)
    mask_dir = os.path.join(folder, masks)
    if os.path.isdir(image_dir) and os.path.isdir(mask_dir):
      return image_dir, mask_dir
  expected = " or ".join(f"{i}/ + {m}/" for i, m in LAYOUTS)
  raise FolderDataError(f"eval.folder_discovery={folder!r} has no {expected} "
                        "subfolders (images and their same-name PNG masks).")


def mask_path(image_path: str, image_dir: str, mask_dir: str) -> str:
  """mask_dir/<image's path relative to image_dir, extension .png>."""
  rel = os.path.relpath(image_path, image_dir)
  return os.path.join(mask_dir, os.path.splitext(rel)[0] + ".png")


def list_pairs(folder: str, limit: int = 0) -> list[Pair]:
  """Sorted (image, mask) pairs of folder (the first `limit`; 0 = all).

  Raises FolderDataError when the layout is missing, the image folder is
  empty or an image has no mask.
  """
  from odin_jax.data import sources  # pylint: disable=g-import-not-at-top
  image_dir, mask_dir = _layout(folder)
  images = sources.list_images(image_dir)
  if limit > 0:
    images = images[:limit]
  if not images:
    kinds = ", ".join(sources.IMAGE_EXTENSIONS)
    raise FolderDataError(f"No image files ({kinds}) under {image_dir}.")
  pairs = []
  for image in images:
    mask = mask_path(image, image_dir, mask_dir)
    if not os.path.isfile(mask):
      raise FolderDataError(f"Missing mask for image {image}: expected "
                            f"{mask} (same relative path and name, .png).")
    pairs.append(Pair(image, mask))
  return pairs


def check_pair(pair: Pair, encoding: str = "ids") -> None:
  """Raises FolderDataError when the mask's mode or size does not fit."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  with Image.open(pair.image) as im:
    image_size = im.size
  with Image.open(pair.mask) as m:
    mode, mask_size = m.mode, m.size
  if mode in _RGB_MODES and not (encoding == "coco_rgb" and mode == "RGB"):
    raise FolderDataError(
        f"Mask {pair.mask} is {mode}, but instance ids are expected: save it "
        "as a palette ('P'), grayscale ('L') or 16-bit PNG whose pixel values "
        "are instance ids (0 = background), or, for COCO panoptic PNGs, set "
        "eval.folder_mask_encoding=coco_rgb.")
  if mode not in _ID_MODES + ("RGB",):
    raise FolderDataError(
        f"Mask {pair.mask} has PIL mode {mode!r}; expected an id PNG "
        f"(modes {', '.join(_ID_MODES)}).")
  if mode != "RGB" and encoding == "coco_rgb":
    raise FolderDataError(
        f"Mask {pair.mask} is {mode}, not RGB, but eval.folder_mask_encoding="
        "coco_rgb; set it to 'ids' for id PNGs.")
  if mask_size != image_size:
    raise FolderDataError(
        f"Mask {pair.mask} is {mask_size[0]}x{mask_size[1]} (WxH) but its "
        f"image {pair.image} is {image_size[0]}x{image_size[1]}; masks must "
        "have their image's size.")


def load_image(path: str) -> np.ndarray:
  """uint8 [H, W, 3] (grayscale / palette / RGBA converted to RGB)."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  with Image.open(path) as im:
    return np.asarray(im.convert("RGB"), np.uint8)


def load_ids(path: str, encoding: str = "ids") -> np.ndarray:
  """Raw id map int64 [H, W] of a mask PNG (palette indices, gray values,
  16-bit values, or R + 256 G + 65536 B with encoding 'coco_rgb')."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  with Image.open(path) as m:
    array = np.asarray(m).astype(np.int64)
  if encoding == "coco_rgb":
    return array[..., 0] + 256 * array[..., 1] + 65536 * array[..., 2]
  return array


def instance_map(ids: np.ndarray,
                 background_ids: Sequence[int] = (0,)) -> np.ndarray:
  """Raw ids [H, W] -> int32 [H, W]: 0 where background_ids, else the
  instances 1..G in ascending raw-id order."""
  ids = np.asarray(ids)
  present, inverse = np.unique(ids, return_inverse=True)
  objects = ~np.isin(present, np.asarray(background_ids, ids.dtype))
  relabel = np.where(objects, np.cumsum(objects), 0).astype(np.int32)
  return relabel[inverse.reshape(ids.shape)]


def check_folder(folder: str, limit: int = 0,
                 encoding: str = "ids") -> list[Pair]:
  """The folder's pairs (`list_pairs`), each checked (`check_pair`): the
  runner calls this before any network runs, so a bad file stops at once."""
  check_encoding(encoding)
  pairs = list_pairs(folder, limit)
  for pair in pairs:
    check_pair(pair, encoding)
  return pairs


def folder_examples(folder: str, limit: int = 0, encoding: str = "ids",
                    background_ids: Sequence[int] = (0,)
                    ) -> Iterator[tuple[Pair, np.ndarray, np.ndarray]]:
  """(pair, image uint8 [H, W, 3], instances int32 [H, W]) at native size,
  in sorted image order; all pairs are checked before the first is
  decoded (`check_folder`)."""
  for pair in check_folder(folder, limit, encoding):
    yield (pair, load_image(pair.image),
           instance_map(load_ids(pair.mask, encoding), background_ids))
