"""Checkpoint I/O for train, evaluate and export: one home, URL-aware.

Layout: `workdir/checkpoints/<step>/{state,meta}`: orbax items holding the
TrainState and a small JSON record (step, method, config), so a restart
with an incompatible config fails clearly instead of silently loading the
wrong thing. The input stream is a pure function of (seed, step), so the
step is all it takes to resume the data.

Paths go through etils.epath, the path library orbax itself uses: a URL
workdir (gs://bucket/run) stays a URL, a local one is made absolute, and
training, evaluation and export all find the same directory
(`as_path`, `checkpoint_dir`). Whether a checkpoint's config fits the
run's, and how an older one is read, is config_compat.py's.

Atomicity is orbax's: on a local disk a step is written to
`<step>.orbax-checkpoint-tmp-<time>` and renamed when complete; on GCS
(no atomic rename) `commit_success.txt` is written last. Only finalized
steps are listed (`all_steps`), so a save killed mid-write (even kill -9
during an async save) is never taken for a checkpoint.

Damage after the commit (a truncated file, a missing array file, an empty
step directory) is caught on read: each restore tries the newest step
first and, when it cannot be read, warns with the step and the file that
failed and falls back to the next older readable one. Training then sets
the unreadable step aside as `<step>.unreadable` (renamed, never deleted or
overwritten: it stays beside the new steps for inspection, orbax's
max_to_keep never collects it, and a new save of that step cannot clash
with it). Evaluation and export only read: they fall back without
renaming. An explicit step (`restore_step` in training, `--step` in
evaluate/export) is read or fails; it never falls back.
"""

from __future__ import annotations

import dataclasses
import os
import re
from typing import Callable

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from etils import epath

from odin_jax import config_compat

# Suffixes of step directories training set aside (not step names to orbax,
# so it neither lists nor garbage-collects them).
UNREADABLE_SUFFIX = ".unreadable"
SUPERSEDED_SUFFIX = ".superseded"


class UnreadableCheckpointError(ValueError):
  """A checkpoint step (or every one) could not be read."""


class _ItemError(Exception):
  """One item of one step failed to read; str() says which file and why."""


# --- Paths ------------------------------------------------------------------


def as_path(path) -> epath.Path:
  """A workdir or file path as an epath.Path: a URL (gs://...) as it is, a
  local path made absolute (os.path.abspath would turn gs://bucket/run
  into ./gs:/bucket/run)."""
  path = os.fspath(path)
  return epath.Path(path if "://" in path else os.path.abspath(path))


def checkpoint_dir(workdir) -> epath.Path:
  """workdir/checkpoints, where every step is a directory."""
  return as_path(workdir) / "checkpoints"


# --- Training: write and resume -------------------------------------------


def manager(workdir: str, max_to_keep: int) -> ocp.CheckpointManager:
  """The read-write manager of workdir/checkpoints (async saves)."""
  options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True,
                                         enable_async_checkpointing=True)
  return ocp.CheckpointManager(checkpoint_dir(workdir), options=options)


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


def restore(mngr: ocp.CheckpointManager, state, config,
            step: int | None = None):
  """Restores a checkpoint into the structure/sharding of `state`.

  Args:
    mngr: from `manager`.
    state: the freshly initialised TrainState (its arrays' shapes, dtypes
      and shardings are those restored into).
    config: the run's config, checked against the saved one.
    step: None = the newest readable step (unreadable newer ones are warned
      about and set aside as <step>.unreadable); an int (config.restore_step)
      = exactly that step, and any newer steps are set aside as
      <step>.superseded so that the resumed run never writes over them.
  Returns:
    The restored state, or `state` unchanged when there is no checkpoint
    (and step is None).
  Raises:
    ValueError: a config that differs from the checkpoint's, or `step` not
    in the directory; UnreadableCheckpointError: no step could be read.
  """
  directory = epath.Path(mngr.directory)
  steps = sorted(mngr.all_steps())
  if not steps and step is None:
    return state
  abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, state)

  def read(s):
    meta = _read_item(mngr, s, "meta", ocp.args.JsonRestore())
    # Outside _read_item: a different config is the user's to fix, never a
    # reason to fall back to an older step.
    config_compat.check_compatible(meta, config, directory)
    if _LEGACY_TAU not in _saved_fields(mngr, s):
      return _read_item(mngr, s, "state", ocp.args.StandardRestore(abstract))
    # Written before methods/: Odin's τ was the TrainState field
    # 'discovery_params'; it is method_state['tau'] now.
    fields = {f.name: getattr(abstract, f.name)
              for f in dataclasses.fields(abstract)}
    fields[_LEGACY_TAU] = fields.pop("method_state").get("tau", {})
    old = _read_item(mngr, s, "state", ocp.args.StandardRestore(fields))
    tau = old.pop(_LEGACY_TAU)
    if tau:
      logging.info("Step %d of %s holds τ as 'discovery_params' (an older "
                   "odin_jax): restored as method_state['tau'].", s,
                   directory)
    return state.replace(**old, method_state={"tau": tau} if tau else {})

  restored, used, unreadable = _first_readable(directory, steps, step, read)
  _set_aside(mngr, unreadable, UNREADABLE_SUFFIX)
  if step is not None:
    newer = [s for s in steps if s > used]
    if newer:
      logging.warning(
          "restore_step=%d: the newer steps %s in %s are renamed to "
          "<step>%s (kept, not deleted), so the resumed run never writes "
          "over them.", used, newer, directory, SUPERSEDED_SUFFIX)
    _set_aside(mngr, newer, SUPERSEDED_SUFFIX)
  logging.info("Resumed from %s at step %d.", directory, used)
  return restored


# The TrainState field that held Odin's τ before methods/ (method_state
# ['tau'] since).
_LEGACY_TAU = "discovery_params"


def _saved_fields(mngr, step: int) -> set:
  """The top-level TrainState fields saved at `step` (empty if unknown)."""
  try:
    tree = ocp.PyTreeCheckpointHandler().metadata(
        epath.Path(mngr.directory) / str(step) / "state")
  except Exception:  # pylint: disable=broad-except
    return set()     # the restore itself then says what is wrong
  tree = getattr(tree, "tree", tree)
  return set(tree) if isinstance(tree, dict) else set()


# --- Evaluation and export: read only -------------------------------------


def read(workdir: str, step: int | None = None, *, with_state: bool = True):
  """Raw contents of workdir/checkpoints/<step> as host numpy arrays.

  Reads whatever devices wrote it, without needing the TrainState
  structure of the code that wrote it. Nothing is renamed or written.

  Args:
    workdir: the training workdir (a local path or a URL such as gs://...).
    step: None = the newest readable step (an unreadable newer one is
      warned about and skipped); an int = exactly that step.
    with_state: False reads only the small JSON record.
  Returns:
    (state, meta, step): `state` the saved TrainState as a dict of numpy
    arrays (None when with_state=False), `meta` its JSON record
    ({'step', 'method', 'config': config JSON}), `step` the step read.
  Raises:
    FileNotFoundError: no checkpoint; ValueError: unknown step;
    UnreadableCheckpointError: the step (or every step) cannot be read.
  """
  directory = checkpoint_dir(workdir)
  hint = (f"Train first (python -m odin_jax.main --config=... "
          f"--workdir={workdir}).")
  if not directory.is_dir():
    raise FileNotFoundError(f"No checkpoint directory {directory}. {hint}")
  mngr = ocp.CheckpointManager(
      directory, options=ocp.CheckpointManagerOptions(create=False),
      item_handlers={"state": ocp.PyTreeCheckpointHandler(),
                     "meta": ocp.JsonCheckpointHandler()})
  try:
    steps = sorted(mngr.all_steps())
    if not steps:
      raise FileNotFoundError(f"No checkpoint in {directory}. {hint}")

    def read_step(s):
      meta = _read_item(mngr, s, "meta", ocp.args.JsonRestore())
      if not with_state:
        return None, meta
      try:
        tree = mngr.item_metadata(s)["state"]
      except Exception as e:  # pylint: disable=broad-except
        raise _ItemError(_failure(directory / str(s), "state", e)) from e
      tree = getattr(tree, "tree", tree)
      restore_args = jax.tree.map(
          lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
      state = _read_item(mngr, s, "state",
                         ocp.args.PyTreeRestore(restore_args=restore_args))
      return state, meta

    (state, meta), used, _ = _first_readable(directory, steps, step,
                                             read_step)
  finally:
    mngr.close()
  return state, meta, used


# --- Reading with fallback ------------------------------------------------


def _read_item(mngr, step: int, item: str, args):
  """One item of one step; any failure becomes an _ItemError naming it."""
  try:
    return mngr.restore(step, args=ocp.args.Composite(**{item: args}))[item]
  except Exception as e:  # pylint: disable=broad-except
    # orbax/tensorstore raise many types here (JSONDecodeError, KeyError,
    # ValueError, plain Exception); all mean "this step cannot be read".
    raise _ItemError(_failure(epath.Path(mngr.directory) / str(step), item,
                              e)) from e


def _first_readable(directory, steps: list, step: int | None,
                    read: Callable[[int], object]):
  """(read(s), s, unreadable newer steps) for the step to use.

  step None: tries `steps` newest first, warning about each unreadable one.
  step given: reads exactly it. Every process reaches the same decision.
  """
  if step is not None:
    if int(step) not in steps:
      aside = [p.name for p in _set_aside_dirs(directory, int(step))]
      raise ValueError(
          f"No checkpoint for step {step} in {directory}; available: "
          f"{steps}." + (f" ({', '.join(aside)} was set aside as "
                         "unreadable or superseded; rename it back to use "
                         "it.)" if aside else ""))
    candidates = [int(step)]
  else:
    candidates = sorted(steps, reverse=True)
  failures = []
  for s in candidates:
    try:
      result, error = read(s), None
    except _ItemError as e:
      result, error = None, e
    if not _all_processes_agree(error is None):
      error = error or _ItemError("another process could not read it")
    if error is None:
      return result, s, [f for f, _ in failures]
    failures.append((s, error))
    if step is None:
      logging.warning(
          "Checkpoint step %d in %s is unreadable (%s). Falling back to the "
          "next older step.", s, directory, error)
  detail = "; ".join(f"step {s}: {e}" for s, e in failures)
  what = (f"Checkpoint step {step}" if step is not None else
          "No checkpoint step")
  raise UnreadableCheckpointError(
      f"{what} in {directory} could not be read ({detail}). "
      + ("Pick another with restore_step (train) or --step (evaluate, "
         f"export); available: {steps}." if step is not None else
         "Restore the files from a copy, or start again in a new workdir.")
  ) from failures[-1][1]


def _all_processes_agree(ok: bool) -> bool:
  """True when `ok` on every process (one bad host means a bad step)."""
  if jax.process_count() == 1:
    return ok
  from jax.experimental import multihost_utils
  return bool(np.all(multihost_utils.process_allgather(np.int32(ok))))


def _failure(step_dir: epath.Path, item: str, error: Exception) -> str:
  """'<file>: <cause>' for a step that failed to read, as precise as the
  exception chain allows (orbax names files only deep in the chain)."""
  try:
    if step_dir.is_dir() and not any(step_dir.iterdir()):
      return f"{step_dir} is an empty directory"
  except OSError:
    pass
  chain, e = [], error
  while e is not None and len(chain) < 8:
    chain.append(e)
    e = e.__cause__ or e.__context__
  text = "\n".join(str(x) for x in chain)
  # The most specific file under the step named anywhere in the chain.
  named = [getattr(x, "filename", None) for x in chain]
  named += re.findall(r'"(%s[^"]*)"' % re.escape(str(step_dir)), text)
  named = [str(n) for n in named if n and str(n).startswith(str(step_dir))]
  where = max(named, key=len) if named else str(
      step_dir / item / ("metadata" if item == "meta" else ""))
  entry = re.search(r'Error reading "([^"]+)"', text)
  cause = str(chain[-1]).strip().splitlines()
  cause = cause[0][:300] if cause else ""
  array = f" (array {entry.group(1)})" if entry else ""
  return f"{where.rstrip('/')}{array}: {type(chain[-1]).__name__}: {cause}"


def _set_aside(mngr: ocp.CheckpointManager, steps: list, suffix: str) -> None:
  """Renames each step directory to <step><suffix>[.<n>] (process 0), so
  orbax no longer lists, garbage-collects or re-saves over it."""
  if not steps:
    return
  directory = epath.Path(mngr.directory)
  if jax.process_index() == 0:
    for s in steps:
      source = directory / str(s)
      target = directory / f"{s}{suffix}"
      n = 1
      while target.exists():
        target = directory / f"{s}{suffix}.{n}"
        n += 1
      source.rename(target)
      logging.warning("Kept step %d as %s (not deleted; remove it yourself "
                      "once inspected, or rename it back).", s, target)
  if jax.process_count() > 1:
    ocp.multihost.sync_global_processes(f"odin_jax_set_aside{suffix}")
  mngr.reload()   # forget the renamed steps


def _set_aside_dirs(directory, step: int) -> list:
  """The directories `_set_aside` made of `step`."""
  directory = epath.Path(directory)
  if not directory.is_dir():
    return []
  return sorted(p for p in directory.iterdir()
                if p.name.startswith(f"{step}.") and
                p.name.split(".")[1] in (UNREADABLE_SUFFIX[1:],
                                         SUPERSEDED_SUFFIX[1:]))
