"""The training stream's order: pure functions of (seed, position).

Which example each position p of the training stream reads, with which
augmentation seed, and which examples stand in for it when it fails to load
(the formulas, and how config.dataset.host_split's 'examples' and 'shards'
modes split the stream over hosts: pipeline.py's module docstring). All are
TF ops on int64 scalars, so the pipeline computes them per position in its
graph, and none has state: a resumed run, or one on another number of hosts
('examples'), reads exactly the same stream.

  example_id_at(p, N, seed[, host])   the id at position p: p's epoch's
                                      permutation of 0..N-1 (index_shuffle)
  augment_seed_at(p, seed)            int64 [2] stateless seed of p's views
  substitute_at(p, k, N, seed[, host])  try k >= 1's stand-in id for p
  host_shards(source, h, P)           'shards': host h's shard files
                                      (HostShards: indices, offsets, sizes)
  local_to_global_id(i, shards)       a host-local id (its shards in order)
                                      -> the source's global id
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import tensorflow as tf

# Distinct constants keep the shuffle and augmentation streams independent.
_SHUFFLE_SALT = 0x5348_5546   # 'SHUF'
_AUGMENT_SALT = 0x4155_4731   # 'AUG1'
_HOST_SHUFFLE_SALT = 0x4853_4846   # 'HSHF': per-host streams ('shards')
_SUBSTITUTE_SALT = 0x5355_4253   # 'SUBS': substitutes of bad examples


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


def substitute_at(position, k, num_examples: int, seed: int, host=None):
  """int64 [] id in [0, num_examples) standing in, on try k >= 1, for the
  example at position p when that one fails to load.

  A stateless draw from (seed, p, k) [and host h in 'shards' mode, where p
  is h's local position and the id a local one]: the same position always
  gets the same substitutes, on any number of hosts and after a resume. A
  uniform draw (not p + k) keeps it from repeating a neighbour in the batch.
  """
  base = tf.constant([seed, _SUBSTITUTE_SALT], tf.int64)
  if host is not None:
    base = tf.random.experimental.stateless_fold_in(base, int(host))
  key = tf.random.experimental.stateless_fold_in(
      tf.random.experimental.stateless_fold_in(base, tf.cast(position,
                                                             tf.int64)),
      tf.cast(k, tf.int64))
  return tf.random.stateless_uniform([], key, minval=0, maxval=num_examples,
                                     dtype=tf.int64)



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

