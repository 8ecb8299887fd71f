"""Evaluation on your own data: a folder of images + instance-id PNG masks.

A tiny folder is drawn here (3 images, 48-64 px, rectangles over noise with
known instance ids; one JPEG, one image in a subfolder; masks as palette
'P', grayscale 'L' and 16-bit PNGs with arbitrary ids and a 255 'void'
border) and evaluated through the real command line; the ground truth the
runner scores is checked against an independent NumPy load + central
square crop of each PNG, and every bad-mask case must stop with a one-line
message naming the file.
"""

from __future__ import annotations

import math
import os

import numpy as np
from PIL import Image
import pytest
from skimage import transform

from configs import detcon_b
from odin_jax.evaluate import datasets
from odin_jax.evaluate import folder as folder_lib
from odin_jax.evaluate import runner
from odin_jax.evaluate import settings as settings_lib
from tests.helpers import central_square, run_eval_cli  # pylint: disable=g-bad-import-order

SIZE = 64   # eval.image_size in these tests
# (relative image path, (H, W), mask PIL mode, raw object ids).
IMAGES = (("a.jpg", (48, 64), "P", (3, 7)),
          ("b.png", (64, 48), "L", (1, 2, 5)),
          ("seq/c.png", (56, 56), "I;16", (300, 1000)))
VOID = 255   # a 'void' border id in the 'P' mask (VOC / DAVIS style)


def _draw(hw, ids, seed):
  """Noise image uint8 [H, W, 3] with one flat-coloured rectangle per id,
  and the raw id map int64 [H, W] (0 = background)."""
  rng = np.random.default_rng(seed)
  h, w = hw
  image = rng.integers(0, 80, (h, w, 3)).astype(np.uint8)
  ids_map = np.zeros(hw, np.int64)
  for j, i in enumerate(ids):
    top, left = 4 + 8 * j, 6 + 10 * j
    ids_map[top:top + 18, left:left + 16] = i
    image[top:top + 18, left:left + 16] = rng.integers(120, 255, 3)
  return image, ids_map


def _save_mask(path, ids_map, mode):
  h, w = ids_map.shape
  if mode == "P":
    im = Image.frombytes("P", (w, h), ids_map.astype(np.uint8).tobytes())
    im.putpalette(list(np.random.default_rng(0).integers(0, 256, 768)))
  elif mode == "L":
    im = Image.fromarray(ids_map.astype(np.uint8))
  else:
    im = Image.fromarray(ids_map.astype(np.uint16))
  im.save(path)
  with Image.open(path) as check:
    assert check.mode == mode, (path, check.mode)


def _write_folder(root):
  for k, (rel, hw, mode, ids) in enumerate(IMAGES):
    image, ids_map = _draw(hw, ids, k)
    if mode == "P":
      ids_map[0, :] = VOID
    for sub, name, array in (("images", rel, image),
                             ("masks", os.path.splitext(rel)[0] + ".png",
                              None)):
      path = os.path.join(root, sub, name)
      os.makedirs(os.path.dirname(path), exist_ok=True)
      if array is not None:
        Image.fromarray(array).save(path, quality=95)
      else:
        _save_mask(path, ids_map, mode)
  return str(root)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
  return _write_folder(tmp_path_factory.mktemp("own_data"))


def _settings(**overrides):
  return settings_lib.settings_from_config(detcon_b.get_config("test"),
                                           image_size=SIZE, **overrides)


def test_ground_truth_is_the_png_ids_cropped(folder):
  """The scenes the runner scores = each PNG read with NumPy, void / 0 as
  background, the other ids renumbered 1..G in ascending order, central
  square resized (nearest) to eval.image_size; images likewise."""
  chunks = list(datasets.folder_scene_chunks(
      _settings(folder_discovery=folder, folder_background_ids=(0, VOID))))
  assert len(chunks) == 1
  scenes = chunks[0]
  assert scenes.images.shape == (len(IMAGES), SIZE, SIZE, 3)
  assert scenes.class_names == ("object",)
  for i, (rel, _, _, ids) in enumerate(sorted(IMAGES)):
    mask = os.path.join(folder, "masks", os.path.splitext(rel)[0] + ".png")
    raw = np.array(Image.open(mask)).astype(np.int64)
    want = np.zeros(raw.shape, np.int32)
    for g, raw_id in enumerate(sorted(ids), start=1):
      want[raw == raw_id] = g
    np.testing.assert_array_equal(scenes.instances[i],
                                  central_square(want, SIZE), err_msg=rel)
    np.testing.assert_array_equal(scenes.classes[i],
                                  scenes.instances[i] > 0, err_msg=rel)
    image = np.array(Image.open(os.path.join(folder, "images", rel))
                     .convert("RGB"))
    side = min(image.shape[:2])
    top, left = (image.shape[0] - side) // 2, (image.shape[1] - side) // 2
    want_image = transform.resize(image[top:top + side, left:left + side],
                                  (SIZE, SIZE), anti_aliasing=True,
                                  preserve_range=True)
    assert np.abs(scenes.images[i] - want_image).max() <= 1, rel
  # Without 255 among the background ids the void border is an instance.
  first = next(datasets.folder_scene_chunks(
      _settings(folder_discovery=folder))).instances[0]
  assert first.max() == len(IMAGES[0][3]) + 1


def test_cli_on_a_folder(folder, tmp_path):
  """python -m odin_jax.evaluate --set=folder_discovery=PATH: folder/
  discovery, instance recall and the picture panel of every image."""
  sets = {"folder_discovery": folder, "folder_background_ids": "0,255",
          "image_size": SIZE, "num_images": 2, "picture_images": 2,
          "spectral_ks": "2,3", "mask_baselines": "grid"}
  proc, record = run_eval_cli(tmp_path, "discovery,instances,pictures", sets)
  metrics, info = record["metrics"], record["info"]
  for name in ("folder/discovery/abo_instance", "folder/discovery/abo_class",
               "folder/discovery/or_instance", "folder/instances/ar_all",
               "folder/instances/recall_all"):
    value = metrics.get(name)
    assert value is not None and math.isfinite(value) and 0 <= value <= 1, \
        (name, value, sorted(metrics))
  assert info["folder/discovery/num_images"] == len(IMAGES)
  assert info["folder/image_size"] == SIZE
  # Every instance left in the crops is scored, the void border is not.
  assert sum(v for k, v in info.items()
             if k.startswith("folder/instances/count_")) == sum(
                 len(ids) for *_, ids in IMAGES)
  panel = np.array(Image.open(record["pictures"]["folder/discovery"]))
  # 2 rows (a 2-px gap between) of image | truth | segments | features.
  assert panel.shape[:2] == (2 * SIZE + 2, 4 * SIZE)
  assert "folder/discovery/abo_instance" in proc.stdout   # printed table


def _bad_folder(root, case):
  """A copy of the good folder with one defect; returns (folder, the file
  the message must name)."""
  root = _write_folder(root)
  mask = os.path.join(root, "masks", "b.png")
  if case == "missing":
    os.remove(mask)
    return root, os.path.join(root, "images", "b.png")
  if case == "size":
    Image.new("L", (40, 40)).save(mask)
  elif case in ("rgb", "rgba"):
    Image.new(case.upper(), (48, 64), (1, 0, 0, 255)[:len(case)]).save(mask)
  return root, mask


@pytest.mark.parametrize("case", ["missing", "size", "rgb", "rgba"])
def test_bad_masks_stop_naming_the_file(tmp_path, case):
  """Checked before any compute: runner.evaluate stops at once with a
  one-line FolderDataError naming the file (and, for a missing mask, the
  path expected)."""
  root, bad = _bad_folder(tmp_path / "data", case)
  with pytest.raises(folder_lib.FolderDataError) as err:
    runner.evaluate(detcon_b.get_config("test"), str(tmp_path / "work"),
                    which="discovery", source="masks:grid",
                    overrides={"folder_discovery": root})
  message = str(err.value)
  assert "\n" not in message
  assert bad in message, message
  if case == "missing":
    assert os.path.join(root, "masks", "b.png") in message
  if case == "size":
    assert "40x40" in message and "48x64" in message
  if case in ("rgb", "rgba"):
    assert "ids are expected" in message
  assert not (tmp_path / "work" / "eval").exists()   # nothing ran


def test_coco_rgb_encoding_only_when_asked(tmp_path):
  """An RGB mask is read as id = R + 256 G + 65536 B with
  folder_mask_encoding='coco_rgb' (and refused otherwise)."""
  os.makedirs(tmp_path / "images")
  os.makedirs(tmp_path / "masks")
  rgb = np.zeros((8, 10, 3), np.uint8)
  rgb[2:5, 1:4] = (7, 1, 0)      # id 263
  rgb[5:8, 6:9] = (0, 0, 2)      # id 131072
  Image.fromarray(np.zeros((8, 10, 3), np.uint8)).save(tmp_path / "images" /
                                                       "x.png")
  Image.fromarray(rgb).save(tmp_path / "masks" / "x.png")
  with pytest.raises(folder_lib.FolderDataError, match="ids are expected"):
    list(folder_lib.folder_examples(str(tmp_path)))
  (_, _, inst), = folder_lib.folder_examples(str(tmp_path), encoding="coco_rgb")
  r, g, b = np.moveaxis(rgb.astype(np.int64), -1, 0)
  raw = r + 256 * g + 65536 * b
  np.testing.assert_array_equal(inst, np.select([raw == 263, raw == 131072],
                                                [1, 2], 0))
  with pytest.raises(folder_lib.FolderDataError, match="folder_mask_encoding"):
    list(folder_lib.folder_examples(str(tmp_path), encoding="rgb"))


def test_layout_errors_name_the_folder(tmp_path):
  with pytest.raises(folder_lib.FolderDataError, match="images/ \\+ masks/"):
    folder_lib.list_pairs(str(tmp_path))
  os.makedirs(tmp_path / "JPEGImages" / "v")
  os.makedirs(tmp_path / "Annotations" / "v")
  with pytest.raises(folder_lib.FolderDataError, match="No image files"):
    folder_lib.list_pairs(str(tmp_path))
  # DAVIS-style layout: JPEGImages/<video>/<frame>.jpg + Annotations/...png.
  Image.new("RGB", (6, 4)).save(tmp_path / "JPEGImages" / "v" / "0.jpg")
  Image.new("P", (6, 4)).save(tmp_path / "Annotations" / "v" / "0.png")
  assert folder_lib.list_pairs(str(tmp_path)) == [folder_lib.Pair(
      str(tmp_path / "JPEGImages" / "v" / "0.jpg"),
      str(tmp_path / "Annotations" / "v" / "0.png"))]
