"""Any failure ends the process promptly, non-zero, with the cause printed last.

What kept a failed run alive (issue 16): after the traceback, the
interpreter's exit waits for every non-daemon thread and runs the atexit
hooks. Orbax's background commit threads then fail noisily ("cannot schedule
new futures after interpreter shutdown", printed after the cause: seen with
a save in flight), tf.data's in-flight map work is waited for, and with
several processes `jax.distributed.shutdown` (JAX's atexit hook) waits up to
its shutdown_timeout_seconds (300 s by default: the 5 minutes of the issue)
for peers that are themselves blocked in a collective, waiting for the
failed process. A job on a TPU slice or a SLURM
allocation that neither trains nor exits burns the reservation.

So `exit_on_failure` (the entry points' wrapper) handles a failure itself:

1. the objects that `close_on_failure` guards (metric writer, checkpoint
   manager) are closed where they live, each in a daemon thread given
   CLOSE_TIMEOUT_S: an in-flight save of a good step still lands, but a
   close that waits for a dead peer is abandoned;
2. with several processes, the failure is posted in the JAX coordination
   service's key-value store; every other process watches that key
   (`watch_peers`, started by runtime.setup) and exits non-zero at once,
   instead of waiting in a collective or in the shutdown barrier. A process
   that dies without posting (kill -9, a lost host) is still detected by
   the coordination service's heartbeat (100 s) and the collectives'
   timeouts;
3. the traceback is logged, then `Type: message` of the cause is printed
   last on stderr, and `os._exit(1)` ends the process: no thread or atexit
   hook can keep it alive.

Fault injection (a test hook; without it nothing changes):
  ODIN_JAX_INJECT_FAILURE=PLACE[:STEP]  raise InjectedFailure at PLACE, the
  first time it is reached at training step STEP (default: the first time).
  PLACE is one of
    input       the training input iterator, after tf.data started (STEP:
                the step whose batch is read)
    step        right after the train step STEP was dispatched
    eval        the periodic evaluation after STEP steps (eval.every_steps)
    checkpoint  right after the save of step STEP started (still in flight)
    pictures    the TensorBoard discovery pictures of step STEP (Odin)
"""

from __future__ import annotations

import atexit
import contextlib
import logging as pylogging
import os
import sys
import threading
import time
import traceback
from typing import Callable, Mapping

import jax
from absl import logging

ENV_INJECT = "ODIN_JAX_INJECT_FAILURE"
PLACES = ("input", "step", "eval", "checkpoint", "pictures")
# How long a failing process gives each close (writer flush, finishing an
# in-flight checkpoint save) before abandoning it.
CLOSE_TIMEOUT_S = 30.0
# How long a failing process waits for its peers to acknowledge its failure
# notice before it exits (process 0 hosts the coordination service: exiting
# at once could take the notice down with it).
ACK_TIMEOUT_S = 10.0
_FAILED_KEY = "odin_jax/failed"            # value: the failing process's cause
_ACK_KEY = "odin_jax/failure_seen/{}"     # one per process that saw it
# The watcher's blocking read returns at once when the key is set; its
# timeout only bounds how long a normal exit waits for the watcher to leave
# the C++ call before JAX shuts the client down (with a 1-hour read, a
# preempted loopback process once died of SIGABRT at exit).
_WATCH_MS = 1000

_exiting = threading.Event()   # this process is already on its way out
_watcher: threading.Thread | None = None   # started by watch_peers
_last_word = threading.Lock()  # one final line, even if two threads fail


class InjectedFailure(RuntimeError):
  """The failure that ODIN_JAX_INJECT_FAILURE asked for."""


def injection(environ: Mapping[str, str] | None = None
              ) -> tuple[str, int | None] | None:
  """(place, step or None) that ODIN_JAX_INJECT_FAILURE asks for, or None.

  Raises ValueError naming the variable when its value is malformed.
  """
  environ = os.environ if environ is None else environ
  value = environ.get(ENV_INJECT, "").strip()
  if not value:
    return None
  place, _, at = value.partition(":")
  if place not in PLACES or (at and not at.strip().isdigit()):
    raise ValueError(
        f"{ENV_INJECT}={value!r}: use PLACE or PLACE:STEP with PLACE one of "
        f"{', '.join(PLACES)} and STEP a step number; unset it to train "
        "normally.")
  return place, int(at) if at else None


def inject(place: str, step: int) -> None:
  """Raises InjectedFailure if ODIN_JAX_INJECT_FAILURE names this place/step.

  Called at the real call sites (train.py); a no-op when the variable is
  unset. Without a STEP, it fires at the first step that reaches `place`.
  """
  wanted = injection()
  if wanted is None or wanted[0] != place:
    return
  if wanted[1] is None or wanted[1] == step:
    raise InjectedFailure(f"{ENV_INJECT}={os.environ[ENV_INJECT]}: injected "
                          f"failure in the {place} at step {step}.")


def failing_input(batches, first_step: int):
  """`batches` (an iterator of step first_step+1, ...) with `inject('input')`
  checked before each step's batch is handed out; `batches` itself when no
  input failure is asked for."""
  wanted = injection()
  if wanted is None or wanted[0] != "input":
    return batches

  def checked():
    for number, batch in enumerate(batches, start=first_step + 1):
      inject("input", number)
      yield batch
  return checked()


def _bounded(name: str, fn: Callable[[], object], timeout_s: float) -> None:
  """Runs fn() in a daemon thread for at most timeout_s; logs, never raises."""
  def run():
    try:
      fn()
    except Exception as e:  # pylint: disable=broad-except
      logging.warning("Closing the %s after the failure failed: %r", name, e)
  worker = threading.Thread(target=run, name=f"close {name}", daemon=True)
  worker.start()
  worker.join(timeout_s)
  if worker.is_alive():
    logging.warning("Closing the %s did not finish in %.0f s; abandoned.",
                    name, timeout_s)


@contextlib.contextmanager
def close_on_failure(*closers: tuple[str, Callable[[], object]],
                     timeout_s: float = CLOSE_TIMEOUT_S):
  """On an exception inside the block, runs each (name, close) in order,
  each for at most timeout_s, then re-raises.

  For objects whose close saves work (metric writers flush their events,
  a checkpoint manager finishes an in-flight save) but may block forever
  when the failure was theirs or a peer's. On success nothing is closed:
  the caller owns the normal path.
  """
  try:
    yield
  except BaseException:
    for name, close in closers:
      _bounded(name, close, timeout_s)
    raise


def _client():
  """The JAX distributed runtime's client, or None (one process).

  JAX has no public API for its coordination service's key-value store;
  orbax uses the same private attribute for its barriers. Without it the
  peers fall back on the heartbeat and collective timeouts.
  """
  if not jax.distributed.is_initialized() or jax.process_count() <= 1:
    return None
  from jax._src import distributed  # pylint: disable=g-import-not-at-top
  return getattr(distributed.global_state, "client", None)


def _final_words(line: str) -> None:
  """Prints `line` as the last thing on stderr and ends the process (1).

  Python logging is switched off first so that no other thread's log line
  lands after it; os._exit skips the atexit hooks and non-daemon threads
  that would keep the process alive.
  """
  _last_word.acquire()   # a second caller (watcher vs main) waits for exit
  pylogging.disable(pylogging.CRITICAL)
  try:
    sys.stdout.flush()
  except Exception:  # pylint: disable=broad-except
    pass
  sys.stderr.write(line.rstrip("\n") + "\n")
  sys.stderr.flush()
  os._exit(1)  # pylint: disable=protected-access


def _tell_peers(cause: str) -> None:
  """Posts this process's failure for the others' `watch_peers`, then waits
  (at most ACK_TIMEOUT_S) until each has seen it."""
  client = _client()
  if client is None:
    return
  me, count = jax.process_index(), jax.process_count()
  try:
    client.key_value_set(_FAILED_KEY, f"process {me}: {cause}")
  except Exception as e:  # pylint: disable=broad-except
    # Already set: another process failed first and told everyone.
    logging.warning("Could not post the failure to the other processes: %s",
                    e)
    return
  deadline = time.monotonic() + ACK_TIMEOUT_S
  for peer in range(count):
    remaining_ms = int(1000 * (deadline - time.monotonic()))
    if peer == me or remaining_ms <= 0:
      continue
    try:
      client.blocking_key_value_get(_ACK_KEY.format(peer), remaining_ms)
    except Exception:  # pylint: disable=broad-except
      logging.warning("Process %d did not acknowledge the failure notice; "
                      "it stops at its collective or heartbeat timeout.",
                      peer)


def exit_on_failure(fn: Callable[[], object]):
  """Returns fn(); if it raises, ends the process non-zero (never returns).

  The traceback is logged, the other processes are told (several
  processes), and `Type: message` of the exception is the last line on
  stderr. Objects that need closing are closed by `close_on_failure` where
  they live, before the exception reaches this point.
  """
  try:
    return fn()
  except (Exception, KeyboardInterrupt) as e:  # pylint: disable=broad-except
    _exiting.set()
    where = (f" (process {jax.process_index()} of {jax.process_count()})"
             if _client() is not None else "")
    logging.error("Failed%s; exiting:\n%s", where,
                  "".join(traceback.format_exception(e)))
    cause = "".join(traceback.format_exception_only(e)).strip()
    _tell_peers(cause)
    _final_words(f"odin_jax failed{where}: {cause}")


def _watch(client, me: int) -> None:
  """Blocks on the failure key; when another process posts it, exits."""
  while True:
    try:
      cause = client.blocking_key_value_get(_FAILED_KEY, _WATCH_MS)
    except Exception as e:  # pylint: disable=broad-except
      if _exiting.is_set():
        return   # this process is exiting (normally, or by its own failure)
      if "DEADLINE_EXCEEDED" in str(e):
        continue
      # Process 0, which hosts the coordination service, is gone.
      _exiting.set()
      _final_words(f"odin_jax stopped (process {me}): lost the JAX "
                   f"coordination service: {e}")
    if cause.startswith(f"process {me}:"):
      return   # our own notice: exit_on_failure is already ending us
    try:   # the failed process waits for this before it exits
      client.key_value_set(_ACK_KEY.format(me), "1")
    except Exception:  # pylint: disable=broad-except
      pass
    if _exiting.is_set():
      return   # this process failed too and is ending itself
    _exiting.set()
    _final_words(f"odin_jax stopped (process {me}): another process failed, "
                 f"{cause}")


def watch_peers() -> bool:
  """Starts the daemon thread that ends this process when another fails.

  Call once after jax.distributed.initialize (runtime.setup does). Returns
  whether a watcher runs (False with one process).
  """
  global _watcher
  client = _client()
  if client is None or _watcher is not None:
    return client is not None
  _watcher = threading.Thread(
      target=_watch, args=(client, jax.process_index()),
      name="odin_jax peer failure watch", daemon=True)
  _watcher.start()
  # Runs before JAX's own atexit hook (registered earlier) shuts the client
  # down: the watcher must be out of its read by then.
  atexit.register(_stop_watching)
  return True


def _stop_watching() -> None:
  """Normal exit: lets the watcher's current read time out and end."""
  _exiting.set()
  if _watcher is not None:
    _watcher.join(timeout=5 * _WATCH_MS / 1000)
