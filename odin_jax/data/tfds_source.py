"""A prepared TFDS dataset as a training source, and opening TFDS splits.

`TfdsSource` (config.dataset.name = a TFDS name, e.g. 'imagenet2012')
reads a split in ArrayRecord format by random access (a sources.Source):

  source.lookup(example_id) -> {'image': uint8 [H, W, 3],
                                'segments': int32 [H, W],  # on the fly
                                'label': int64 [],  # -1: no ClassLabel
                                'id': string []}    # the file name, or
                                                    # NAME/SPLIT/index

Its shard_sizes are the split's ArrayRecord files, so
dataset.host_split='shards' (pipeline.py) opens only a host's own files.

This module is also the one home of opening a TFDS split (`tfds_builder`,
`open_tfds`: a clear error saying how to prepare an unprepared dataset) and
of finding its features (`tfds_keys`); the precompute's inputs
(records/inputs.py) and the linear evaluation use them. TensorFlow (and
TFDS) are imported only where they are used, so the precompute's worker
processes use this module without them.
"""

from __future__ import annotations

from absl import logging
import numpy as np

from odin_jax.data import sources


def _prepare_instructions(name: str, data_dir) -> str:
  where = data_dir or "the default TFDS data_dir (~/tensorflow_datasets)"
  lines = [
      f"TFDS dataset {name!r} is not available in random-access (ArrayRecord) "
      f"format in {where}. Prepare it first:"]
  if name.startswith("imagenet2012"):
    lines.append(
        "  1. Download ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar "
        "(image-net.org, needs an account) into a manual dir, e.g. "
        "~/tensorflow_datasets/downloads/manual.\n"
        "  2. tfds build imagenet2012 --manual_dir=<manual_dir> "
        "--data_dir=<data_dir> --file_format=array_record\n"
        "  3. Train with --config.dataset.data_dir=<data_dir>.")
  else:
    lines.append(
        f"  tfds build {name} --data_dir=<data_dir> --file_format=array_record"
        "\n  then train with --config.dataset.data_dir=<data_dir>.")
  lines.append("To try the system without any download, use the embedded demo "
               "dataset: --config=configs/detcon_b.py:demo (dataset.name='demo').")
  return "\n".join(lines)


def tfds_builder(name: str, data_dir):
  """The builder of a prepared TFDS dataset; a clear error, saying how to
  prepare it, when the name is unknown or the data is not there."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  try:
    builder = tfds.builder(name, data_dir=data_dir)
  except tfds.core.registered.DatasetNotFoundError as e:
    raise ValueError(
        f"Unknown dataset name {name!r}: choose one of "
        f"{sources.BUILTIN_NAMES} or a TFDS dataset name such as "
        "'imagenet2012' or 'coco/2017' (see tfds.list_builders()).") from e
  if not builder.is_prepared():
    raise RuntimeError(_prepare_instructions(name, data_dir))
  return builder


def open_tfds(name: str, split: str, data_dir, decoders=None):
  """(builder, random-access data source) of a prepared TFDS split.

  decoders: as tfds' (e.g. {'image': tfds.decode.SkipDecoding()} for the
  encoded bytes). Needs the ArrayRecord file format; says how to get it.
  """
  builder = tfds_builder(name, data_dir)
  try:
    return builder, builder.as_data_source(split=split, decoders=decoders)
  except Exception as e:  # pylint: disable=broad-except
    raise RuntimeError(f"{type(e).__name__}: {e}\n" +
                       _prepare_instructions(name, data_dir)) from e


def tfds_keys(features, image_key: str = "image") -> dict:
  """Feature names of a TFDS dataset: {'image', 'label', 'id'} (None: absent).

  label: a ClassLabel named 'label'; id: 'file_name' (ImageNet),
  'image/filename' or 'image/id' (COCO), the first one present.
  """
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  if image_key not in features:
    images = [k for k, f in features.items()
              if isinstance(f, tfds.features.Image)]
    if not images:
      raise ValueError(f"TFDS features {sorted(features)} have no image "
                       f"feature (dataset.image_key={image_key!r}).")
    image_key = images[0]
  label = features["label"] if "label" in features else None
  return {"image": image_key,
          "label": ("label" if isinstance(label, tfds.features.ClassLabel)
                    else None),
          "id": next((k for k in ("file_name", "image/filename", "image/id")
                      if k in features), None)}


class TfdsSource:
  """A prepared TFDS split read by random access (tfds data source).

  The split's ArrayRecord files are its shards (shard_sizes); readers open
  a file on its first read, so a host reading only its shards
  (dataset.host_split='shards') opens only those files.
  """

  def __init__(self, name: str, split: str, data_dir, mask_config,
               image_key: str = "image"):
    builder, self._source = open_tfds(name, split, data_dir)
    self.num_examples = len(self._source)
    if self.num_examples == 0:
      raise RuntimeError(f"TFDS {name}[{split}] is empty.")
    self.name, self.split, self.data_dir = name, split, data_dir
    self.precompute_spec = f"tfds:{name}:{split}"   # precompute's --source
    self._mask_config = mask_config
    self._keys = tfds_keys(builder.info.features, image_key)
    # One file instruction per ArrayRecord file (part) of the split, in the
    # order of the data source's ids.
    self.shard_sizes = tuple(int(f.take) for f in
                             builder.info.splits[split].file_instructions)
    if sum(self.shard_sizes) != self.num_examples:
      raise RuntimeError(f"TFDS {name}[{split}]: file instructions hold "
                         f"{sum(self.shard_sizes)} examples, the data source "
                         f"{self.num_examples}.")
    self._segments = sources.segments_fn(mask_config)
    logging.info("TfdsSource: %s[%s], %d examples.", name, split,
                 self.num_examples)

  def reshard_command(self, num_shards: int) -> str:
    """Precompute command writing this split as records in num_shards."""
    from odin_jax.data import records  # pylint: disable=g-import-not-at-top
    return records.precompute_command(
        f"tfds:{self.name}:{self.split}", "/path/to/records",
        [records.mask_setting_string(self._mask_config)],
        num_shards=num_shards, tfds_data_dir=self.data_dir) + (
            "\nthen set --config.dataset.records_dir=/path/to/records")

  def describe(self, example_id: int) -> str:
    """TFDS example example_id (its id feature needs a decode that may
    fail, so the index names it)."""
    return f"{self.name}[{self.split}] example {int(example_id)}"

  def _load(self, example_id):
    i = int(example_id)
    ex = self._source[i]
    image = np.asarray(ex[self._keys["image"]])
    if image.ndim == 2:
      image = image[..., None]
    if image.shape[-1] == 1:
      image = np.repeat(image, 3, axis=-1)
    image = np.ascontiguousarray(image[..., :3]).astype(np.uint8)
    k = self._keys
    label = np.int64(ex[k["label"]] if k["label"] else -1)
    ident = ex[k["id"]] if k["id"] else f"{self.name}/{self.split}/{i}"
    ident = ident if isinstance(ident, bytes) else str(ident).encode()
    return image, self._segments(image), label, ident

  def lookup(self, example_id):
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
    image, seg, label, ident = tf.numpy_function(
        self._load, [example_id], [tf.uint8, tf.int32, tf.int64, tf.string],
        stateful=False)
    image.set_shape([None, None, 3])
    seg.set_shape([None, None])
    label.set_shape([])
    ident.set_shape([])
    return {"image": image, "segments": seg, "label": label, "id": ident}
