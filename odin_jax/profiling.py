"""A JAX profiler trace of chosen train steps (config.profile).

With `profile.num_steps = n > 0` the train loop traces its steps
a, ..., a + n - 1 (a = `profile.start_step`, steps numbered from 1 as in the
logs) into `workdir/profile`. The trace holds the host (Python, input
pipeline) and device (XLA ops, collectives) timelines. Writing it needs
nothing beyond jax: `jax.profiler.stop_trace` saves
`workdir/profile/plugins/profile/<time>/<host>.xplane.pb` itself. Reading
it needs a viewer: XProf (`pip install xprof`, which is also TensorBoard's
profile plugin, formerly `tensorboard-plugin-profile`), pointed at
`workdir/profile`.

Every process traces by default (`profile.all_processes`): on a pod the step
time is set by the slowest host, and only its own trace shows why (input
stalls, a late collective). Each host writes its own `<host>.xplane.pb`, so
the files do not clash, and the profile plugin shows them together. Set it
to False to trace process 0 only (less to upload from a large pod).

Pick a after the first step (compilation) and past any step that does
something rare (evaluation, checkpoints) unless that is what you want to see.
"""

from __future__ import annotations

import os

import jax
from absl import logging


def trace_dir(workdir: str) -> str:
  """Where traces go: `workdir/profile` (TensorBoard's --logdir for them)."""
  return os.path.join(workdir, "profile")


class StepProfiler:
  """Starts and stops the trace around the configured train steps.

  Use as a context manager around the loop, and call `before_step(number,
  state)` at the top of each iteration, before step `number` is fetched and
  dispatched. Leaving the context (end of training, preemption, an
  exception) stops a trace that is still running, so the steps traced so
  far are saved.
  """

  def __init__(self, config, workdir: str):
    p = config.profile
    self.first = int(p.start_step)
    self.end = self.first + int(p.num_steps)   # first step not traced
    self.enabled = p.num_steps > 0 and (p.all_processes or
                                        jax.process_index() == 0)
    self.directory = trace_dir(workdir)
    self._active = False
    self._annotation = None
    self._traced = []          # step numbers inside the running trace

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    # The loop has fetched the last step's metrics by now, so its device
    # work is finished and in the trace.
    self._stop()

  def before_step(self, number: int, state) -> None:
    """Starts the trace before step `first`, stops it before step `end`.

    A run resumed inside the window traces the rest of it. Stopping first
    waits for `state` (the output of step end - 1): the trace must contain
    that step's device work, not just its dispatch.
    """
    if not self.enabled:
      return
    if number >= self.end and self._active:
      jax.block_until_ready(state)
      self._stop()
    elif self.first <= number < self.end and not self._active:
      # No makedirs: the profiler creates the directory itself, also on
      # gs:// (which os.makedirs cannot).
      logging.info("Profiling steps %d-%d into %s.", number, self.end - 1,
                   self.directory)
      jax.profiler.start_trace(self.directory)
      self._active = True
    if self._active:
      self._annotate(number)

  def _annotate(self, number: int) -> None:
    """Marks iteration `number` as one step in the trace's step view."""
    self._close_annotation()
    self._annotation = jax.profiler.StepTraceAnnotation("train",
                                                        step_num=number)
    self._annotation.__enter__()
    self._traced.append(number)

  def _close_annotation(self) -> None:
    if self._annotation is not None:
      self._annotation.__exit__(None, None, None)
      self._annotation = None

  def _stop(self) -> None:
    if not self._active:
      return
    self._close_annotation()
    jax.profiler.stop_trace()
    self._active = False
    logging.info("Wrote the profile of steps %s to %s.",
                 f"{self._traced[0]}-{self._traced[-1]}" if self._traced
                 else "(none)", self.directory)
    self._traced = []
