"""The PRNG keys of one train step: one home for every consumer's key.

Step k's base key is fold_in(state.rng, k). Each consumer gets its own key
from one split of it, so no two draw the same numbers (deriving them with
fold_in(key, i) once gave micro-batch 1's mask sampling the mask-discovery
key). Add a consumer to STREAMS, never a fold_in elsewhere: appending keeps
the existing streams' values only if the split count stays, so a new
stream changes every key (and old runs' losses) unless it is folded in
like 'color'.
"""

from __future__ import annotations

import jax

# Split streams, in split order: 'masks' (a method's on-device mask
# discovery: Odin / R2O k-means, and the training pictures that show it),
# 'loss' (mask-id / pixel sampling, split again per micro-batch).
STREAMS = ("masks", "loss")
# Salt of the colour key: folded into the step's key, not split from it, so
# the other streams kept their values when it was added.
_COLOR_SALT = 0x434F4C52   # 'COLR'


def step_key(state) -> jax.Array:
  """The base key of the step `state` is about to take (only split).

  state: anything with `.rng` (a PRNG key) and `.step` (int32 []).
  """
  return jax.random.fold_in(state.rng, state.step)


def step_keys(state, num_micro_batches: int = 1) -> dict[str, jax.Array]:
  """Every key this step consumes, all distinct.

  Returns {'masks': key}, {'loss': keys [num_micro_batches]} (micro-batch
  i's key for forward_loss, which splits it again per view) and
  {'color': key} (the colour augmentation's, folded per example position,
  data/color.py).
  """
  base = step_key(state)
  keys = dict(zip(STREAMS, jax.random.split(base, len(STREAMS))))
  keys["loss"] = jax.random.split(keys["loss"], num_micro_batches)
  keys["color"] = jax.random.fold_in(base, _COLOR_SALT)
  return keys
