"""Precompute inputs: a folder of images or a TFDS split, read one by one.

`make_inputs('folder:/path' | 'tfds:NAME[:SPLIT]')` lists the inputs
(`locators`: sorted relative paths / TFDS indices) with data/sources.py and
data/tfds_source.py, the homes of image listing and TFDS opening, and gives
a picklable `loader()` whose `load(locator) -> examples.RawExample` runs in
the worker processes (which import neither TensorFlow nor JAX).
"""

from __future__ import annotations

import io
import os

from absl import logging
import numpy as np

from odin_jax.data.records import examples


class FolderLoader:
  """Reads one image file of a folder; label = index of its top directory."""

  def __init__(self, root: str, classes: dict[str, int] | None):
    self.root, self.classes = root, classes

  def load(self, rel: str) -> examples.RawExample:
    label = self.classes.get(rel.split("/")[0], -1) if self.classes else -1
    try:
      with open(os.path.join(self.root, *rel.split("/")), "rb") as f:
        return examples.RawExample(rel, f.read(), label)
    except OSError as e:
      logging.warning("precompute: cannot read %s: %s", rel, e)
      return examples.RawExample(rel, None, label, error="unreadable")


class FolderInputs:
  """Every image file under a folder (recursive), as sorted relative paths."""

  def __init__(self, root: str, labels: bool = False):
    from odin_jax.data import sources  # pylint: disable=g-import-not-at-top
    self.root = os.path.abspath(root) if root else root
    self.locators = sources.list_images(self.root, relative=True)
    if not self.locators:
      kinds = ", ".join(sources.IMAGE_EXTENSIONS)
      raise FileNotFoundError(f"No image files ({kinds}) under {root!r}.")
    self.classes = None
    if labels:   # ImageNet-style class_dir/image.jpg
      self.classes = {c: i for i, c in enumerate(sorted(
          {r.split("/")[0] for r in self.locators if "/" in r}))}
    self.source = f"folder:{self.root}"
    self.has_gt = False

  def loader(self) -> FolderLoader:
    return FolderLoader(self.root, self.classes)


class TfdsLoader:
  """Reads one example of a TFDS split (ArrayRecord data source, lazily)."""

  def __init__(self, name, split, data_dir, keys: dict[str, str | None]):
    self.name, self.split, self.data_dir = name, split, data_dir
    self.keys = keys
    self._source = None

  def __getstate__(self):             # ship the settings, not the open files
    return {**self.__dict__, "_source": None}

  def load(self, index: int) -> examples.RawExample:
    from PIL import Image  # pylint: disable=g-import-not-at-top
    if self._source is None:
      import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
      from odin_jax.data import tfds_source  # pylint: disable=g-import-not-at-top
      skip = {k: tfds.decode.SkipDecoding() for k in
              (self.keys["image"], self.keys["gt"]) if k}
      _, self._source = tfds_source.open_tfds(self.name, self.split,
                                              self.data_dir, decoders=skip)
    k = self.keys
    ex = self._source[int(index)]
    ident = ex[k["id"]] if k["id"] else f"{self.name}/{self.split}/{index}"
    ident = ident.decode() if isinstance(ident, bytes) else str(ident)
    gt = None
    if k["gt"]:   # COCO panoptic PNG: id = R + 256 G + 256^2 B
      rgb = np.asarray(Image.open(io.BytesIO(ex[k["gt"]])).convert("RGB"),
                       np.int64)
      gt = rgb[..., 0] + 256 * rgb[..., 1] + 65536 * rgb[..., 2]
    label = int(ex[k["label"]]) if k["label"] else -1
    return examples.RawExample(ident, bytes(ex[k["image"]]), label, gt)


class TfdsInputs:
  """A prepared TFDS split (ArrayRecord format) addressed by example index."""

  def __init__(self, name: str, split: str, data_dir: str | None):
    from odin_jax.data import tfds_source  # pylint: disable=g-import-not-at-top
    builder = tfds_source.tfds_builder(name, data_dir)
    feats = builder.info.features
    keys = dict(tfds_source.tfds_keys(feats),
                gt="panoptic_image" if "panoptic_image" in feats else None)
    self._loader = TfdsLoader(name, split, data_dir, keys)
    n = builder.info.splits[split].num_examples
    self.locators = list(range(n))
    self.classes = None
    self.source = f"tfds:{name}:{split}"
    self.has_gt = keys["gt"] is not None
    self.version = str(builder.info.version)

  def loader(self) -> TfdsLoader:
    return self._loader


def make_inputs(source: str, folder_labels=False, tfds_data_dir=None):
  """'folder:/path' or 'tfds:name[:split]' -> FolderInputs / TfdsInputs."""
  kind, _, rest = source.partition(":")
  if kind == "folder" and rest:
    return FolderInputs(rest, labels=folder_labels)
  if kind == "tfds" and rest:
    name, _, split = rest.partition(":")
    return TfdsInputs(name, split or "train", tfds_data_dir)
  raise ValueError(f"--source={source!r}: use folder:/path/to/images or "
                   "tfds:NAME[:SPLIT] (e.g. tfds:imagenet2012:train).")
