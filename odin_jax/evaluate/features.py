"""Frozen network features for evaluation: parameters in, feature maps out.

Parameters come from a checkpoint (`load_params`, through
`odin_jax.checkpoint.read`, the reader training and export share; local
paths and URLs alike) or from the initialisation a training run starts from
(`init_params`). `FeatureSource` scales uint8 images to [0, 1], resizes them
(bilinear, antialiased) to eval.image_size and runs them in fixed-size
batches through `ObjectNetwork.feature_maps` (feature 'stem',
'stage1'..'stage4', 'p2'..'p5' with an FPN, a ViT's 'tokens' / 'keys') or
`dense_projection` ('projection': the projector g on every cell of the
model's own hidden map). eval.feature='auto' (`default_feature`) follows
Odin App. A.4. The feature function is jitted once per (model, feature,
input size), so only the first of the training loop's periodic evaluations
compiles.
"""

from __future__ import annotations

import copy
import json
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from odin_jax import checkpoint, methods
from odin_jax.evaluate import settings as settings_lib

# Which network of a checkpoint: online θ, EMA ξ, Odin's discovery
# network τ (TrainState.method_state['tau']).
PARAM_KEYS = ("params", "target_params", "tau")
# Older names of a PARAM_KEYS entry (checkpoints before methods/: τ was the
# TrainState field 'discovery_params').
_PARAM_ALIASES = {"discovery_params": "tau"}


def params_of(state: dict, params_key: str):
  """The parameter tree `params_key` of a checkpoint read by
  checkpoint.read (either TrainState layout), or None."""
  if params_key == "tau":
    return (state.get("method_state") or {}).get("tau") or state.get(
        "discovery_params")
  return state.get(params_key)



def _abstract_variables(config):
  """Shapes of {'params', 'batch_stats'} of config's network (no compute)."""
  from odin_jax import step as step_lib
  import optax
  model = methods.get(config).network()
  state = jax.eval_shape(
      lambda: step_lib.create_train_state(config, model, optax.identity(),
                                          jax.random.PRNGKey(0)))
  return {"params": state.params, "batch_stats": state.batch_stats}


# XLA:CPU spends ~60 s optimising a ResNet's init (threefry for every
# kernel) on 2 loaded cores and ~10 s without backend optimisations; init
# runs once, so it is compiled at optimisation level 0.
_INIT_COMPILER_OPTIONS = {"xla_backend_optimization_level": 0}


def init_params(config, seed: int | None = None):
  """The network at initialisation: (params, batch_stats) as host arrays.

  Uses `step.create_train_state` with the PRNG key of config.seed (default),
  i.e. the initialisation a training run with this config starts from.
  """
  from odin_jax import step as step_lib
  import optax
  model = methods.get(config).network()
  seed = config.seed if seed is None else seed
  init = jax.jit(lambda rng: step_lib.create_train_state(
      config, model, optax.identity(), rng))
  rng = jax.random.PRNGKey(seed)
  try:
    compiled = init.lower(rng).compile(compiler_options=_INIT_COMPILER_OPTIONS)
  except Exception:  # pylint: disable=broad-except
    # A backend without this option (GPU/TPU compile fast anyway).
    compiled = init
  state = compiled(rng)
  return jax.device_get(state.params), jax.device_get(state.batch_stats)


def _check_same_structure(restored, expected, what: str, directory) -> None:
  """Raises ValueError naming the first differing path or shape."""
  flat_r = {jax.tree_util.keystr(p): np.shape(v) for p, v in
            jax.tree_util.tree_flatten_with_path(restored)[0]}
  flat_e = {jax.tree_util.keystr(p): tuple(v.shape) for p, v in
            jax.tree_util.tree_flatten_with_path(expected)[0]}
  missing = sorted(set(flat_e) - set(flat_r))
  extra = sorted(set(flat_r) - set(flat_e))
  shapes = sorted(k for k in set(flat_e) & set(flat_r)
                  if tuple(flat_e[k]) != tuple(flat_r[k]))
  if missing or extra or shapes:
    detail = "; ".join(
        f"{name}: {items[:3]}{' ...' if len(items) > 3 else ''}"
        for name, items in (("missing", missing), ("unexpected", extra),
                            ("shape differs", shapes)) if items)
    raise ValueError(
        f"The {what} in {directory} do not fit the network of this config "
        f"({detail}). Evaluate with the config the run was trained with "
        "(same model.* fields).")


def restore_checkpoint(workdir: str, step: int | None = None, *,
                       with_state: bool = True):
  """(state, meta, step) of a checkpoint as host numpy arrays: see
  `odin_jax.checkpoint.read`, the one reader shared with training and
  export (URL-aware; falls back past an unreadable newest step)."""
  return checkpoint.read(workdir, step, with_state=with_state)


def load_params(config, workdir: str, step: int | None = None,
                params_key: str = "params"):
  """Network parameters of a checkpoint: (params, batch_stats, step).

  Restores workdir/checkpoints/<step> (the newest readable if None; see
  `checkpoint.read`) as host numpy arrays whatever devices wrote it,
  without needing the TrainState structure of the code that wrote it
  (only params_key and batch_stats are kept, and checked against the
  network `config` describes).

  Args:
    config: the run's config (its model.* fields define the network).
    workdir: the training workdir (a local path or a URL, gs://...).
    step: checkpoint step; None = the newest readable.
    params_key: 'params' (online θ), 'target_params' (EMA ξ) or 'tau'
      (Odin's discovery network; 'discovery_params', its older name, is
      accepted).
  Raises:
    FileNotFoundError: no checkpoint; ValueError: unknown step, a missing or
    empty params_key, or parameters that do not fit the network.
  """
  params_key = _PARAM_ALIASES.get(params_key, params_key)
  if params_key not in PARAM_KEYS:
    raise ValueError(f"params_key must be one of {PARAM_KEYS}, got "
                     f"{params_key!r}.")
  directory = checkpoint.checkpoint_dir(workdir)
  try:
    state, meta, step = checkpoint.read(workdir, step)
  except FileNotFoundError as e:
    raise FileNotFoundError(f"{e} Or evaluate --source=random.") from None
  _warn_config_differences(meta, config, directory)
  params = params_of(state, params_key)
  if not params:
    raise ValueError(f"The checkpoint at step {step} in {directory} has no "
                     f"{params_key!r} (keys: {sorted(state)}).")
  batch_stats = state.get("batch_stats", {})
  expected = _abstract_variables(config)
  _check_same_structure(params, expected["params"], params_key, directory)
  _check_same_structure(batch_stats, expected["batch_stats"], "batch_stats",
                        directory)
  logging.info("Loaded %s of step %d from %s.", params_key, step, directory)
  return params, batch_stats, step


def _warn_config_differences(meta: dict, config, directory) -> None:
  """Logs model.* fields that differ from the checkpoint's own config."""
  try:
    saved = json.loads(meta["config"]).get("model", {})
  except (KeyError, TypeError, ValueError):
    return
  now = json.loads(config.to_json()).get("model", {})
  diffs = sorted(k for k in set(saved) & set(now) if saved[k] != now[k])
  if diffs:
    logging.warning("model.%s differ from the config saved in %s: %s vs %s.",
                    diffs, directory, [now[k] for k in diffs],
                    [saved[k] for k in diffs])



def default_feature(config, resnet_feature: str | None = None) -> str:
  """The features eval.feature='auto' clusters (Odin App. A.4).

  'projection' (the FPN projections z) with an FPN; else the final hidden
  layer h: 'tokens' for a ViT, eval.resnet_feature ('stage4', stride 32)
  for a ResNet or a Swin (same strides); 'embedding' (its 32-d per-pixel
  embedding, stride 4) for hiergroup. resnet_feature, when given, replaces
  config.eval.resnet_feature (an `EvalSettings` override).
  """
  if config.model.get("backbone", "resnet") == "vit":
    return "tokens"
  method_feature = methods.method_class(config.method).eval_feature
  if method_feature:   # hiergroup: the learnt per-pixel embedding F
    return method_feature
  if config.model.get("fpn_channels", 0):
    return "projection"
  if resnet_feature is None:
    resnet_feature = settings_lib.settings_from_config(config).resnet_feature
  return resnet_feature


_FEATURE_FNS: dict = {}


def _feature_fn(config, model_json: str, feature: str, image_hw):
  """jit(variables, uint8 images [B, H, W, 3]) -> float32 [B, h, w, D].

  Cached per (model config, feature, input size): periodic evaluations
  during training reuse one traced function.
  """
  key = (model_json, feature, image_hw)
  if key in _FEATURE_FNS:
    return _FEATURE_FNS[key]
  model = methods.get(config).network()

  def apply(variables, images):
    x = images.astype(jnp.float32) / 255.0
    if image_hw is not None and tuple(x.shape[1:3]) != tuple(image_hw):
      x = jax.image.resize(x, (x.shape[0], *image_hw, 3), "bilinear",
                           antialias=True)
    if feature == "projection":
      out = model.apply(variables, x, train=False,
                        method=model.dense_projection)
    else:
      maps = model.apply(variables, x, train=False, method=model.feature_maps)
      if feature not in maps:
        raise ValueError(f"Feature {feature!r} is not a map of this network "
                         f"(maps: {sorted(maps)}, or 'projection').")
      out = maps[feature]
    return out.astype(jnp.float32)

  _FEATURE_FNS[key] = jax.jit(apply)
  return _FEATURE_FNS[key]


class FeatureSource:
  """Frozen features of a network: uint8 images -> float32 [N, h, w, D].

  Images [N, H, W, 3] uint8 are scaled to [0, 1], resized bilinearly to
  image_size x image_size (None: kept), and run in batches of batch_size
  (the last batch padded, so one compilation serves every call).
  """

  def __init__(self, config, params, batch_stats, feature: str = "auto",
               image_size: int | None = None, batch_size: int = 16,
               resnet_feature: str | None = None):
    self.feature = (default_feature(config, resnet_feature)
                    if feature == "auto" else feature)
    self.image_size = image_size
    self.batch_size = int(batch_size)
    self._config = config
    # What the method's network is built from: model.*, the method, and
    # the hiergroup head's section.
    self._model_json = json.dumps(
        {k: v for k, v in json.loads(config.to_json()).items()
         if k in ("model", "hiergroup", "method")}, sort_keys=True)
    # Host copies: the evaluation runs on one device whatever the mesh.
    self._variables = jax.device_get({"params": params,
                                      "batch_stats": batch_stats})

  @property
  def variables(self) -> dict:
    """Host copy of the network's {'params', 'batch_stats'}."""
    return self._variables

  def map_fn(self, feature: str, size: Sequence[int]) -> tuple:
    """(fn, key): fn(variables, images uint8 [N, H, W, 3]) -> float32
    [N, h, w, D], this network's `feature` at input size (H', W') = size,
    traced once per key = (network, feature, size), hashable."""
    size = tuple(int(s) for s in size)
    key = (self._model_json, feature, size)
    return _feature_fn(self._config, self._model_json, feature, size), key

  def with_feature(self, feature: str) -> "FeatureSource":
    """The same network, input size and batch, another feature map."""
    other = copy.copy(self)
    other.feature = feature
    return other

  def __call__(self, images, image_size: int | Sequence[int] | None = -1
               ) -> np.ndarray:
    """images uint8 [N, H, W, 3] -> float32 [N, h, w, D].

    image_size: network input side or (H, W); -1 = self.image_size;
    None = the images' own size.
    """
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[-1] != 3:
      raise ValueError(f"images must be [N, H, W, 3], got {images.shape}")
    size = self.image_size if image_size == -1 else image_size
    if size is not None and np.ndim(size) == 0:
      size = (int(size), int(size))
    fn = _feature_fn(self._config, self._model_json, self.feature,
                     None if size is None else tuple(int(s) for s in size))
    out = []
    for start in range(0, len(images), self.batch_size):
      batch = images[start:start + self.batch_size]
      n = len(batch)
      if n < self.batch_size:
        batch = np.concatenate(
            [batch, np.repeat(batch[-1:], self.batch_size - n, axis=0)])
      out.append(np.asarray(fn(self._variables, jnp.asarray(batch)))[:n])
    if not out:
      raise ValueError("no images")
    return np.concatenate(out)

