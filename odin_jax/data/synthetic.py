"""Random batches in the input pipeline's contract, for benchmarks and tests.

`synthetic_batch(config, rng)` returns what pipeline.make_train_dataset
yields for one global batch, filtered to the method's batch_keys(), with random
content: uint8 views, blocky segment maps, stream positions, and for Odin /
R2O the spanning view and the views' boxes in it. Benchmarks time the step
on it without an input pipeline; tests use it where the data do not matter.
"""

from __future__ import annotations

import numpy as np

from odin_jax import methods


def _blocks(rng, shape, num_ids: int, block: int) -> np.ndarray:
  """int32 [*shape] segment map of random ids in block x block squares."""
  *lead, h, w = shape
  ids = rng.integers(0, num_ids, (*lead, h // block, w // block))
  return np.kron(ids, np.ones((block, block), np.int64)).astype(np.int32)


def synthetic_batch(config, rng: np.random.Generator, *, first_index: int = 0,
                    num_ids: int = 40) -> dict[str, np.ndarray]:
  """One global batch of B = config.batch_size random examples.

  Returns:
    view1, view2  uint8 [B, S, S, 3]
    mask1, mask2  int32 [B, S, S]   ids < num_ids in 8 x 8 blocks
    index         int32 [B]         first_index + 0..B-1 (stream positions)
    when the method segments a spanning view (its span_view()) also:
    span          uint8 [B, P, P, 3] (P = SpanView.size)
    box1, box2    float32 [B, 4]    boxes (y0, x0, y1, x1) of side 0.6
    flip1, flip2  bool [B]
    span_mask     int32 [B, P, P]   (SpanView.with_segments: R2O)
  """
  b, s = int(config.batch_size), int(config.image_size)
  views = rng.integers(0, 256, (2, b, s, s, 3), dtype=np.uint8)
  masks = _blocks(rng, (2, b, s, s), num_ids, 8)
  batch = {"view1": views[0], "view2": views[1], "mask1": masks[0],
           "mask2": masks[1],
           "index": np.arange(first_index, first_index + b, dtype=np.int32)}
  span = methods.get(config).span_view()
  if span is not None:
    p = span.size
    lo = rng.random((2, b, 2)) * 0.4
    batch.update({
        "span": rng.integers(0, 256, (b, p, p, 3), dtype=np.uint8),
        "box1": np.concatenate([lo[0], lo[0] + 0.6], -1).astype(np.float32),
        "box2": np.concatenate([lo[1], lo[1] + 0.6], -1).astype(np.float32),
        "flip1": rng.random(b) < 0.5, "flip2": rng.random(b) < 0.5})
    if span.with_segments:
      batch["span_mask"] = _blocks(rng, (b, p, p), 60, 8)
  return batch
