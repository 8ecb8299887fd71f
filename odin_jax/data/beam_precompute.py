r"""The mask precompute as an Apache Beam pipeline (optional extra `beam`).

Same inputs, shard plan (records.precompute.prepare), per-example function
(records.examples.process_example) and shard writer (records.writer) as
`python -m odin_jax.data.precompute`, so the output directory is
byte-identical to the multiprocessing run's, and either can resume the
other's unfinished run.

  python -m odin_jax.data.beam_precompute --source=folder:/data/photos \
      --output_dir=/mnt/shared/photos_records --masks=fh:scale=1000 \
      --beam_options="--runner=DirectRunner --direct_num_workers=8 \
                      --direct_running_mode=multi_processing"

For Dataflow / Flink / Spark put the runner's options (and --setup_file to
ship odin_jax to the workers) in --beam_options. The workers and the launcher
must see the same --output_dir and image folder (a shared mount: the writer
uses local file operations).

Graph: Create((shard, position, input)) -> Reshuffle (spread the work) ->
load + process_example -> GroupByKey(shard) -> sort by position -> ShardWriter
(temporary file, then rename). metadata.json is written by the launcher once
every shard exists.
"""

from __future__ import annotations

import shlex
from typing import Iterable

from absl import app
from absl import flags
from absl import logging

from odin_jax.data.records import examples
from odin_jax.data.records import precompute
from odin_jax.data.records import writer

try:
  import apache_beam as beam  # pylint: disable=g-import-not-at-top
  from apache_beam.options.pipeline_options import PipelineOptions  # pylint: disable=g-import-not-at-top
except ImportError as e:  # pragma: no cover - depends on the environment
  raise ImportError("odin_jax.data.beam_precompute needs Apache Beam: pip "
                    "install 'odin_jax[beam]' (or use python -m "
                    "odin_jax.data.precompute on one machine).") from e


class _ProcessExample(beam.DoFn):
  """(shard, position, locator) -> (shard, (position, ExampleResult))."""

  def __init__(self, loader, spec: examples.ExampleSpec):
    super().__init__()
    self._loader, self._spec = loader, spec

  def process(self, element):
    shard, position, locator = element
    result = examples.process_example(self._loader.load(locator), self._spec)
    yield shard, (position, result)


def _write_shard(element, output_dir: str, num_shards: int) -> int:
  """(shard, [(position, result)]) -> shard, after writing it atomically."""
  shard, items = element
  shard_writer = writer.ShardWriter(output_dir, shard, num_shards)
  for _, result in sorted(items, key=lambda item: item[0]):
    shard_writer.add(result)
  shard_writer.close()
  return shard


def build_pipeline(root, plan: precompute.Plan, output_dir: str):
  """Adds the precompute of plan.pending's non-empty shards to pipeline root."""
  num_shards = plan.run_spec["num_shards"]
  tasks = [(s, j, plan.inputs.locators[i]) for s in plan.pending
           for j, i in enumerate(plan.shards[s])]
  return (root
          | "Inputs" >> beam.Create(tasks)
          | "Spread" >> beam.Reshuffle()
          | "Process" >> beam.ParDo(_ProcessExample(plan.inputs.loader(),
                                                    plan.spec))
          | "ByShard" >> beam.GroupByKey()
          | "Write" >> beam.Map(_write_shard, output_dir, num_shards))


def run(options: precompute.Options,
        beam_args: Iterable[str] = ()) -> dict | None:
  """Runs (or resumes) the precompute on Beam; metadata (None if unfinished)."""
  plan = precompute.prepare(options)
  num_shards = plan.run_spec["num_shards"]
  for s in [s for s in plan.pending if not plan.shards[s]]:
    writer.ShardWriter(options.output_dir, s, num_shards).close()  # empty
  if any(plan.shards[s] for s in plan.pending):
    logging.info("beam_precompute: %d shards to write -> %s",
                 len(plan.pending), options.output_dir)
    with beam.Pipeline(options=PipelineOptions(list(beam_args))) as root:
      build_pipeline(root, plan, options.output_dir)
  meta = writer.finalize(options.output_dir, plan.run_spec)
  if meta is not None:
    logging.info("beam_precompute summary (%s):\n%s", options.output_dir,
                 writer.format_summary(meta))
  return meta


def main(argv) -> None:
  del argv
  run(precompute.options_from_flags(),
      shlex.split(flags.FLAGS.beam_options))


if __name__ == "__main__":
  from odin_jax.data import beam_precompute as _module  # pylint: disable=g-import-not-at-top,import-self
  precompute.define_flags()
  flags.DEFINE_string("beam_options", "", "Beam pipeline options, e.g. "
                      "'--runner=DataflowRunner --project=P --region=R'.")
  app.run(_module.main)
