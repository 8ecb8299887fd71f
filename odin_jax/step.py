"""The train state and the one train step shared by every method.

Every method (odin_jax/methods/: DetCon-B/S, BYOL, SimCLR, Odin, R2O,
hierarchical grouping) trains through `make_train_step`; the method,
`methods.get(config)`, supplies the hooks (methods/base.py): masks it finds
on device, its forward_loss, its own state (TrainState.method_state) and
how that state follows θ. The step is written on the global batch;
`jax.jit` over a mesh with the batch on axis 'data' inserts the
collectives (global negatives, global BatchNorm statistics, gradient
all-reduce).

One step:
  1. the colour recipe on the uint8 views (data/color.py's `prepare`), per
     example, keyed by the step's 'color' key and the example's 'index';
  2. the method's masks replace the data's when it finds its own
     (`make_find_masks`: Odin's τ + k-means, R2O's region k-means);
  3. forward_loss and its gradient, over grad_accum_steps micro-batches;
  4. the optimizer update of θ, ξ ← EMA of θ (with a target network), and
     the method's state update (Odin: τ ← τ + λ_τ (θ - τ)).

Batch (global, sharded over 'data'), as the input pipeline ships it; the
method's `batch_keys()` names the entries it reads:
  view1, view2 uint8   [B, S, S, 3] after the geometry
  mask1, mask2 uint8/uint16/int32 [B, S, S] segment ids (same id = same
               source segment), int32 once prepared
  index        int     [B] global stream positions (colour keys only)
  and the method's extras: the spanning view (span, box1/2, flip1/2,
  span_mask: methods/base.py SPAN_KEYS) or region-tree distances
  (hierarchy).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp
import optax

from odin_jax import health, methods, objects, rng, sharding
from odin_jax.data import color
from odin_jax.models import network

Batch = dict[str, jax.Array]



@flax.struct.dataclass
class TrainState:
  """Everything that changes during training; one pytree, one checkpoint."""
  step: jax.Array            # int32 []
  params: Any                # online θ: backbone, projector, predictor
  target_params: Any         # ξ = EMA of θ ({} without a target network)
  batch_stats: Any           # online BatchNorm statistics
  opt_state: Any             # LARS momentum
  rng: jax.Array             # base PRNG key; step k uses fold_in(rng, k)
  method_state: Any = flax.struct.field(default_factory=dict)
  # the method's own state (methods/base.py init_state): Odin's
  # {'tau': τ}, {} for most methods


def schedule_lengths(config, num_examples: int) -> tuple[int, int]:
  """(total_steps, warmup_steps) from epochs, or from total_steps if > 0.

  The warm-up is warmup_epochs, or warmup_fraction of the total steps when
  that is > 0: derived here, when the run starts, so a command-line
  --config.num_epochs (or total_steps) moves it too (R2O: 1 %, 3 of 300
  epochs). It is capped at half the run.
  """
  steps_per_epoch = max(1, num_examples // config.batch_size)
  total = config.total_steps or config.num_epochs * steps_per_epoch
  fraction = config.get("warmup_fraction", 0.0)
  warmup = (fraction * total if fraction > 0
            else config.warmup_epochs * steps_per_epoch)
  warmup = min(int(round(warmup)), total // 2)
  return int(total), int(warmup)


def learning_rate_schedule(config, total_steps: int, warmup_steps: int):
  """Linear warm-up to base_lr × batch/256, then cosine decay to 0.

  optimizer.schedule='piecewise' instead keeps the peak and multiplies it
  by optimizer.decay_factor at each fraction optimizer.decay_at of the
  training steps (hierarchical grouping: ×0.1 at epochs 25, 45, 60 of 80).
  """
  peak = config.optimizer.base_learning_rate * config.batch_size / 256
  o = config.optimizer
  if o.get("schedule", "cosine") == "piecewise":
    scales = {}
    for fraction in o.decay_at:   # fractions that round to one step compound
      at = int(round(fraction * total_steps))
      scales[at] = scales.get(at, 1.0) * o.decay_factor
    steps = optax.piecewise_constant_schedule(peak, scales)
    if not warmup_steps:
      return steps
    return lambda step: jnp.where(step < warmup_steps,
                                  peak * step / warmup_steps, steps(step))
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=peak, warmup_steps=warmup_steps,
      decay_steps=max(total_steps, warmup_steps + 1), end_value=0.0)


def ema_decay_schedule(config, total_steps: int) -> Callable:
  """BYOL's τ_k = 1 - (1 - τ_base)(cos(πk/K) + 1)/2, from τ_base up to 1."""
  base = config.ema.base_decay

  def decay(step):
    progress = jnp.minimum(step / max(total_steps, 1), 1.0)
    return 1.0 - (1.0 - base) * (jnp.cos(jnp.pi * progress) + 1.0) / 2.0

  return decay


# Transformer parameters with ndim > 1 that are no weights (timm's
# no_weight_decay): position embeddings, class token, relative position bias.
_NO_DECAY_NAMES = ("pos_embed", "cls_token", "relative_position_bias_table")


def _exclude_bias_and_norm(params):
  """True for weights that get weight decay and trust ratio (ndim > 1, and
  not one of _NO_DECAY_NAMES)."""
  def decays(path, p):
    names = {getattr(k, "key", None) for k in path}
    return p.ndim > 1 and not names & set(_NO_DECAY_NAMES)
  return jax.tree_util.tree_map_with_path(decays, params)


def make_optimizer(config, lr_schedule) -> optax.GradientTransformation:
  """optimizer.name: 'lars' (default), 'adamw' (ViT, Odin App. A.3) or
  'adam' (hierarchical grouping; weight_decay as PyTorch Adam's L2 term).

  Biases, norm parameters and the _NO_DECAY_NAMES skip weight decay (and
  LARS's trust ratio). optimizer.clip_norm > 0 clips the gradients to that
  global norm first (Swin, Odin App. A.3).
  """
  o = config.optimizer
  name = o.get("name", "lars")
  if name == "lars":
    tx = optax.lars(
        learning_rate=lr_schedule, weight_decay=o.weight_decay,
        weight_decay_mask=_exclude_bias_and_norm,
        trust_coefficient=o.trust_coefficient,
        trust_ratio_mask=_exclude_bias_and_norm, momentum=o.momentum)
  elif name == "adamw":
    tx = optax.adamw(learning_rate=lr_schedule, b1=o.adam_b1, b2=o.adam_b2,
                     weight_decay=o.weight_decay, mask=_exclude_bias_and_norm)
  elif name == "adam":   # hierarchical grouping; decay as an L2 term
    tx = optax.adam(learning_rate=lr_schedule, b1=o.adam_b1, b2=o.adam_b2)
    if o.weight_decay:
      tx = optax.chain(optax.add_decayed_weights(o.weight_decay,
                                                 _exclude_bias_and_norm), tx)
  else:
    raise ValueError(f"optimizer.name={name!r}; choose 'lars', 'adamw' or "
                     "'adam'.")
  if o.get("clip_norm", 0.0) > 0:
    tx = optax.chain(optax.clip_by_global_norm(o.clip_norm), tx)
  return tx


def create_train_state(config, model, tx, key: jax.Array,
                       method=None) -> TrainState:
  """Initialises θ, ξ = θ (with a target network) and the method's state
  (method.init_state(θ); methods.get(config) when not given)."""
  method = method or methods.get(config)
  size, grid = config.image_size, network.feature_grid(config)
  images = jnp.zeros((2, size, size, 3), jnp.float32)
  cells = jnp.zeros((2, *grid), jnp.int32)
  ids = jnp.zeros((2, max(config.num_masks, 1)), jnp.int32)
  init_key, state_key = jax.random.split(key)
  variables = model.init(init_key, images, cells, ids, train=False)
  params = variables["params"]
  return TrainState(
      step=jnp.zeros((), jnp.int32), params=params,
      target_params=(jax.tree.map(jnp.copy, params) if config.ema.enabled
                     else {}),
      batch_stats=variables["batch_stats"], opt_state=tx.init(params),
      rng=state_key, method_state=method.init_state(params))


@dataclasses.dataclass(frozen=True)
class Built:
  """The method, model, optimizer, schedules and jitted step of one config
  on a mesh.

  `build` makes it; train.py trains with it and aot.py compiles the same
  `train_step` for a TPU slice, so both see one set-up.
    method:         methods.get(config), bound to the run's length
    abstract_state: TrainState of jax.ShapeDtypeStructs (shapes only)
    state_sharding: TrainState of NamedShardings (sharding.state_shardings)
    init_state:     key -> TrainState, jitted onto state_sharding
    train_step:     (state, batch) -> (state, metrics), jitted with the state
                    donated, the batch sharded over 'data' and the metrics
                    replicated
  """
  method: Any
  model: Any
  tx: optax.GradientTransformation
  lr_schedule: Callable
  ema_schedule: Callable
  total_steps: int
  warmup_steps: int
  abstract_state: TrainState
  state_sharding: Any
  init_state: Callable
  train_step: Callable


def build(config, mesh, num_examples: int) -> Built:
  """Builds config's train state set-up and train step on `mesh`.

  num_examples sets the schedules' lengths (epochs -> steps); no array is
  allocated (the state is only traced, by jax.eval_shape).
  """
  total_steps, warmup_steps = schedule_lengths(config, num_examples)
  method = methods.get(config, total_steps=total_steps,
                       steps_per_epoch=max(1, num_examples //
                                           config.batch_size))
  model = method.network()
  lr_schedule = learning_rate_schedule(config, total_steps, warmup_steps)
  ema_schedule = ema_decay_schedule(config, total_steps)
  tx = make_optimizer(config, lr_schedule)
  make_state = lambda key: create_train_state(config, model, tx, key, method)
  abstract_state = jax.eval_shape(make_state, jax.random.PRNGKey(0))
  # Replicated, or split over 'data' with sharding.fsdp (sharding.py).
  state_sharding = sharding.state_shardings(config, mesh, abstract_state)
  train_step = jax.jit(
      make_train_step(config, model, tx, lr_schedule, ema_schedule, mesh,
                      method),
      in_shardings=(state_sharding, sharding.batch_sharded(mesh)),
      out_shardings=(state_sharding, sharding.replicated(mesh)),
      donate_argnums=(0,))
  return Built(
      method=method, model=model, tx=tx, lr_schedule=lr_schedule,
      ema_schedule=ema_schedule, total_steps=total_steps,
      warmup_steps=warmup_steps, abstract_state=abstract_state,
      state_sharding=state_sharding,
      init_state=jax.jit(make_state, out_shardings=state_sharding),
      train_step=train_step)


def _micro_batches(batch: Batch, k: int) -> Batch:
  """[B, ...] -> [k, B/k, ...], strided so each micro-batch spans devices."""
  return jax.tree.map(lambda x: sharding.strided_split(x, k), batch)


def make_train_step(config, model, tx, lr_schedule, ema_schedule,
                    mesh=None, method=None
                    ) -> Callable[[TrainState, Batch], tuple[TrainState, dict]]:
  """Returns the (un-jitted) train step `(state, batch) -> (state, metrics)`.

  method: methods.get(config, total_steps=..., steps_per_epoch=...), bound
  to the run's length when its schedules need one (Odin's copies, R2O's K);
  build() passes it.
  """
  method = method or methods.get(config)
  find_masks = method.make_find_masks(model)
  grad_fn = jax.value_and_grad(method.make_forward_loss(model, mesh),
                               has_aux=True)
  loss_keys = method.loss_keys()
  use_target = bool(config.ema.enabled)
  health_names = (health.NAMES if config.health.enabled and method.health
                  else ())

  def train_step(state: TrainState, batch: Batch):
    k = config.grad_accum_steps
    keys = rng.step_keys(state, k)
    batch = color.prepare(batch, keys["color"], config)
    extra = {}
    if find_masks is not None:
      found = find_masks(state, batch, keys["masks"])
      batch = dict(batch, mask1=found["mask1"], mask2=found["mask2"])
      extra["train/discovered_segments"] = objects.mean_num_ids(
          found["span_segments"])
    batch = {name: batch[name] for name in loss_keys}
    if k == 1:
      (loss, (stats, segs, checks)), grads = grad_fn(
          state.params, state.batch_stats, state.target_params, batch,
          keys["loss"][0])
    else:
      # Health statistics are means over the micro-batches (RankMe of a
      # micro-batch's B/k x M rows, not of the whole batch).
      def accumulate(carry, inputs):
        stats, grad_sum, loss_sum, seg_sum, check_sum = carry
        micro, micro_key = inputs
        (l, (stats, s, c)), g = grad_fn(state.params, stats,
                                        state.target_params, micro, micro_key)
        grad_sum = jax.tree.map(jnp.add, grad_sum, g)
        check_sum = jax.tree.map(jnp.add, check_sum, c)
        return (stats, grad_sum, loss_sum + l, seg_sum + s, check_sum), None
      zeros = jax.tree.map(jnp.zeros_like, state.params)
      no_checks = {name: jnp.zeros((), jnp.float32) for name in health_names}
      (stats, grads, loss, segs, checks), _ = jax.lax.scan(
          accumulate, (state.batch_stats, zeros, 0.0, 0.0, no_checks),
          (_micro_batches(batch, k), keys["loss"]))
      grads = jax.tree.map(lambda g: g / k, grads)
      loss, segs = loss / k, segs / k
      checks = jax.tree.map(lambda c: c / k, checks)

    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    decay = ema_schedule(state.step)
    target_params = state.target_params
    if use_target:   # ξ ← τ ξ + (1 - τ) θ, with the freshly updated θ
      target_params = jax.tree.map(lambda t, o: decay * t + (1.0 - decay) * o,
                                   target_params, params)
    method_state, method_metrics = method.update_state(
        state.method_state, params, state.step)
    metrics = {
        **extra,
        **method_metrics,
        **checks,
        "train/loss": loss,
        "train/grad_norm": optax.tree.norm(grads),
        "train/learning_rate": lr_schedule(state.step),
        "train/segments_per_view": segs,
    }
    if use_target:
      metrics["train/ema_decay"] = decay
    new_state = state.replace(step=state.step + 1, params=params,
                              target_params=target_params, batch_stats=stats,
                              opt_state=opt_state, method_state=method_state)
    return new_state, metrics

  return train_step
