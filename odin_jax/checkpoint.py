"""Orbax checkpoints of the whole train state under `workdir/checkpoints`.

A checkpoint holds the TrainState and a small JSON record (step, method,
config) so a restart with an incompatible config fails clearly instead of
silently loading the wrong thing. Orbax writes each step to a temporary
directory and renames it when complete, so a run killed mid-save (even with
kill -9) leaves the previous checkpoint intact. The input stream is a pure
function of (seed, step), so the step is all it takes to resume the data.
"""

from __future__ import annotations

import os

import jax
import orbax.checkpoint as ocp
from absl import logging

# Fields that may change between a run and its resumption without
# invalidating the checkpoint (logging, schedules of saving, block mode), and
# (dotted: one field of a section) the memory/profiling knobs, which change
# how the same computation is laid out, not what it computes: a run resumed
# on a bigger slice may turn FSDP or remat off, and may profile other steps.
_MUTABLE_FIELDS = ("log_every_steps", "checkpoint_every_steps", "max_to_keep",
                   "block_every_step", "total_steps", "num_epochs", "eval",
                   "profile", "sharding", "model.remat")


def manager(workdir: str, max_to_keep: int) -> ocp.CheckpointManager:
  # A URL (gs://bucket/run, read by orbax directly) stays as it is: abspath
  # would turn it into ./gs:/bucket/run.
  root = workdir if "://" in workdir else os.path.abspath(workdir)
  directory = os.path.join(root, "checkpoints")
  options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True,
                                         enable_async_checkpointing=True)
  return ocp.CheckpointManager(directory, options=options)


def save(mngr: ocp.CheckpointManager, state, config) -> None:
  """Saves `state` at its step (asynchronously; call wait before exit)."""
  step = int(jax.device_get(state.step))
  meta = {"step": step, "method": config.method, "config": config.to_json()}
  # force: the loop decides when to save (periodic, final, preemption);
  # orbax's own interval policy must not silently skip a requested save.
  saved = mngr.save(step, args=ocp.args.Composite(
      state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)),
      force=True)
  if not saved:
    raise RuntimeError(f"orbax refused to save step {step} in "
                       f"{mngr.directory}.")


def restore_latest(mngr: ocp.CheckpointManager, state, config):
  """Restores the latest checkpoint into the structure/sharding of `state`.

  Returns `state` unchanged when there is no checkpoint.
  """
  step = mngr.latest_step()
  if step is None:
    return state
  abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, state)
  restored = mngr.restore(step, args=ocp.args.Composite(
      state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()))
  _check_compatible(restored["meta"], config, mngr.directory)
  logging.info("Resumed from %s at step %d.", mngr.directory, step)
  return restored["state"]


def _check_compatible(meta: dict, config, directory) -> None:
  import json
  saved = _flatten(json.loads(meta["config"]))
  now = _flatten(json.loads(config.to_json()))
  diffs = [k for k in sorted(set(saved) | set(now))
           if not _is_mutable(k) and saved.get(k) != now.get(k)]
  if diffs:
    raise ValueError(
        f"The checkpoint in {directory} was written with a different config "
        f"(fields {diffs} differ). Use a new --workdir for a new experiment, "
        "or pass the original config to resume.")


def _flatten(tree: dict, prefix: str = "") -> dict:
  """{'model': {'depth': 50}} -> {'model.depth': 50}."""
  flat = {}
  for k, v in tree.items():
    if isinstance(v, dict) and v:
      flat.update(_flatten(v, f"{prefix}{k}."))
    else:
      flat[f"{prefix}{k}"] = v
  return flat


def _is_mutable(name: str) -> bool:
  """True if `name` or a section containing it is in _MUTABLE_FIELDS."""
  parts = name.split(".")
  return any(".".join(parts[:i]) in _MUTABLE_FIELDS
             for i in range(1, len(parts) + 1))
