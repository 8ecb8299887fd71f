"""Deterministic, resumable, per-host tf.data training pipeline.

The training stream is a pure function of (config.seed, global position p):

  epoch        e = p // N                 (N = source.num_examples)
  example_id     = index_shuffle(p % N, seed=f(config.seed, e), max_index=N-1)
                                          (a fresh permutation every epoch)
  augmentation   two_views(..., seed=g(config.seed, p))

Global batch k holds positions [k*G, (k+1)*G); host h of P reads the
contiguous slice [k*G + h*G/P, k*G + (h+1)*G/P). Resuming at step k starts
the stream at position k*G, so a resumed run sees exactly the batches an
uninterrupted run would: there is no iterator state to checkpoint.

Each element of the dataset is a per-host batch (B = G / P):
  'view1', 'view2': float32 [B, S, S, 3] in [0, 1]
  'mask1', 'mask2': int32   [B, S, S]   source segment ids through each view
  'index':          int64   [B]         global position p
  'example_id':     int64   [B]         source example id
with masks.method 'hierarchy' also (data/hierarchy.py; L = max_leaves):
  'hierarchy':      float32 [B, L, L]   tree distances between leaf ids
with config.odin.enabled also (spanning.two_views_with_span; span side
odin.span_scale x S, 2S by default):
  'span':           float32 [B, 2S, 2S, 3] un-augmented spanning view
  'box1', 'box2':   float32 [B, 4]      view boxes in the span, (y0,x0,y1,x1)
  'flip1', 'flip2': bool    [B]
with config.r2o.enabled the same plus
  'span_mask':      int32   [B, 2S, 2S] source segments on the spanning view
"""

from __future__ import annotations

from absl import logging
import tensorflow as tf

from odin_jax.data import augment
from odin_jax.data import spanning

# Distinct constants keep the shuffle and augmentation streams independent.
_SHUFFLE_SALT = 0x5348_5546   # 'SHUF'
_AUGMENT_SALT = 0x4155_4731   # 'AUG1'


def hide_accelerators_from_tf() -> None:
  """Keeps TensorFlow off GPUs/TPUs so it never grabs accelerator memory.

  Must run before TF initialises its devices; later calls are no-ops.
  """
  for kind in ("GPU", "TPU"):
    try:
      if tf.config.list_physical_devices(kind):
        tf.config.set_visible_devices([], kind)
    except (RuntimeError, ValueError) as e:
      logging.log_first_n(logging.WARNING,
                          "Could not hide %s devices from TF: %s", 1, kind, e)


def num_steps_per_epoch(source, global_batch_size: int) -> int:
  """Whole global batches per pass over the source (at least 1)."""
  return max(1, source.num_examples // int(global_batch_size))


def example_id_at(position, num_examples: int, seed: int):
  """int64 example id at global stream position(s) p (any int64 shape []).

  A pure function of (seed, p): position p of epoch p // N maps through that
  epoch's permutation of 0..N-1.
  """
  position = tf.cast(position, tf.int64)
  n = tf.constant(num_examples, tf.int64)
  epoch_seed = tf.random.experimental.stateless_fold_in(
      tf.constant([seed, _SHUFFLE_SALT], tf.int64), position // n)
  return tf.random.experimental.index_shuffle(position % n, epoch_seed,
                                              max_index=n - 1)


def augment_seed_at(position, seed: int):
  """Stateless seed int64 [2] of the augmentation of position p."""
  return tf.random.experimental.stateless_fold_in(
      tf.constant([seed, _AUGMENT_SALT], tf.int64), tf.cast(position,
                                                            tf.int64))


def _resolve_processes(process_index, process_count):
  if process_index is None or process_count is None:
    import jax  # pylint: disable=g-import-not-at-top
    process_index = jax.process_index() if process_index is None else \
        process_index
    process_count = jax.process_count() if process_count is None else \
        process_count
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index {process_index} not in "
                     f"[0, {process_count}).")
  return int(process_index), int(process_count)


def make_train_dataset(config, source, *, global_batch_size: int,
                       start_step: int = 0, process_index=None,
                       process_count=None) -> tf.data.Dataset:
  """Infinite dataset of this host's batches, starting at global step start_step.

  Args:
    config: experiment config (seed, image_size, augment.*).
    source: a sources.Source (num_examples, lookup).
    global_batch_size: G, summed over all hosts; must be divisible by P.
    start_step: first global step to produce (resume point).
    process_index, process_count: this host h and host count P (default:
      jax.process_index() / jax.process_count()).
  Returns:
    tf.data.Dataset of dicts following the batch contract (module docstring),
    each batch of B = G / P examples.
  """
  hide_accelerators_from_tf()
  h, num_hosts = _resolve_processes(process_index, process_count)
  g = int(global_batch_size)
  if g <= 0 or g % num_hosts:
    raise ValueError(f"global_batch_size {g} must be a positive multiple of "
                     f"process_count {num_hosts}.")
  if start_step < 0:
    raise ValueError(f"start_step must be >= 0, got {start_step}.")
  local = g // num_hosts
  n = int(source.num_examples)
  # Odin also needs the spanning view and the views' boxes in it.
  # (Not with cached Odin masks: those come with the images, like FH.)
  discovers = ((config.odin.enabled and not config.odin.get("cached", False))
               or config.r2o.enabled)
  make_views = spanning.two_views_with_span if discovers else augment.two_views
  seed = int(config.seed)

  def position(counter):  # host-local counter -> global stream position
    step, j = counter // local, counter % local
    return step * g + h * local + j

  def load(counter):
    p = position(counter)
    example_id = example_id_at(p, n, seed)
    example = source.lookup(example_id)
    out = make_views(example["image"], example["segments"],
                     augment_seed_at(p, seed), config)
    if "hierarchy" in example:   # region-tree distances: not view-dependent
      out["hierarchy"] = example["hierarchy"]
    out["index"] = p
    out["example_id"] = example_id
    return out

  ds = tf.data.Dataset.counter(start=int(start_step) * local, dtype=tf.int64)
  ds = ds.map(load, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  ds = ds.batch(local, drop_remainder=True)
  ds = ds.prefetch(tf.data.AUTOTUNE)
  options = tf.data.Options()
  options.deterministic = True
  options.threading.max_intra_op_parallelism = 1
  options.experimental_optimization.map_parallelization = True
  return ds.with_options(options)


def numpy_batches(dataset: tf.data.Dataset):
  """Iterator of numpy dicts (same keys, shapes and dtypes) over dataset."""
  return dataset.as_numpy_iterator()
