"""train_and_evaluate: mesh, state, input, the loop, checkpoints, metrics.

The loop is the same for every method (see step.py). Resume is exact: the
state is restored from the latest orbax checkpoint and the input stream
restarts at that step's position (the stream is a pure function of the seed
and the position), so a killed-and-restarted run reaches the same parameters
and losses as an uninterrupted one.
"""

from __future__ import annotations

import math
import signal
import threading
import time

import jax
from absl import logging
from jax.experimental import multihost_utils

from odin_jax import (checkpoint, config_check, failure, health, profiling,
                      reporting, sharding, step)
from odin_jax.data import pipeline, skips, sources
from odin_jax.evaluate import report, runner
from odin_jax.export import weights_in


class NonFiniteLossError(FloatingPointError):
  """Raised when the loss becomes NaN or infinite; nothing is saved."""


class _Preemption:
  """Turns SIGTERM into a stop the loop checks: save, then exit cleanly.

  One process: a Python SIGTERM handler sets a flag. Several processes: the
  save is collective, so all must stop at the same step, yet the signal
  reaches hosts at different steps (or only some hosts). Then JAX's
  preemption sync manager (started by jax.distributed.initialize) catches
  SIGTERM, spreads the notice through the coordination service, and
  `reached_preemption_sync_point(step)` turns True on every process at the
  same step: one past the largest step any process last reported. Steps are
  the global step numbers, which orbax reports to the same manager when it
  saves. No Python handler is installed then (it would replace JAX's).
  """

  def __init__(self, start_step: int):
    self.requested = False
    self._previous = None
    self._synced = jax.process_count() > 1 and \
        jax.distributed.is_initialized()
    if self._synced:
      # Reports where this run starts, so that a notice arriving before the
      # first step (during compilation) stops the run after that step. A
      # notice before this call is missed (sync point 1, behind a resumed
      # run); nothing is lost then: no step has run since the checkpoint.
      try:
        self.requested = multihost_utils.reached_preemption_sync_point(
            start_step)
      except RuntimeError as e:   # jax_enable_preemption_service=False
        logging.warning("No preemption sync (%s): each process handles "
                        "SIGTERM alone, and they may stop at different "
                        "steps.", e)
        self._synced = False

  def __enter__(self):
    if not self._synced and \
        threading.current_thread() is threading.main_thread():
      self._previous = signal.signal(signal.SIGTERM, self._handle)
    return self

  def stop_at(self, step_number: int) -> bool:
    """Whether to save and stop after `step_number` (every process calls
    this once per step)."""
    if self._synced and multihost_utils.reached_preemption_sync_point(
        step_number):
      logging.warning("Preemption notice: all processes save step %d and "
                      "exit.", step_number)
      self.requested = True
    return self.requested

  def _handle(self, signum, frame):
    del signum, frame
    logging.warning("SIGTERM received: saving a checkpoint and exiting.")
    self.requested = True

  def __exit__(self, *exc):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)


def _should_block(config) -> bool:
  if config.block_every_step is not None:
    return bool(config.block_every_step)
  # XLA:CPU multi-device steps with collectives deadlock when several are
  # dispatched without blocking; elsewhere we keep one step in flight.
  return jax.default_backend() == "cpu"


def _check_finite(metrics: dict, step_number: int, mngr) -> None:
  loss = metrics["train/loss"]
  if math.isfinite(loss):
    return
  mngr.wait_until_finished()
  last = mngr.latest_step()
  where = (f"The last good checkpoint (step {last}) in {mngr.directory} is "
           "intact; rerunning resumes from it." if last is not None else
           "No checkpoint had been written yet.")
  raise NonFiniteLossError(
      f"Loss is {loss} at step {step_number}: training stopped. {where} "
      "Try a lower optimizer.base_learning_rate, a longer warmup_epochs, or "
      "check the input data.")


# Written as this step's value, not a mean over the log interval (with the
# method's own schedules, method.schedule_metrics).
_SCHEDULE_METRICS = ("train/learning_rate", "train/ema_decay")


def train_and_evaluate(config, workdir: str, devices=None) -> step.TrainState:
  """Trains `config.method` in `workdir`, resuming from its checkpoints.

  Args:
    config: a config from configs/<method>.py.
    workdir: checkpoints, TensorBoard events and metrics.jsonl go here.
    devices: devices for the mesh (default: all).
  Returns:
    The final TrainState (replicated on the mesh, or FSDP-sharded).
  """
  config_check.validate(config)
  mesh = sharding.make_mesh(devices)
  sharding.check_batch_size(config.batch_size, mesh)
  source = sources.make_source(config)
  # Model, optimizer, state layout and jitted step: the same set-up that
  # `python -m odin_jax.aot` compiles for a TPU slice (step.build).
  built = step.build(config, mesh, source.num_examples)
  method, model = built.method, built.model
  total_steps, warmup_steps = built.total_steps, built.warmup_steps
  replicated = sharding.replicated(mesh)
  mngr = checkpoint.manager(workdir, config.max_to_keep)
  if mngr.latest_step() is None:   # a fresh run: a bad init_from fails now
    weights_in.check(built.abstract_state, config)
  state = built.init_state(jax.random.PRNGKey(config.seed))
  state = checkpoint.restore(mngr, state, config, config.get("restore_step"))
  state = weights_in.apply(state, config)   # init_from: fresh runs only
  start = int(jax.device_get(state.step))
  preemption = _Preemption(start)   # before the long compile of the step

  train_step = built.train_step
  # The method's TensorBoard masks pictures (data masks and the ids the
  # loss samples, or the masks it discovers), or None.
  pictures = method.make_pictures(model, replicated)
  schedule_metrics = _SCHEDULE_METRICS + method.schedule_metrics
  batch_keys = method.batch_keys()

  writer = reporting.create_writer(workdir)
  if start == 0:
    writer.write_hparams(reporting.flat_config(config))
  num_params = sum(x.size for x in jax.tree.leaves(state.params))
  logging.info(
      "%s: %d devices, global batch %d, %d steps (%d warm-up), %d examples, "
      "%.1fM parameters, starting at step %d.", config.method,
      mesh.devices.size, config.batch_size, total_steps, warmup_steps,
      source.num_examples, num_params / 1e6, start)
  if start >= total_steps:
    logging.info("Already trained to step %d; nothing to do.", start)
    if config.eval.get("final_report", False):   # show it again
      report.final_report(config, workdir, state, reuse_saved=True)
    return state

  # A method that rebuilds its input (Odin's cached masks: the records of
  # the current copy period, refreshed with τ when missing, replace the
  # source; a new period rebuilds the input).
  cached = method.input_refresh(workdir, model, mesh, source)

  def input_batches(first_step: int, state):
    data = source if cached is None else cached.source(state, writer)
    return failure.failing_input(pipeline.make_train_dataset(
        config, data, global_batch_size=config.batch_size,
        start_step=first_step, process_index=jax.process_index(),
        process_count=jax.process_count()).as_numpy_iterator(), first_step)

  batches = input_batches(start, state)
  block = _should_block(config)
  progress = reporting.Progress(total_steps, config.batch_size, start)
  pending = None   # (step number, metrics on device) not yet checked
  interval = reporting.IntervalMean()
  skipped = skips.SkippedExamples(source, config)   # bad examples
  collapse = health.CollapseDetector(   # warns once on health/* (health.py)
      config.model.projector_dim, config.health.std_fraction,
      config.health.min_rankme, config.health.patience)
  # Wall seconds in periodic evaluation and checkpoint saves since the last
  # log: where the time went when steps/s alone looks slow.
  spent = {"train/eval_seconds": 0.0, "train/checkpoint_seconds": 0.0}

  def periodic_eval(state, number: int):
    """config.eval's periodic set on `state`, every eval.every_steps steps."""
    every = config.eval.every_steps
    if every and number % every == 0:
      started = time.perf_counter()
      failure.inject("eval", number)
      runner.evaluate(config, workdir, params=state.params,
                      batch_stats=state.batch_stats, step=number,
                      which="periodic", writer=writer)
      spent["train/eval_seconds"] += time.perf_counter() - started

  def finish(pending):
    """Fetches, checks and (periodically) writes one step's metrics."""
    number, device_metrics = pending
    metrics = {k: float(v) for k, v in jax.device_get(device_metrics).items()}
    _check_finite(metrics, number, mngr)
    progress.step_done(number)   # the first one ends the compiling step
    interval.add(metrics)
    if number % config.log_every_steps == 0 or number == total_steps:
      # Written values are means over the steps since the last write, except
      # the schedules (learning rate, EMA decay), which are this step's.
      scalars = interval.result()
      for k in schedule_metrics:
        if k in metrics:
          scalars[k] = metrics[k]
      scalars["train/loss_last_step"] = metrics["train/loss"]
      scalars.update(progress.rates(number))
      # Summed over hosts; raises BadDataError past dataset.max_bad_fraction.
      scalars.update(skipped.result())
      scalars.update(spent)
      spent.update(dict.fromkeys(spent, 0.0))
      writer.write_scalars(number, scalars)
      if jax.process_index() == 0:
        logging.info(progress.line(number, scalars) +
                     health.console_summary(scalars))
        collapse.update(number, scalars)

  # On a failure, flush the metrics and let an in-flight save land, each
  # for a bounded time (failure.py: the process then exits at once).
  closers = (("metric writer", writer.close), ("checkpoint manager",
                                                mngr.close))
  with failure.close_on_failure(*closers), preemption, \
      profiling.StepProfiler(config, workdir) as profiler:
    for number in range(start + 1, total_steps + 1):
      profiler.before_step(number, state)   # config.profile's trace window
      batch = next(batches)
      skipped.add(batch)   # counts and names the examples it skipped
      device_batch = sharding.to_global(
          mesh, {k: v for k, v in batch.items() if k in batch_keys})
      # Before the step, which donates the state: the parameters after
      # `number - 1` steps (step 0 = random init).
      periodic_eval(state, number - 1)
      if pictures is not None and (number == start + 1 or
                                   number % pictures.every == 0):
        pictures.write(writer, number, pictures.preview(state, device_batch))
      state, metrics = train_step(state, device_batch)
      failure.inject("step", number)
      if pending is not None:
        finish(pending)
      pending = (number, metrics)
      # Read the flag once: SIGTERM may land anywhere in this iteration.
      stop = preemption.stop_at(number)
      save_now = (number % config.checkpoint_every_steps == 0
                  or number == total_steps or stop)
      if block or save_now:
        finish(pending)   # never checkpoint a step whose loss is unchecked
        pending = None
      if save_now:
        started = time.perf_counter()   # the blocking part of an async save
        checkpoint.save(mngr, state, config)
        spent["train/checkpoint_seconds"] += time.perf_counter() - started
        failure.inject("checkpoint", number)   # the save still in flight
      if cached is not None and cached.refresh_due(number) and not stop and \
          number < total_steps:
        mngr.wait_until_finished()   # a refresh takes a while: save first
        batches = input_batches(number, state)
      if stop:
        mngr.wait_until_finished()
        logging.warning("Saved step %d in %s after SIGTERM; exiting.",
                        mngr.latest_step(), mngr.directory)
        break
    if pending is not None:
      finish(pending)
  with failure.close_on_failure(*closers):
    final = int(jax.device_get(state.step))
    if final == total_steps:
      periodic_eval(state, final)
      if config.eval.get("final_report", False):   # θ vs random init vs FH
        report.final_report(config, workdir, state)
    mngr.wait_until_finished()
  writer.flush()
  return state
