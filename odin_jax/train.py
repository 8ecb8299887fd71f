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

import jax
import numpy as np
from absl import logging
from jax.experimental import multihost_utils

from odin_jax import (checkpoint, config_check, profiling, reporting,
                      sharding, step)
from odin_jax.data import pipeline, sources
from odin_jax.discovery import cache as mask_cache
from odin_jax.evaluate import pictures, runner
from odin_jax.models import heads


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


_SCHEDULE_METRICS = ("train/learning_rate", "train/ema_decay",
                     "train/discovery_rate", "train/num_clusters")
# Batch entries the train step reads (Odin's only when present).
_STEP_KEYS = ("view1", "view2", "mask1", "mask2", "span", "box1", "box2",
              "flip1", "flip2", "span_mask", "hierarchy")
_NUM_PICTURES = 4


def _discovery_preview(discover, replicated):
  """jit(state, batch) -> the masks the step uses, for the first images.

  Outputs are the first _NUM_PICTURES images' span_segments, mask1, mask2,
  replicated so that every host can read them (process 0's local batch
  starts with the same images).
  """
  def preview(state, batch):
    found = discover(state, batch, step.discovery_key(state))
    return {k: v[:_NUM_PICTURES] for k, v in found.items()}
  return jax.jit(preview, out_shardings=replicated)


def _write_discovery_pictures(writer, number: int, found, batch) -> None:
  """TensorBoard 'discovery/masks': span | segments | masks in both views."""
  found = {k: np.asarray(jax.device_get(v)) for k, v in found.items()}
  panels = [pictures.training_masks_panel(
      batch["span"][i], found["span_segments"][i], batch["view1"][i],
      found["mask1"][i], batch["view2"][i], found["mask2"][i])
            for i in range(len(found["mask1"]))]
  writer.write_images(number, {"discovery/masks": np.stack(panels)})


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
  total_steps, warmup_steps = step.schedule_lengths(config,
                                                    source.num_examples)
  model = heads.from_config(config)
  lr_schedule = step.learning_rate_schedule(config, total_steps, warmup_steps)
  ema_schedule = step.ema_decay_schedule(config, total_steps)
  tx = step.make_optimizer(config, lr_schedule)

  replicated = sharding.replicated(mesh)
  make_state = lambda rng: step.create_train_state(config, model, tx, rng)
  rng = jax.random.PRNGKey(config.seed)
  # Replicated, or split over 'data' with sharding.fsdp (sharding.py).
  state_sharding = sharding.state_shardings(
      config, mesh, jax.eval_shape(make_state, rng))
  state = jax.jit(make_state, out_shardings=state_sharding)(rng)
  mngr = checkpoint.manager(workdir, config.max_to_keep)
  state = checkpoint.restore_latest(mngr, state, config)
  start = int(jax.device_get(state.step))
  preemption = _Preemption(start)   # before the long compile of the step

  schedules = {  # Odin's λ_τ and R2O's K, when the method has them
      "discovery_rate": step.discovery_rate_schedule(
          config, max(1, source.num_examples // config.batch_size)),
      "region_clusters": step.region_clusters_schedule(config, total_steps)}
  train_step = jax.jit(
      step.make_train_step(config, model, tx, lr_schedule, ema_schedule, mesh,
                           **schedules),
      in_shardings=(state_sharding, sharding.batch_sharded(mesh)),
      out_shardings=(state_sharding, replicated), donate_argnums=(0,))
  discover = step.make_mask_discovery(config, model, **schedules)
  preview = (_discovery_preview(discover, replicated)
             if discover is not None else None)
  image_every = config.odin.image_every_steps

  writer = reporting.create_writer(workdir)
  if start == 0:
    writer.write_hparams(_flat_hparams(config))
  num_params = sum(x.size for x in jax.tree.leaves(state.params))
  logging.info(
      "%s: %d devices, global batch %d, %d steps (%d warm-up), %d examples, "
      "%.1fM parameters, starting at step %d.", config.method,
      mesh.devices.size, config.batch_size, total_steps, warmup_steps,
      source.num_examples, num_params / 1e6, start)
  if start >= total_steps:
    logging.info("Already trained to step %d; nothing to do.", start)
    return state

  # Cached Odin masks: the records of the current copy period (refreshed
  # with τ when missing) replace the source; a new period rebuilds the input.
  cached = (mask_cache.MaskCache(config, workdir, model, mesh, source)
            if mask_cache.enabled(config) else None)

  def input_batches(first_step: int, state):
    data = source if cached is None else cached.source(state, writer)
    return pipeline.make_train_dataset(
        config, data, global_batch_size=config.batch_size,
        start_step=first_step, process_index=jax.process_index(),
        process_count=jax.process_count()).as_numpy_iterator()

  batches = input_batches(start, state)
  block = _should_block(config)
  progress = reporting.Progress(total_steps, config.batch_size, start)
  pending = None   # (step number, metrics on device) not yet checked
  interval = reporting.IntervalMean()

  def periodic_eval(state, number: int):
    """config.eval's periodic set on `state`, every eval.every_steps steps."""
    every = config.eval.every_steps
    if every and number % every == 0:
      runner.evaluate(config, workdir, params=state.params,
                      batch_stats=state.batch_stats, step=number,
                      which="periodic", writer=writer)

  def finish(pending):
    """Fetches, checks and (periodically) writes one step's metrics."""
    number, device_metrics = pending
    metrics = {k: float(v) for k, v in jax.device_get(device_metrics).items()}
    _check_finite(metrics, number, mngr)
    interval.add(metrics)
    if number % config.log_every_steps == 0 or number == total_steps:
      # Written values are means over the steps since the last write, except
      # the schedules (learning rate, EMA decay), which are this step's.
      scalars = interval.result()
      for k in _SCHEDULE_METRICS:
        if k in metrics:
          scalars[k] = metrics[k]
      scalars["train/loss_last_step"] = metrics["train/loss"]
      scalars.update(progress.rates(number))
      writer.write_scalars(number, scalars)
      if jax.process_index() == 0:
        logging.info(progress.line(number, scalars))

  with preemption, \
      profiling.StepProfiler(config, workdir) as profiler:
    for number in range(start + 1, total_steps + 1):
      profiler.before_step(number, state)   # config.profile's trace window
      batch = next(batches)
      device_batch = sharding.to_global(
          mesh, {k: v for k, v in batch.items() if k in _STEP_KEYS})
      # Before the step, which donates the state: the parameters after
      # `number - 1` steps (step 0 = random init).
      periodic_eval(state, number - 1)
      if preview is not None and (number == start + 1 or
                                  number % image_every == 0):
        _write_discovery_pictures(writer, number, preview(state, device_batch),
                                  batch)
      state, metrics = train_step(state, device_batch)
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
        checkpoint.save(mngr, state, config)
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
  final = int(jax.device_get(state.step))
  if final == total_steps:
    periodic_eval(state, final)
  mngr.wait_until_finished()
  writer.flush()
  return state


def _flat_hparams(config) -> dict:
  flat = {}

  def visit(prefix, value):
    if hasattr(value, "items"):
      for k, v in value.items():
        visit(f"{prefix}{k}.", v)
    else:
      flat[prefix[:-1]] = value if isinstance(
          value, (bool, int, float, str)) else str(value)

  visit("", config)
  return flat

