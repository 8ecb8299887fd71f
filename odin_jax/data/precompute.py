r"""Precompute masks once: images + FH / SLIC / grid masks -> sharded records.

  python -m odin_jax.data.precompute --source=folder:/data/photos \
      --output_dir=/data/photos_records \
      --masks=fh:scale=1000,sigma=0.8,min_size=1000 \
      --masks=slic:n_segments=100,compactness=10
  python -m odin_jax.data.precompute --source=tfds:imagenet2012:train \
      --tfds_data_dir=$HOME/tensorflow_datasets --output_dir=/data/in1k_fh1000
  # ImageNet extracted to class folders (n01440764/*.JPEG), labels from them:
  python -m odin_jax.data.precompute --source=folder:/data/ILSVRC2012/train \
      --folder_labels --output_dir=/data/in1k_fh1000
  # COCO (DetCon: three FH scales, min_size = scale):
  python -m odin_jax.data.precompute --source=tfds:coco/2017:train \
      --output_dir=/data/coco_fh --masks=fh:scale=500,min_size=500 \
      --masks=fh:scale=1000,min_size=1000 --masks=fh:scale=1500,min_size=1500
  # Region trees for hierarchical grouping (leaf ids + leaf distances):
  python -m odin_jax.data.precompute --source=folder:/data/voc_coco \
      --output_dir=/data/voc_coco_hier --masks=hierarchy:max_leaves=40
Several machines can share one run: the same command with --num_tasks=M
--task_index=m on each (shard s belongs to task s % M; the last one to finish
writes metadata.json). Beyond that, beam_precompute.py.

How it runs (shard plan, process pool, resumable, byte-identical reruns):
records/precompute.py; the record format: records/format.py; bad inputs
(converted or skipped and counted): records/examples.py. Options and flags
are those of records.precompute (`define_flags`).
"""

from absl import app

from odin_jax.data.records import precompute


def main(argv) -> None:
  del argv
  precompute.run(precompute.options_from_flags())


if __name__ == "__main__":
  precompute.define_flags()
  app.run(main)
