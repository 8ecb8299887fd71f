"""Host side of skipped examples: count, name and bound them.

The pipeline (pipeline.py, "Bad examples") replaces an example that fails to
load by a substitute fixed by its stream position and marks the position in
the batch ('skipped', 'bad_id'). Here the training host counts those marks
(train/skipped_examples), names each bad example once in the log (its file
or record id and the error of loading it again) and stops the run when more
than config.dataset.max_bad_fraction of the examples read are bad.
"""

from __future__ import annotations

import re

from absl import logging
import numpy as np
import tensorflow as tf

from odin_jax.data import pipeline

class BadDataError(RuntimeError):
  """More than dataset.max_bad_fraction of the examples read failed to load."""


# The fraction is judged once this many examples were read (or the whole
# dataset, if smaller): at a true 3 % a 1000-example sample exceeds 5 % with
# probability ~1e-4, so an unlucky first batch never stops a healthy run.
_MIN_EXAMPLES_JUDGED = 1000
_MAX_NAMED = 20   # bad examples named (with their error) in the log / error


def describe_example(source, example_id: int) -> str:
  """The name of a source's example for messages: its file or record id."""
  describe = getattr(source, "describe", None)
  return describe(int(example_id)) if describe else f"example {example_id}"


def load_error(source, example_id: int) -> str:
  """Why example_id fails to load: the error of loading it again, eagerly
  (the pipeline only knows that it failed). '' if it loads now."""
  try:
    example = source.lookup(tf.constant(int(example_id), tf.int64))
    for value in example.values():
      np.asarray(value)
    return ""
  except Exception as e:  # pylint: disable=broad-except
    # TF messages: '{{function_node ...}} what went wrong [Op:Name] ...';
    # a Python error in a numpy_function ends with its own last line.
    lines = [l.strip() for l in str(e).splitlines() if l.strip()]
    detail = lines[-1] if lines else ""
    detail = re.sub(r"^\{\{[^}]*\}\}\s*", "", detail)
    detail = re.sub(r"\s*\[Op:.*$", "", detail)
    return f"{type(e).__name__}: {detail}"[:300]


def _precompute_advice(source, config) -> str:
  """How to convert the data once (precompute skips what it cannot read)."""
  from odin_jax.data import records  # pylint: disable=g-import-not-at-top
  meta = getattr(source, "metadata", None)
  if meta is not None:   # precomputed records whose bytes went bad
    return ("The records themselves are damaged: write them again into a new "
            "directory with\n  " + str(meta.get("command", "python -m "
                                                "odin_jax.data.precompute")))
  spec = getattr(source, "precompute_spec", None)
  try:
    setting = records.mask_setting_string(config.masks)
  except ValueError:
    setting = "fh:scale=1000,sigma=0.8,min_size=1000"
  cmd = records.precompute_command(spec or "folder:/path/to/images",
                                   "/path/to/records", [setting])
  return ("Convert the data once with python -m odin_jax.data.precompute, "
          "which converts what it can and lists what it skips:\n  " + cmd +
          "\nthen train with --config.dataset.records_dir=/path/to/records.")


class SkippedExamples:
  """Counts, names and bounds the examples the pipeline skipped (host side).

  add(batch) once per batch read; result() at every metrics write (on all
  processes: it sums over them) gives {'train/skipped_examples': examples
  skipped over all hosts since the previous write} and raises BadDataError
  when more than max_bad_fraction of the examples read in this run failed.
  """

  def __init__(self, source, config):
    self.source, self.config = source, config
    self.max_fraction = float(config.dataset.get("max_bad_fraction", 0.05))
    self.bad = self.seen = 0           # this host, whole run
    self._bad_since = 0                # this host, since the last result()
    self._total_bad = self._total_seen = 0   # all hosts, whole run
    self.named: dict[int, str] = {}   # bad example id -> name (+ error)

  def add(self, batch) -> int:
    """Counts and logs the skips of one host batch; returns their number."""
    skipped = np.asarray(batch["skipped"]) > 0
    self.seen += int(skipped.size)
    count = int(skipped.sum())
    self.bad += count
    self._bad_since += count
    for bad_id, tries in zip(np.asarray(batch["bad_id"])[skipped],
                             np.asarray(batch["skipped"])[skipped]):
      if int(bad_id) in self.named or len(self.named) >= _MAX_NAMED:
        continue
      name = describe_example(self.source, bad_id)
      error = load_error(self.source, bad_id)
      self.named[int(bad_id)] = f"{name} ({error})" if error else name
      logging.warning(
          "Skipped example %s: it failed to load (%s); a substitute stands "
          "in%s.",
          name, error or "not reproducible now",
          "" if tries <= pipeline.MAX_SUBSTITUTES else
          f" - no: all {pipeline.MAX_SUBSTITUTES} substitutes failed too, a "
          "blank image stands in")
    return count

  def result(self) -> dict:
    """{'train/skipped_examples': n} summed over hosts; checks the fraction."""
    counts = np.array([self._bad_since, self.seen], np.int64)
    self._bad_since = 0
    import jax  # pylint: disable=g-import-not-at-top
    if jax.process_count() > 1:   # every process calls this at the same step
      from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
      counts = np.asarray(multihost_utils.process_allgather(counts)).reshape(
          -1, 2)
      since, seen = int(counts[:, 0].sum()), int(counts[:, 1].sum())
    else:
      since, seen = int(counts[0]), int(counts[1])
    self._total_bad += since
    self._total_seen = seen
    self._check()
    return {"train/skipped_examples": since}

  def _check(self) -> None:
    bad, seen = self._total_bad, self._total_seen
    judged = min(_MIN_EXAMPLES_JUDGED, int(self.source.num_examples))
    if seen < judged or bad <= self.max_fraction * seen:
      return
    named = "\n".join(f"  {v}" for v in self.named.values())
    raise BadDataError(
        f"{bad} of the {seen} examples read in this run failed to load "
        f"({bad / seen:.1%}, more than dataset.max_bad_fraction="
        f"{self.max_fraction:g}); training stopped. Examples (this host):\n"
        f"{named}\n{_precompute_advice(self.source, self.config)}\nor raise "
        "--config.dataset.max_bad_fraction to train on the rest.")
