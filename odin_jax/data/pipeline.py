"""Deterministic, resumable, per-host tf.data training pipeline.

How hosts split the data: config.dataset.host_split (default 'examples').

'examples' (default): the training stream is a pure function of
(config.seed, global position p):

  epoch        e = p // N                 (N = source.num_examples)
  example_id     = index_shuffle(p % N, seed=f(config.seed, e), max_index=N-1)
                                          (a fresh permutation every epoch)
  augmentation   two_views(..., seed=g(config.seed, p))

Global batch k holds positions [k*G, (k+1)*G); host h of P reads the
contiguous slice [k*G + h*G/P, k*G + (h+1)*G/P). Resuming at step k starts
the stream at position k*G, so a resumed run sees exactly the batches an
uninterrupted run would: there is no iterator state to checkpoint.

'shards': host h of P owns the source's shard files s with s % P == h
(precomputed records, or a TFDS dataset in ArrayRecord format; sources
expose `shard_sizes`) and reads only those. Its stream is a pure function of
(config.seed, h, host-local position q = k*B + j, B = G/P):

  epoch        e = q // N_h               (N_h = examples in h's shards)
  local id       = index_shuffle(q % N_h, seed=f'(config.seed, h, e), N_h-1)
  example_id     = the global id of that local id (h's shards in order)
  augmentation   two_views(..., seed=g(config.seed, p)), p = k*G + h*B + j

so resuming at step k again needs no iterator state and continues at exactly
the right example (with the same P and the same shard files).

Trade-off. 'examples' works for every source (demo, folder, TFDS, records),
its global batches do not depend on P (a run can resume on another number
of hosts) and every epoch visits each example once across all hosts; but
every host reads from every file. 'shards' needs >= P shards (records:
precompute with --num_shards a multiple of P); each host opens only its own
1/P of the files (fewer readers and connections on GCS, its files can be
staged to local disk); the order inside a host is still random access. Host
epochs have N_h examples, so with shards of different sizes hosts' epochs
do not line up, and one global "epoch" is not exactly one pass over the data.

Each element of the dataset is a per-host batch (B = G / P):
  'view1', 'view2': float32 [B, S, S, 3] in [0, 1]
  'mask1', 'mask2': int32   [B, S, S]   source segment ids through each view
  'index':          int64   [B]         global position p
  'example_id':     int64   [B]         source example id (global)
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

from typing import NamedTuple

from absl import logging
import numpy as np
import tensorflow as tf

from odin_jax.data import augment
from odin_jax.data import spanning

# Distinct constants keep the shuffle and augmentation streams independent.
_SHUFFLE_SALT = 0x5348_5546   # 'SHUF'
_AUGMENT_SALT = 0x4155_4731   # 'AUG1'
_HOST_SHUFFLE_SALT = 0x4853_4846   # 'HSHF': per-host streams ('shards')
HOST_SPLITS = ("examples", "shards")


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


def example_id_at(position, num_examples: int, seed: int, host=None):
  """int64 example id at stream position(s) p (any int64 shape []).

  A pure function of (seed, p): position p of epoch p // N maps through that
  epoch's permutation of 0..N-1. host=None: the global stream ('examples');
  host=h: host h's own stream over its N_h local examples ('shards').
  """
  position = tf.cast(position, tf.int64)
  n = tf.constant(num_examples, tf.int64)
  if host is None:
    base = tf.constant([seed, _SHUFFLE_SALT], tf.int64)
  else:
    base = tf.random.experimental.stateless_fold_in(
        tf.constant([seed, _HOST_SHUFFLE_SALT], tf.int64), int(host))
  epoch_seed = tf.random.experimental.stateless_fold_in(base, position // n)
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


class HostShards(NamedTuple):
  """The shards one host owns in 'shards' mode (K of them)."""
  shards: tuple[int, ...]   # shard indices s with s % P == h
  offsets: np.ndarray       # int64 [K] global id of each shard's first example
  sizes: np.ndarray         # int64 [K] examples in each
  num_examples: int         # N_h = sizes.sum()


def _more_shards_hint(source, num_hosts: int) -> str:
  n = int(source.num_examples)
  k = num_hosts * max(1, -(-n // (1024 * num_hosts)))  # ~1024 per shard
  if hasattr(source, "reshard_command"):
    return ("Precompute records with more shards:\n  " +
            source.reshard_command(k))
  return (f"Precompute records with --num_shards={k} (a multiple of "
          f"{num_hosts}): python -m odin_jax.data.precompute ... "
          f"--num_shards={k}")


def host_shards(source, process_index: int, process_count: int) -> HostShards:
  """Shards s with s % P == h of a sharded source (source.shard_sizes).

  Raises ValueError for sources without shard files, fewer shards than hosts
  and hosts whose shards hold no examples, saying how to fix it.
  """
  h, num_hosts = int(process_index), int(process_count)
  sizes = getattr(source, "shard_sizes", None)
  if sizes is None:
    raise ValueError(
        f"dataset.host_split='shards' needs a source stored in shard files "
        f"(precomputed records, dataset.records_dir, or a TFDS dataset in "
        f"ArrayRecord format); {type(source).__name__} has none. Use "
        f"dataset.host_split='examples'.")
  sizes = np.asarray(sizes, np.int64)
  if sizes.sum() != int(source.num_examples):
    raise ValueError(f"{type(source).__name__}: shard_sizes sum to "
                     f"{sizes.sum()}, not num_examples {source.num_examples}.")
  if len(sizes) < num_hosts:
    raise ValueError(
        f"dataset.host_split='shards' gives host h the shards s with s % "
        f"{num_hosts} == h, but the source has {len(sizes)} shard(s) for "
        f"{num_hosts} hosts. {_more_shards_hint(source, num_hosts)}\nor set "
        f"dataset.host_split='examples'.")
  mine = np.arange(h, len(sizes), num_hosts)
  offsets = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64)
  local = HostShards(tuple(int(s) for s in mine), offsets[mine], sizes[mine],
                     int(sizes[mine].sum()))
  if local.num_examples == 0:
    raise ValueError(
        f"dataset.host_split='shards': host {h} of {num_hosts} owns shards "
        f"{list(local.shards)}, which hold no examples. "
        f"{_more_shards_hint(source, num_hosts)}\nor set "
        f"dataset.host_split='examples'.")
  return local


def local_to_global_id(local_id, shards: HostShards):
  """int64 global example id of host-local id(s) (any int64 shape []).

  Local ids run through the host's shards in shard order.
  """
  local_id = tf.cast(local_id, tf.int64)
  ends = tf.constant(np.cumsum(shards.sizes), tf.int64)            # [K]
  k = tf.searchsorted(ends[None], tf.reshape(local_id, [1, 1]),
                      side="right")[0, 0]                          # shard
  start = tf.gather(ends, k) - tf.gather(tf.constant(shards.sizes), k)
  return tf.gather(tf.constant(shards.offsets), k) + local_id - start


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
    config.dataset.host_split ('examples' if absent) picks how hosts split
    the data (module docstring).
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
  split = config.get("dataset", {}).get("host_split", "examples")
  if split not in HOST_SPLITS:
    raise ValueError(f"dataset.host_split={split!r}: use one of {HOST_SPLITS}.")
  shards = host_shards(source, h, num_hosts) if split == "shards" else None
  if shards is not None:
    logging.info("Host %d of %d reads shards %s: %d of %d examples.", h,
                 num_hosts, list(shards.shards), shards.num_examples, n)
  # Odin also needs the spanning view and the views' boxes in it.
  # (Not with cached Odin masks: those come with the images, like FH.)
  discovers = ((config.odin.enabled and not config.odin.get("cached", False))
               or config.r2o.enabled)
  make_views = spanning.two_views_with_span if discovers else augment.two_views
  seed = int(config.seed)

  def position(counter):  # host-local counter -> global stream position
    step, j = counter // local, counter % local
    return step * g + h * local + j

  def example_id_of(counter, p):
    if shards is None:
      return example_id_at(p, n, seed)
    return local_to_global_id(
        example_id_at(counter, shards.num_examples, seed, host=h), shards)

  def load(counter):
    p = position(counter)
    example_id = example_id_of(counter, p)
    example = source.lookup(example_id)
    out = make_views(example["image"], example["segments"],
                     augment_seed_at(p, seed), config)
    if "hierarchy" in example:   # region-tree distances: not view-dependent
      out["hierarchy"] = example["hierarchy"]
    out["index"] = p
    out["example_id"] = example_id
    return out

  dataset_config = config.get("dataset", {})
  parallel = _autotune(dataset_config.get("num_parallel_calls", -1))
  ds = tf.data.Dataset.counter(start=int(start_step) * local, dtype=tf.int64)
  ds = ds.map(load, num_parallel_calls=parallel, deterministic=True)
  ds = ds.batch(local, drop_remainder=True)
  ds = ds.prefetch(_autotune(dataset_config.get("prefetch_batches", -1)))
  options = tf.data.Options()
  options.deterministic = True
  options.threading.max_intra_op_parallelism = 1
  threads = int(dataset_config.get("private_threads", 0))
  if threads > 0:
    options.threading.private_threadpool_size = threads
  options.experimental_optimization.map_parallelization = True
  return ds.with_options(options)


def _autotune(value) -> int:
  """-1 (or None) -> tf.data.AUTOTUNE, else the positive int given."""
  value = -1 if value is None else int(value)
  if value == -1:
    return tf.data.AUTOTUNE
  if value <= 0:
    raise ValueError(f"Expected a positive number or -1 (AUTOTUNE), got "
                     f"{value} (dataset.num_parallel_calls / "
                     "dataset.prefetch_batches).")
  return value


def numpy_batches(dataset: tf.data.Dataset):
  """Iterator of numpy dicts (same keys, shapes and dtypes) over dataset."""
  return dataset.as_numpy_iterator()
