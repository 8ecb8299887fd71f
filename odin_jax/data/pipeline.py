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
The functions that compute these streams (example_id_at, augment_seed_at,
host_shards, local_to_global_id) and the substitutes of bad examples below
(substitute_at) are data/stream.py's.

Bad examples. An example whose image or mask fails to load (a truncated
JPEG, a corrupt record, a mask PNG that does not decode, a failing
on-the-fly segmentation) is skipped, never fatal: position p then uses the
first of its substitutes that loads,

  substitute k = 1..MAX_SUBSTITUTES of p: a stateless uniform draw over the
                 N examples (host h's N_h in 'shards') from (seed, p, k)

so the substitute is a pure function of the position: resume and 1 vs N
hosts see the same batches. The augmentation stays that of p. The batch
says which positions were skipped ('skipped', 'bad_id');
`skips.SkippedExamples` counts them on the host, logs each bad example's name
once and stops the run when more than dataset.max_bad_fraction of the
examples read fail.

Why catch failures in the pipeline rather than decode every file while
scanning a folder: at 1.28 M images a full decode scan costs about
1.28 M x the decode time (several ms for an ImageNet JPEG) = one or more
CPU-hours before the first step, repeated whenever the folder changes; it
misses records, TFDS and mask PNGs; and it still cannot see a file that goes
bad later. Catching in the pipeline costs nothing for good examples (each
is decoded once, as before) and a few extra decodes per bad one.
FolderSource keeps its cheap header check (PIL verify), which rejects
non-images at start-up.

Each element of the dataset is a per-host batch (B = G / P):
  'view1', 'view2': uint8   [B, S, S, 3] after the geometry only: the step
                                        applies the colour recipe, keyed by
                                        'index' (data/color.py)
  'mask1', 'mask2': uint8/uint16 [B, S, S] source segment ids through each
                                        view (augment.narrow_masks)
  'index':          int64   [B]         global position p
  'example_id':     int64   [B]         source example id (global) of the
                                        example used (a substitute's id where
                                        the position's own example was bad)
  'skipped':        int32   [B]         examples tried that failed to load
                                        before one loaded (0: p's own example
                                        was fine; MAX_SUBSTITUTES + 1: none
                                        of the tries loaded, a blank image
                                        stands in)
  'bad_id':         int64   [B]         p's own example id where it failed to
                                        load, else -1 (host side: named in the
                                        log, counted: data/skips.py)
with masks.method 'hierarchy' also (data/hierarchy.py; L = max_leaves):
  'hierarchy':      float32 [B, L, L]   tree distances between leaf ids
when the method segments a spanning view on device (its span_view(), P =
SpanView.size, 2S for Odin; spanning.two_views_with_span) also:
  'span':           uint8   [B, P, P, 3] un-augmented spanning view
  'box1', 'box2':   float32 [B, 4]      view boxes in the span, (y0,x0,y1,x1)
  'flip1', 'flip2': bool    [B]
and with SpanView.with_segments (R2O)
  'span_mask':      uint8/uint16 [B, P, P] source segments on the span
"""

from __future__ import annotations

import functools

from absl import logging
import tensorflow as tf

from odin_jax import methods
from odin_jax.data import augment
from odin_jax.data import spanning
from odin_jax.data import stream

HOST_SPLITS = ("examples", "shards")
# Substitutes tried for a position whose example fails to load. With a bad
# fraction f, all of them fail with probability f**(MAX_SUBSTITUTES + 1):
# about 4e-12 at f = 5 %, so a blank stand-in means the data is mostly bad.
MAX_SUBSTITUTES = 8


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



def guarded_lookup(source, tries, id_of, blank_size: int) -> tf.data.Dataset:
  """One-element dataset: the first of `tries` whose example loads.

  Args:
    source: a sources.Source.
    tries: int32 [T] try numbers 0..T-1, in order.
    id_of: try k (int32 []) -> example id (int64 []).
    blank_size: side of the blank stand-in when no try loads.
  Returns:
    a dataset of exactly one dict: the source's 'image', 'segments' (and
    'hierarchy') plus 'example_id' int64 [] (the id used) and 'skipped' int32
    [] (tries that failed before it; T when none loaded: then a black
    blank_size^2 image with one segment stands in, so the stream never
    shifts and the host can count it).

  TensorFlow graphs cannot catch an error, so the tries are a dataset whose
  failing elements ignore_errors() drops; take(1) stops at the first that
  loads, so a good example is decoded once, as without the guard. Used per
  position, not on the whole stream (where a dropped element would shift
  every later position and nothing would count it).
  """
  def load(k):
    example_id = id_of(k)
    example = source.lookup(example_id)
    out = {"image": example["image"], "segments": example["segments"],
           "example_id": tf.cast(example_id, tf.int64), "skipped": k}
    if "hierarchy" in example:
      out["hierarchy"] = example["hierarchy"]
    return out

  found = tf.data.Dataset.from_tensor_slices(tries).map(load)
  found = found.ignore_errors().take(1)
  spec = found.element_spec
  blank = {key: tf.zeros([blank_size if d is None else d for d in s.shape],
                         s.dtype) for key, s in spec.items()}
  blank["example_id"] = tf.cast(id_of(tries[0]), tf.int64)
  blank["skipped"] = tf.size(tries, out_type=tf.int32)
  return found.concatenate(tf.data.Dataset.from_tensors(blank)).take(1)


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
  shards = (stream.host_shards(source, h, num_hosts) if split == "shards"
            else None)
  if shards is not None:
    logging.info("Host %d of %d reads shards %s: %d of %d examples.", h,
                 num_hosts, list(shards.shards), shards.num_examples, n)
  # A method that segments on device (Odin, R2O) also needs the spanning
  # view and the views' boxes in it (not with cached Odin masks: those come
  # with the images, like FH).
  span = methods.get(config).span_view()
  make_views = (functools.partial(spanning.two_views_with_span, span=span)
                if span is not None else augment.two_views)
  seed = int(config.seed)

  def position(counter):  # host-local counter -> global stream position
    step, j = counter // local, counter % local
    return step * g + h * local + j

  def example_id_of(counter, p):
    if shards is None:
      return stream.example_id_at(p, n, seed)
    return stream.local_to_global_id(stream.example_id_at(
        counter, shards.num_examples, seed, host=h), shards)

  def candidate_id(counter, p, k):
    """Example id of try k of position p: its own (k = 0) or a substitute."""
    if shards is None:
      other = stream.substitute_at(p, k, n, seed)
    else:   # from the host's own shards, keyed by its own stream
      other = stream.local_to_global_id(stream.substitute_at(
          counter, k, shards.num_examples, seed, host=h), shards)
    return tf.where(k == 0, example_id_of(counter, p), other)

  def load(counter):   # -> the first example of p's tries that loads
    p = position(counter)
    tries = tf.range(MAX_SUBSTITUTES + 1, dtype=tf.int32)
    return guarded_lookup(
        source, tries, lambda k: candidate_id(counter, p, k),
        blank_size=int(config.image_size)).map(
            lambda ex: dict(ex, index=p, bad_id=tf.where(
                ex["skipped"] > 0, example_id_of(counter, p),
                tf.constant(-1, tf.int64))))

  def views(example):
    out = augment.narrow_masks(
        make_views(example["image"], example["segments"],
                   stream.augment_seed_at(example["index"], seed), config),
        config)
    if "hierarchy" in example:   # region-tree distances: not view-dependent
      out["hierarchy"] = example["hierarchy"]
    for key in ("index", "example_id", "skipped", "bad_id"):
      out[key] = example[key]
    return out

  dataset_config = config.get("dataset", {})
  parallel = _autotune(dataset_config.get("num_parallel_calls", -1))
  ds = tf.data.Dataset.counter(start=int(start_step) * local, dtype=tf.int64)
  # One tiny dataset per position (its tries); in order, so deterministic.
  ds = ds.interleave(load, cycle_length=parallel, block_length=1,
                     num_parallel_calls=parallel, deterministic=True)
  ds = ds.map(views, num_parallel_calls=parallel, deterministic=True)
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

