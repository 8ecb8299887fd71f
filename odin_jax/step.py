"""The train state and the one train step shared by every method.

DetCon-B, DetCon-S, BYOL and SimCLR differ only in config: whether there is a
predictor (`model.predictor_hidden`), an EMA target network (`ema.enabled`),
how many mask ids are sampled (`num_masks`, 1 for the global-mask baselines)
and which loss is applied (`loss.name`). The step is written on the global
batch; `jax.jit` over a mesh with the batch on axis 'data' inserts the
collectives (global negatives, global BatchNorm statistics, gradient
all-reduce).

Odin (`odin.enabled`) adds a discovery network τ (same module, its own
parameters): it segments the un-augmented spanning view with k-means on its
per-pixel projections, and the segments, mapped into each view, replace the
data's masks before the usual loss. τ follows θ by `discovery_rate`.

Batch (global, sharded over 'data'), as the input pipeline ships it:
  view1, view2 uint8   [B, S, S, 3] after the geometry; the step's first act
               is data/color.py's `prepare`: the colour recipe, per example,
               keyed by the step's 'color' key and the example's 'index'
  mask1, mask2 uint8/uint16/int32 [B, S, S] segment ids (same id = same
               source segment), int32 once prepared
  index        int     [B] global stream positions (colour keys only)
  Odin only:
  span         uint8   [B, 2S, 2S, 3] the spanning view (no colour, no flip)
  box1, box2   float32 [B, 4] each view's (y0, x0, y1, x1) in the span, [0, 1]
  flip1, flip2 bool    [B]
  Hierarchical grouping (loss.name 'hiergroup', masks.method 'hierarchy'):
  hierarchy    float32 [B, L, L] region-tree distances between the leaf ids
               of mask1/mask2; the network embeds pixels and hiergroup.py
               samples pixel pairs and computes the loss instead.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

from odin_jax import health, hiergroup, losses, numerics, objects, sharding
from odin_jax.data import color
from odin_jax import kmeans as kmeans_lib
from odin_jax import span_mapping as mapping
from odin_jax.models import fpn as fpn_lib
from odin_jax.models import network
from odin_jax.models import resnet
from odin_jax.models import swin
from odin_jax.models import vit

Batch = dict[str, jax.Array]

# The pipeline's batch entries the step reads (the discovery methods' only
# when present); train.py and the AOT tool pass exactly these.
BATCH_KEYS = ("view1", "view2", "mask1", "mask2", "index", "span", "box1",
              "box2", "flip1", "flip2", "span_mask", "hierarchy")
# Salt of the colour key: folded into the step's key, not split from it, so
# the discovery and loss streams keep their values.
_COLOR_SALT = 0x434F4C52   # 'COLR'


@flax.struct.dataclass
class TrainState:
  """Everything that changes during training; one pytree, one checkpoint."""
  step: jax.Array            # int32 []
  params: Any                # online θ: backbone, projector, predictor
  target_params: Any         # ξ = EMA of θ ({} without a target network)
  batch_stats: Any           # online BatchNorm statistics
  opt_state: Any             # LARS momentum
  rng: jax.Array             # base PRNG key; step k uses fold_in(rng, k)
  discovery_params: Any = flax.struct.field(default_factory=dict)
  # Odin's τ (follows θ by discovery_rate; {} without Odin)


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


def discovery_rate_schedule(config, steps_per_epoch: int) -> Callable:
  """λ_τ(step) for τ ← τ + λ_τ (θ - τ) after the update of step `step`.

  'ema': the constant rate odin.ema_rate (Odin's continuous schedule, 1e-3).
  'copy': 1 after every odin.copy_every_epochs epochs, else 0 (τ ← θ).
  """
  o = config.odin
  if o.tau_update == "ema":
    return lambda step: jnp.asarray(o.ema_rate, jnp.float32)
  period = max(1, int(round(o.copy_every_epochs * steps_per_epoch)))
  return lambda step: jnp.where((step + 1) % period == 0, 1.0, 0.0)


def region_clusters_schedule(config, total_steps: int) -> Callable:
  """R2O's region-to-object curriculum K(step), an int32 scalar.

  K(e) = k_end + (k_start - k_end) cos(π/2 · e/E): 128 regions-worth of
  clusters at the start, 4 objects-worth at the end (R2O eq. A1).
  """
  r = config.r2o

  def num_clusters(step):
    progress = jnp.minimum(step / max(total_steps, 1), 1.0)
    k = r.k_end + (r.k_start - r.k_end) * jnp.cos(0.5 * jnp.pi * progress)
    return jnp.round(k).astype(jnp.int32)

  return num_clusters


_unit = numerics.l2_normalize   # x / max(||x||, 1e-12) on the last axis


def make_discover(config, model) -> Callable:
  """Odin's object discovery: spanning views -> K segments per image.

  Returns discover(params, batch_stats, span, key) -> int32 [B, h, w]: the
  k-means cluster of every cell of the network's finest feature grid
  (stride 4 with the FPN). The per-pixel projections g_τ(f_τ(span)) are
  L2-normalised before k-means++ / Lloyd with odin.num_clusters clusters,
  each image on its own (no cross-device traffic). BatchNorm uses the span
  batch's statistics, as the target network does.
  """
  o = config.odin

  def discover(params, batch_stats, span, key):
    z, _ = model.apply({"params": params, "batch_stats": batch_stats}, span,
                       train=True, method=model.dense_projection,
                       mutable=["batch_stats"])
    b, h, w, d = z.shape
    assign, _ = kmeans_lib.kmeans(_unit(z.reshape(b, h * w, d)),
                                  o.num_clusters, key,
                                  num_iters=o.kmeans_iters)
    return jax.lax.stop_gradient(assign.reshape(b, h, w))

  return discover


def make_region_discover(config, model, num_clusters: Callable) -> Callable:
  """R2O's mask prediction: superpixels -> clusters of region features.

  Returns discover(params, batch_stats, span, span_mask, step, key) ->
  int32 [B, h, w] on the region_stage grid (C4: 14x14 at 224):
    1. C4 features of `span` [B, P, P, 3] (target network, no gradient):
       by default the whole un-augmented image at P = 224, R2O's raw view
       (r2o.cluster_view, data/spanning.py), with its superpixels span_mask
       int [B, P, P];
    2. each superpixel (majority id per cell) pooled into one region vector,
       L2-normalised;
    3. k-means over the regions of each group of r2o.group_size images
       jointly (R2O clusters each device's mini-batch), K = num_clusters(step)
       of at most r2o.k_start clusters;
    4. every cell takes its nearest centre (R2O §3.1), so the mask is
       painted on the feature grid.
  """
  r = config.r2o

  def discover(params, batch_stats, span, span_mask, step, key):
    maps, _ = model.apply({"params": params, "batch_stats": batch_stats},
                          span, train=True, method=model.feature_maps,
                          mutable=["batch_stats"])
    feats = maps[r.region_stage].astype(jnp.float32)          # [B,h,w,C]
    b, h, w, c = feats.shape
    cells = objects.downsample_segments(span_mask, (h, w))
    unique, count = objects.unique_ids(cells)                   # [B, hw]
    valid = jnp.arange(h * w)[None] < count[:, None]
    regions = _unit(objects.pool_features(
        feats, cells, jnp.where(valid, unique, -1)))            # [B, hw, C]
    groups = b // r.group_size
    points = regions.reshape(groups, r.group_size * h * w, c)
    _, centres = kmeans_lib.kmeans(
        points, r.k_start, key, num_iters=r.kmeans_iters,
        valid=valid.reshape(groups, -1), num_active=num_clusters(step))
    pixels = _unit(feats).reshape(groups, r.group_size * h * w, c)
    nearest = kmeans_lib.nearest_centre(pixels, centres,
                                        num_active=num_clusters(step))
    return jax.lax.stop_gradient(nearest.reshape(b, h, w))

  return discover


# The consumers of one step's randomness. Each gets its own key from a single
# split of the step key, so no two of them draw the same numbers (deriving
# them with fold_in(key, i) once gave micro-batch 1's mask sampling the
# discovery key). Add a consumer here, never a fold_in elsewhere.
KEY_STREAMS = ("discovery", "loss")


def step_key(state: TrainState) -> jax.Array:
  """The base PRNG key of the step `state` is about to take (only split)."""
  return jax.random.fold_in(state.rng, state.step)


def step_keys(state: TrainState, num_micro_batches: int = 1
              ) -> dict[str, jax.Array]:
  """Every key this step consumes, all distinct.

  Returns {'discovery': key} (Odin/R2O k-means, and the training pictures
  that show its masks), {'loss': keys [num_micro_batches]}: micro-batch
  i's key for forward_loss (mask-id sampling, which splits it again per
  view; hierarchical grouping's pixel sampling), and {'color': key}: the
  colour augmentation's, folded per example position (data/color.py).
  """
  base = step_key(state)
  keys = dict(zip(KEY_STREAMS, jax.random.split(base, len(KEY_STREAMS))))
  keys["loss"] = jax.random.split(keys["loss"], num_micro_batches)
  keys["color"] = jax.random.fold_in(base, _COLOR_SALT)
  return keys


def discovery_key(state: TrainState) -> jax.Array:
  """The k-means key of this step's mask discovery (step and pictures)."""
  return step_keys(state)["discovery"]


def make_mask_discovery(config, model, discovery_rate=None,
                        region_clusters=None) -> Callable | None:
  """The masks Odin or R2O trains on, or None when they come from the data.

  Returns found(state, batch, key) -> dict span_segments int32 [B, h, w]
  (on the discovery grid) and mask1, mask2 int32 [B, S, S]: the segments
  cropped, flipped and resized into each view, which then replace the
  data's masks (downsample_segments pools them like precomputed masks).
  """
  size = config.image_size
  if config.odin.enabled and config.odin.get("cached", False):
    return None      # discovered once per period: data (methods/odin_cache.py)
  if config.odin.enabled:
    if discovery_rate is None:
      raise ValueError("odin.enabled needs discovery_rate "
                       "(step.discovery_rate_schedule).")
    discover = make_discover(config, model)
    segment = lambda state, batch, key: discover(
        state.discovery_params, state.batch_stats, batch["span"], key)
  elif config.r2o.enabled:
    if region_clusters is None:
      raise ValueError("r2o.enabled needs region_clusters "
                       "(step.region_clusters_schedule).")
    discover = make_region_discover(config, model, region_clusters)
    segment = lambda state, batch, key: discover(
        state.target_params, state.batch_stats, batch["span"],
        batch["span_mask"], state.step, key)
  else:
    return None

  def found(state, batch, key):
    span_segments = segment(state, batch, key)
    mask1, mask2 = mapping.views_from_span(span_segments, batch, (size, size))
    return {"span_segments": span_segments, "mask1": mask1, "mask2": mask2}

  return found


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


def feature_grid(config, image_size: int | None = None) -> tuple[int, int]:
  """Side of the hidden map h (7x7 for R50 stage4 at 224, 56x56 for 'p2',
  S/p for ViT tokens, e.g. 28x28 for B/8 at 224)."""
  stage = config.model.feature_stage
  size = image_size or config.image_size
  backbone = config.model.get("backbone", "resnet")
  if backbone == "vit":      # 'tokens': one cell per patch
    return (vit.token_grid(size, config.model.vit.patch_size),) * 2
  stage = fpn_lib.LEVEL_STAGE.get(stage, stage)
  if backbone == "swin":
    side = swin.stage_grid(size, stage, config.model.swin.patch_size)
  else:
    side = resnet.stage_grid(size, stage,
                             config.model.get("output_stride", 32))
  return side, side


def create_train_state(config, model, tx, rng: jax.Array) -> TrainState:
  """Initialises θ (and ξ = θ when the config has a target network)."""
  size, grid = config.image_size, feature_grid(config)
  images = jnp.zeros((2, size, size, 3), jnp.float32)
  cells = jnp.zeros((2, *grid), jnp.int32)
  ids = jnp.zeros((2, max(config.num_masks, 1)), jnp.int32)
  init_rng, state_rng = jax.random.split(rng)
  variables = model.init(init_rng, images, cells, ids, train=False)
  params = variables["params"]
  copy = lambda: jax.tree.map(jnp.copy, params)
  return TrainState(
      step=jnp.zeros((), jnp.int32), params=params,
      target_params=copy() if config.ema.enabled else {},
      batch_stats=variables["batch_stats"], opt_state=tx.init(params),
      rng=state_rng,
      discovery_params=copy() if config.odin.enabled else {})


@dataclasses.dataclass(frozen=True)
class Built:
  """The model, optimizer, schedules and jitted step of one config on a mesh.

  `build` makes it; train.py trains with it and aot.py compiles the same
  `train_step` for a TPU slice, so both see one set-up.
    abstract_state: TrainState of jax.ShapeDtypeStructs (shapes only)
    state_sharding: TrainState of NamedShardings (sharding.state_shardings)
    init_state:     rng -> TrainState, jitted onto state_sharding
    train_step:     (state, batch) -> (state, metrics), jitted with the state
                    donated, the batch sharded over 'data' and the metrics
                    replicated
    schedules:      {'discovery_rate', 'region_clusters'}: Odin's λ_τ and
                    R2O's K (make_train_step / make_mask_discovery keywords)
  """
  model: Any
  tx: optax.GradientTransformation
  lr_schedule: Callable
  ema_schedule: Callable
  schedules: dict
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
  model = network.from_config(config)
  lr_schedule = learning_rate_schedule(config, total_steps, warmup_steps)
  ema_schedule = ema_decay_schedule(config, total_steps)
  tx = make_optimizer(config, lr_schedule)
  make_state = lambda rng: create_train_state(config, model, tx, rng)
  abstract_state = jax.eval_shape(make_state, jax.random.PRNGKey(0))
  # Replicated, or split over 'data' with sharding.fsdp (sharding.py).
  state_sharding = sharding.state_shardings(config, mesh, abstract_state)
  schedules = {  # Odin's λ_τ and R2O's K, when the method has them
      "discovery_rate": discovery_rate_schedule(
          config, max(1, num_examples // config.batch_size)),
      "region_clusters": region_clusters_schedule(config, total_steps)}
  train_step = jax.jit(
      make_train_step(config, model, tx, lr_schedule, ema_schedule, mesh,
                      **schedules),
      in_shardings=(state_sharding, sharding.batch_sharded(mesh)),
      out_shardings=(state_sharding, sharding.replicated(mesh)),
      donate_argnums=(0,))
  return Built(
      model=model, tx=tx, lr_schedule=lr_schedule, ema_schedule=ema_schedule,
      schedules=schedules, total_steps=total_steps, warmup_steps=warmup_steps,
      abstract_state=abstract_state, state_sharding=state_sharding,
      init_state=jax.jit(make_state, out_shardings=state_sharding),
      train_step=train_step)


def _micro_batches(batch: Batch, k: int) -> Batch:
  """[B, ...] -> [k, B/k, ...], strided so each micro-batch spans devices."""
  return jax.tree.map(lambda x: sharding.strided_split(x, k), batch)


def make_train_step(config, model, tx, lr_schedule, ema_schedule,
                    mesh=None, discovery_rate=None, region_clusters=None
                    ) -> Callable[[TrainState, Batch], tuple[TrainState, dict]]:
  """Returns the (un-jitted) train step `(state, batch) -> (state, metrics)`.

  discovery_rate: λ_τ schedule (discovery_rate_schedule), Odin only;
  region_clusters: K schedule (region_clusters_schedule), R2O only.
  """
  discover = make_mask_discovery(config, model, discovery_rate,
                                 region_clusters)
  grid = feature_grid(config)
  num_masks = config.num_masks
  use_target = bool(config.ema.enabled)
  pixel_level = config.loss.name == hiergroup.LOSS_NAME   # own forward_loss
  loss_fn = None if pixel_level else functools.partial(
      losses.get_loss(config.loss.name), temperature=config.loss.temperature)
  device_negatives = config.loss.negatives == "device"
  if device_negatives:
    if mesh is None:
      raise ValueError("loss.negatives='device' needs the device mesh.")
    loss_fn = losses.device_negatives_loss(loss_fn, mesh)
  replicated = NamedSharding(mesh, P()) if mesh is not None else None
  mask_sampling = config.loss.mask_sampling
  track_health = config.health.enabled

  def gather(x):
    # Targets are needed whole by every device (they are the negatives);
    # predictions stay sharded, so the logits are sharded by row.
    if replicated is None or device_negatives:
      return x
    return jax.lax.with_sharding_constraint(x, replicated)

  def forward_loss(params, batch_stats, target_params, batch, key):
    cells1 = objects.downsample_segments(batch["mask1"], grid)
    cells2 = objects.downsample_segments(batch["mask2"], grid)
    # The online and the target network pool the same ids of a view.
    ids1, ids2 = objects.view_mask_ids(mask_sampling, key, cells1, cells2,
                                       num_masks)

    def online(stats, view, cells, ids):
      return model.apply({"params": params, "batch_stats": stats}, view,
                         cells, ids, train=True, mutable=["batch_stats"])

    out1, upd = online(batch_stats, batch["view1"], cells1, ids1)
    out2, upd = online(upd["batch_stats"], batch["view2"], cells2, ids2)
    if use_target:
      def target(view, cells, ids):
        out, _ = model.apply({"params": target_params,
                              "batch_stats": batch_stats}, view, cells, ids,
                             train=True, with_predictor=False,
                             mutable=["batch_stats"])
        return jax.lax.stop_gradient(out["projection"])
      t1 = target(batch["view1"], cells1, ids1)
      t2 = target(batch["view2"], cells2, ids2)
    else:   # DetCon-S / SimCLR: the online projections are the targets
      t1, t2 = out1["projection"], out2["projection"]
    loss = loss_fn(out1["prediction"], out2["prediction"], gather(t1),
                   gather(t2), ids1, ids2)
    segments = 0.5 * (_num_unique(cells1) + _num_unique(cells2))
    # Collapse statistics of what the loss compares against (health.py),
    # on the ungathered targets: XLA sums the D x D Gram across devices.
    # Padding ids (< 0, mask_sampling 'all') are left out.
    checks = (health.metrics([t1, t2], [ids1 >= 0, ids2 >= 0])
              if track_health else {})
    return loss, (upd["batch_stats"], segments, checks)

  if pixel_level:   # hierarchical grouping: pixel sampling + its loss
    forward_loss = _without_health(hiergroup.make_forward_loss(config, model))
  grad_fn = jax.value_and_grad(forward_loss, has_aux=True)

  def train_step(state: TrainState, batch: Batch):
    k = config.grad_accum_steps
    keys = step_keys(state, k)
    batch = color.prepare(batch, keys["color"], config)
    extra = {}
    if discover is not None:
      found = discover(state, batch, keys["discovery"])
      batch = dict(batch, mask1=found["mask1"], mask2=found["mask2"])
      extra["train/discovered_segments"] = _num_unique(found["span_segments"])
    batch = {k: batch[k] for k in ("view1", "view2", "mask1", "mask2",
                                   "hierarchy") if k in batch}
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
      no_checks = {name: jnp.zeros((), jnp.float32) for name in (
          health.NAMES if track_health and not pixel_level else ())}
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
    discovery_params = state.discovery_params
    if config.r2o.enabled:
      extra["train/num_clusters"] = region_clusters(state.step)
    if config.odin.enabled:   # τ ← τ + λ_τ (θ - τ), with the updated θ
      rate = discovery_rate(state.step)
      discovery_params = jax.tree.map(lambda t, o: t + rate * (o - t),
                                      discovery_params, params)
      extra["train/discovery_rate"] = rate
    metrics = {
        **extra,
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
                              opt_state=opt_state,
                              discovery_params=discovery_params)
    return new_state, metrics

  return train_step


def _without_health(forward_loss: Callable) -> Callable:
  """A forward_loss whose aux is (stats, segments) -> one with an empty
  health dict appended (hierarchical grouping has no mask projections)."""
  def wrapped(*args):
    loss, (stats, segments) = forward_loss(*args)
    return loss, (stats, segments, {})
  return wrapped


def _num_unique(cells: jax.Array) -> jax.Array:
  """Mean number of distinct ids per image on the feature grid. [B,h,w] -> []"""
  return jnp.mean(objects.unique_ids(cells)[1].astype(jnp.float32))
