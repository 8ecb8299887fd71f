"""The linear evaluation's input pipeline (TF, on CPU): BYOL's crops.

Reads a prepared TFDS classification split (`Split`: its examples, classes
and encoded (image, label) pairs; never downloads) and makes the two
streams evaluate/linear.py feeds to the frozen network:

  train_batches   endless shuffled batches of training views: uint8
                  [B, S, S, 3], int32 [B]. A view (`train_view`) is BYOL's
                  random resized crop (area 8-100 %, aspect 3/4-4/3;
                  augment.sample_crop_box) + horizontal flip (p 0.5),
                  bicubic to S, seeded statelessly by (seed, i) for the
                  stream's example i. Shuffled as BYOL: files, then a buffer
                  of 10 batches of still-encoded images.
  center_batches  the whole split once in file order, (uint8 [B, S, S, 3],
                  int32 [B], valid bool [B]), the last batch padded. A view
                  (`center_view`) is the central square of crop_fraction x
                  the short side, bicubic to S.

Views are rounded to uint8 (at most 0.5/255 from BYOL's float pixels).
TensorFlow and TFDS are imported only inside the functions.
"""

from __future__ import annotations

import numpy as np

_CROP = dict(crop_area_min=0.08, crop_area_max=1.0, aspect_min=3 / 4,
             aspect_max=4 / 3)
_SHUFFLE_BATCHES = 10       # BYOL: shuffle buffer of 10 batches


def _rgb_uint8(image, size: int):
  """float [S, S, 3] in [0, 1] -> uint8, rounded."""
  import tensorflow as tf
  image.set_shape([size, size, 3])
  return tf.cast(tf.round(tf.clip_by_value(image, 0.0, 1.0) * 255.0),
                 tf.uint8)


def train_view(image, seed, size: int):
  """BYOL's linear-training view: random resized crop + flip, bicubic.

  image uint8 [H, W, 3]; seed int [2] (stateless). Returns uint8 [S, S, 3].
  """
  import ml_collections
  import tensorflow as tf
  from odin_jax.data import augment
  crop = ml_collections.ConfigDict(_CROP)
  box_seed, flip_seed = tf.unstack(
      tf.random.experimental.stateless_split(seed, num=2))
  shape = tf.shape(image)
  box = augment.sample_crop_box(box_seed, shape[0], shape[1], crop)
  view = augment.crop_resize_image(image, box, size)
  flip = tf.random.stateless_uniform([], seed=flip_seed) < 0.5
  view = tf.cond(flip, lambda: tf.reverse(view, [1]), lambda: view)
  return _rgb_uint8(view, size)


def center_view(image, size: int, crop_fraction: float):
  """BYOL's test view: the central square of crop_fraction x the short
  side (offset (H - side + 1) // 2), bicubic to size. uint8 [S, S, 3]."""
  import tensorflow as tf
  from odin_jax.data import augment
  shape = tf.shape(image)
  short = tf.cast(tf.minimum(shape[0], shape[1]), tf.float32)
  side = tf.maximum(tf.cast(crop_fraction * short, tf.int32), 1)
  box = ((shape[0] - side + 1) // 2, (shape[1] - side + 1) // 2, side, side)
  return _rgb_uint8(augment.crop_resize_image(image, box, size), size)


class Split:
  """A prepared TFDS classification split: examples, classes, tf.data."""

  def __init__(self, name: str, split: str, data_dir, limit: int):
    import tensorflow_datasets as tfds
    from odin_jax.data import pipeline
    from odin_jax.data import tfds_source
    pipeline.hide_accelerators_from_tf()
    self.builder = tfds.builder(name, data_dir=data_dir)
    info = self.builder.info
    if split not in info.splits:
      raise ValueError(f"TFDS {name!r} has no split {split!r} (splits: "
                       f"{sorted(info.splits)}).")
    keys = tfds_source.tfds_keys(info.features)
    if keys["label"] is None:
      raise ValueError(f"TFDS {name!r} has no ClassLabel 'label' feature: "
                       "the linear evaluation needs image labels.")
    self.image_key = keys["image"]
    self.num_classes = int(info.features["label"].num_classes)
    total = info.splits[split].num_examples
    self.num_examples = min(int(limit), total) if limit else total
    self.spec = f"{split}[:{self.num_examples}]"

  def dataset(self, shuffle_seed: int | None = None):
    """(encoded image string, label int32) pairs, files shuffled by
    shuffle_seed (None: in order). Images stay encoded until `decode`, so
    a shuffle buffer holds compressed bytes (as BYOL's input)."""
    import tensorflow as tf
    import tensorflow_datasets as tfds
    read = tfds.ReadConfig(shuffle_seed=shuffle_seed)
    key = self.image_key
    ds = self.builder.as_dataset(
        split=self.spec, shuffle_files=shuffle_seed is not None,
        read_config=read, decoders={key: tfds.decode.SkipDecoding()})
    return ds.map(lambda ex: (ex[key], tf.cast(ex["label"], tf.int32)))


def decode(encoded):
  """An encoded image (JPEG, PNG, ...) -> uint8 [H, W, 3] (gray -> RGB)."""
  import tensorflow as tf
  image = tf.io.decode_image(encoded, channels=3, expand_animations=False)
  image.set_shape([None, None, 3])
  return image


def train_batches(split: Split, size: int, batch_size: int, seed: int):
  """Endless shuffled batches (uint8 [B, S, S, 3], int32 [B]) of training
  views; example i of the stream is augmented with stateless seed
  (seed, i)."""
  import tensorflow as tf
  ds = split.dataset(shuffle_seed=seed).repeat()
  ds = ds.shuffle(_SHUFFLE_BATCHES * batch_size, seed=seed,
                  reshuffle_each_iteration=True).enumerate()

  def view(i, example):
    encoded, label = example
    s = tf.stack([tf.constant(seed, tf.int64), i])
    return train_view(decode(encoded), s, size), label
  ds = ds.map(view, num_parallel_calls=tf.data.AUTOTUNE)
  ds = ds.batch(batch_size, drop_remainder=True).prefetch(tf.data.AUTOTUNE)
  return ds.as_numpy_iterator()


def center_batches(split: Split, size: int, batch_size: int,
                   crop_fraction: float):
  """(uint8 [B, S, S, 3], int32 [B], valid bool [B]) center-crop batches
  of the whole split in file order, the last padded to batch_size."""
  import tensorflow as tf
  ds = split.dataset().map(
      lambda encoded, label: (center_view(decode(encoded), size,
                                          crop_fraction), label),
      num_parallel_calls=tf.data.AUTOTUNE)
  for images, labels in ds.batch(batch_size).prefetch(
      tf.data.AUTOTUNE).as_numpy_iterator():
    n = len(labels)
    valid = np.arange(batch_size) < n
    if n < batch_size:
      pad = batch_size - n
      images = np.concatenate([images, np.repeat(images[-1:], pad, 0)])
      labels = np.concatenate([labels, np.repeat(labels[-1:], pad, 0)])
    yield images, labels, valid
