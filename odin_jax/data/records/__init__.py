"""Precomputed images + masks on disk: one format, one writer, one reader.

  format.py      what a records directory and one record hold (file names,
                 features, dtypes, FORMAT / VERSION), the record bytes
  settings.py    mask settings ('fh:scale=1000,...') and the precompute
                 command that writes them
  writer.py      ShardWriter (one shard, atomically), finalize (metadata.json)
  reader.py      RecordSource: random access for the training pipeline
  examples.py    one input -> one record (image normalisation + masks)
  inputs.py      the precompute's inputs: a folder or a TFDS split
  precompute.py  the precompute run (a process pool) and its flags

Writers: the precompute (command lines data/precompute.py and
data/beam_precompute.py) and Odin's mask cache (methods/odin_cache.py). Readers:
data/sources.make_source (dataset.records_dir) and the mask cache. The names
below are the package's interface: `from odin_jax.data import records` then
`records.RecordSource(...)`, `records.METADATA`, ...
"""

from odin_jax.data.records.format import FORMAT
from odin_jax.data.records.format import HIERARCHY_PREFIX
from odin_jax.data.records.format import MASK_PREFIX
from odin_jax.data.records.format import MAX_SEGMENTS
from odin_jax.data.records.format import METADATA
from odin_jax.data.records.format import SPEC
from odin_jax.data.records.format import VERSION
from odin_jax.data.records.format import WRITER_OPTIONS
from odin_jax.data.records.format import encode_distances
from odin_jax.data.records.format import encode_example
from odin_jax.data.records.format import encode_mask_png
from odin_jax.data.records.format import read_json
from odin_jax.data.records.format import shard_name
from odin_jax.data.records.format import stats_name
from odin_jax.data.records.format import write_json_atomic
from odin_jax.data.records.reader import RecordSource
from odin_jax.data.records.settings import RUN_FLAGS
from odin_jax.data.records.settings import as_mask_config
from odin_jax.data.records.settings import mask_setting_string
from odin_jax.data.records.settings import parse_mask_setting
from odin_jax.data.records.settings import precompute_command

__all__ = [
    "FORMAT", "HIERARCHY_PREFIX", "MASK_PREFIX", "MAX_SEGMENTS", "METADATA",
    "RUN_FLAGS", "RecordSource", "SPEC", "VERSION", "WRITER_OPTIONS",
    "as_mask_config", "encode_distances", "encode_example", "encode_mask_png",
    "mask_setting_string", "parse_mask_setting", "precompute_command",
    "read_json", "shard_name", "stats_name", "write_json_atomic",
]
