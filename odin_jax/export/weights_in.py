"""Weights in: `config.init_from` -> the online backbone θ (and ξ, τ).

The inverse of the export (writer.py): the same mapping tables
(convert.py) read in the other direction. `init_from` names
  a torchvision ResNet checkpoint  .pth / .pt / .safetensors with
                                   torchvision names (conv1.weight, bn1.*,
                                   layer1.0.conv1.weight, ...; fc.* ignored)
  a timm ViT / Swin checkpoint     .pth / .pt / .safetensors / .npz with
                                   timm names (blocks.0.attn.qkv.weight,
                                   layers.0.blocks.0.*, ...; head.* ignored)
  odin_jax's own export            backbone.npz (flat Flax names), or the
                                   export folder holding it
  another run's workdir            its newest readable checkpoint's θ
                                   (`checkpoint.read`; a local path or a
                                   URL, gs://...)
Torch names follow model.backbone (resnet: torchvision; vit / swin: timm).
Only the backbone is loaded: projector, predictor, FPN keep their init. A checkpoint that does not
fit the config's network (another depth or width, missing or unexpected
names, other shapes) stops with ValueError naming the first mismatches,
in the checkpoint's own names and layout.

Training (`apply`, called by train.py after the restore) loads the weights
into θ, ξ and τ of a fresh run only: a run resumed from its own checkpoint
keeps it. Evaluation (`initial_params`) gives the network at
initialisation with the imported backbone (`python -m odin_jax.evaluate
--source=init_from:PATH`).
"""

from __future__ import annotations

import io
import os

import numpy as np
from absl import logging
from etils import epath

from odin_jax.export import convert

TORCH_SUFFIXES = (".pth", ".pt", ".bin")
FILE_SUFFIXES = TORCH_SUFFIXES + (".safetensors", ".npz")
# torch names a checkpoint may hold that the backbone has no use for.
_IGNORED = {"resnet": ("fc.",), "vit": ("head.",), "swin": ("head.",)}
_IGNORED_SUFFIXES = (".num_batches_tracked", ".relative_position_index",
                     ".attn_mask")
# A wrapped checkpoint: {'state_dict': {...}} (Lightning, timm's train
# script), {'model': {...}} (DeiT); an EMA copy beside it is not read.
_WRAPPERS = ("state_dict", "model", "module")
_SHOW = 5   # mismatching names shown per kind


# --- Reading a checkpoint -------------------------------------------------


def read_arrays(path: str) -> tuple[str, dict[str, np.ndarray]]:
  """(format, {name: array}) of a checkpoint file or workdir.

  format: 'odin_jax' (flat Flax names 'params/...', 'batch_stats/...':
  backbone.npz or a workdir's θ) or 'torch' (torch state_dict names).
  """
  p = epath.Path(path) if "://" in str(path) else epath.Path(
      os.path.abspath(path))
  if p.is_dir():
    if (p / "backbone.npz").exists():        # an export folder
      return read_arrays(str(p / "backbone.npz"))
    return "odin_jax", _read_workdir(str(p))
  if not p.exists():
    raise FileNotFoundError(f"init_from={path}: no such file or directory.")
  suffix = p.suffix.lower()
  if suffix not in FILE_SUFFIXES:
    raise ValueError(f"init_from={path}: unknown checkpoint type "
                     f"{suffix or '(no suffix)'}; give one of "
                     f"{FILE_SUFFIXES} or a workdir.")
  data = p.read_bytes()
  if suffix == ".safetensors":
    from safetensors import numpy as st_numpy
    arrays = st_numpy.load(data)
  elif suffix == ".npz":
    with np.load(io.BytesIO(data), allow_pickle=False) as npz:
      arrays = {k: npz[k] for k in npz.files}
  else:
    arrays = _read_torch(data, path)
  arrays = _unwrap(arrays)
  if any(k.startswith(("params/", "batch_stats/")) for k in arrays):
    return "odin_jax", arrays
  return "torch", arrays


def _read_torch(data: bytes, path: str) -> dict:
  try:
    import torch  # pylint: disable=import-outside-toplevel
  except ImportError:
    raise ValueError(
        f"init_from={path}: reading a torch pickle needs torch, which is "
        "not importable here. Save it as safetensors where torch is "
        "(safetensors.torch.save_file(torch.load(f), 'x.safetensors')), or "
        "install torch.") from None
  obj = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
  obj = _unwrap(obj)

  def host(value):
    if value.dtype in (torch.bfloat16, torch.float16):
      value = value.float()
    return value.detach().cpu().numpy()
  return {k: host(v) for k, v in obj.items() if isinstance(v, torch.Tensor)}


def _unwrap(obj: dict) -> dict:
  """The state_dict inside a wrapper dict, without a DDP 'module.' prefix."""
  while isinstance(obj, dict):
    inner = [k for k in _WRAPPERS if isinstance(obj.get(k), dict)]
    if not inner or any(not isinstance(v, dict) and hasattr(v, "shape")
                        for v in obj.values()):
      break
    obj = obj[inner[0]]
  if obj and all(k.startswith("module.") for k in obj):
    obj = {k[len("module."):]: v for k, v in obj.items()}
  return obj


def _read_workdir(workdir: str) -> dict[str, np.ndarray]:
  """θ's backbone (and its BN statistics) of a run's newest checkpoint."""
  from odin_jax import checkpoint
  state, _, step = checkpoint.read(workdir)
  variables = {"params": state["params"]["backbone"]}
  stats = (state.get("batch_stats") or {}).get("backbone")
  if stats:
    variables["batch_stats"] = stats
  logging.info("init_from: step %d of %s.", step, workdir)
  return convert.flatten(variables)


# --- Matching against the config's network --------------------------------


def _title(config) -> str:
  backbone = config.model.get("backbone", "resnet")
  if backbone == "resnet":
    return f"ResNet-{config.model.depth} x{config.model.width:g}"
  return {"vit": "ViT", "swin": "Swin"}.get(backbone, backbone)


def _ignored(backbone: str, name: str) -> bool:
  return (name.startswith(_IGNORED.get(backbone, ())) or
          name.endswith(_IGNORED_SUFFIXES))


def _mismatch(path, config, fmt, missing, unexpected, shapes, hint) -> str:
  """The error message: the first mismatching names of each kind."""
  parts = []
  for what, names in (("missing", missing), ("unexpected", unexpected)):
    if names:
      more = f" ... ({len(names)} in all)" if len(names) > _SHOW else ""
      parts.append(f"{what}: {', '.join(names[:_SHOW])}{more}")
  if shapes:
    more = f" ... ({len(shapes)} in all)" if len(shapes) > _SHOW else ""
    parts.append("shape differs: " + ", ".join(
        f"{name} expected {want} found {got}"
        for name, want, got in shapes[:_SHOW]) + more)
  return (f"init_from={path} ({fmt} names) does not fit this config's "
          f"{_title(config)} backbone: {'; '.join(parts)}." +
          (f" {hint}" if hint else ""))


def describe_torch(backbone: str, arrays: dict) -> str:
  """What a torch checkpoint looks like, for the mismatch message."""
  if backbone == "resnet" and "conv1.weight" in arrays:
    blocks = [convert.count_indices(arrays, f"layer{i}.{{}}.")
              for i in range(1, 5)]
    bottleneck = "layer1.0.conv3.weight" in arrays
    depths = {(False, (2, 2, 2, 2)): 18, (False, (3, 4, 6, 3)): 34,
              (True, (3, 4, 6, 3)): 50, (True, (3, 4, 23, 3)): 101,
              (True, (3, 8, 36, 3)): 152, (True, (3, 24, 36, 3)): 200}
    depth = depths.get((bottleneck, tuple(blocks)))
    stem = arrays["conv1.weight"].shape[0]
    return (f"The checkpoint is a {'ResNet-%d' % depth if depth else 'ResNet'}"
            f" ({'bottleneck' if bottleneck else 'basic'} blocks "
            f"{tuple(blocks)}, stem {stem} channels = width "
            f"{stem / 64:g}): set model.depth / model.width to match.")
  if backbone == "vit" and "pos_embed" in arrays:
    depth = convert.count_indices(arrays, "blocks.{}.")
    _, tokens, width = arrays["pos_embed"].shape
    patch = arrays.get("patch_embed.proj.weight", np.zeros((0, 0, 0))).shape
    return (f"The checkpoint is a ViT of depth {depth}, width {width}, patch "
            f"{patch[-1] if len(patch) == 4 else '?'}, {tokens} position "
            "embeddings: set model.vit.depth / width / patch_size to match "
            "and model.vit.pos_size to the side they were learnt at (224 "
            "for 197 = 14x14 + 1).")
  if backbone == "swin" and "patch_embed.proj.weight" in arrays:
    depths = tuple(
        convert.count_indices(arrays, f"layers.{i}.blocks.{{}}.")
        for i in range(4))
    return (f"The checkpoint is a Swin of embed_dim "
            f"{arrays['patch_embed.proj.weight'].shape[0]}, depths {depths}: "
            "set model.swin.* to match (timm >= 0.9 names).")
  return ("Is it a checkpoint of this backbone family (model.backbone="
          f"{backbone!r})?")


def match(path: str, config, fmt: str, arrays: dict,
          expected: dict[str, tuple]) -> tuple[dict, dict]:
  """Maps a checkpoint's arrays onto the expected flat Flax names.

  Args:
    path: for messages.
    config: the run's config (model.backbone, depth).
    fmt: 'odin_jax' or 'torch' (`read_arrays`).
    arrays: {name: array} as read.
    expected: {flat Flax name: shape} of the config's backbone.
  Returns:
    ({flat Flax name: float32 array} for every expected name that the
    format has, info {'format', 'loaded', 'ignored', 'kept_at_init'}).
  Raises:
    ValueError naming the first missing / unexpected names and shapes.
  """
  backbone = config.model.get("backbone", "resnet")
  depth = int(config.model.depth) if backbone == "resnet" else None
  if fmt == "odin_jax":
    # In the network's order (the table's), so 'first' means the stem.
    order = [e.flax for e in convert.table_for(backbone, expected, depth)]
    rank = {k: i for i, k in reversed(list(enumerate(order)))}
    expected = dict(sorted(expected.items(),
                           key=lambda kv: rank.get(kv[0], len(rank))))
    missing = [k for k in expected if k not in arrays]
    unexpected = sorted(k for k in arrays if k not in expected)
    shapes = [(k, tuple(expected[k]), tuple(np.shape(arrays[k])))
              for k in expected if k in arrays
              and tuple(np.shape(arrays[k])) != tuple(expected[k])]
    if missing or unexpected or shapes:
      raise ValueError(_mismatch(path, config, "odin_jax", missing,
                                 unexpected, shapes, "Use the config of the "
                                 "run that wrote it (same model.* fields)."))
    return ({k: np.asarray(arrays[k], np.float32) for k in expected},
            {"format": "odin_jax", "loaded": len(expected), "ignored": [],
             "kept_at_init": []})

  table = [e for e in convert.table_for(backbone, expected, depth)
           if e.flax in expected and e.kind != convert.COUNTER]
  by_torch = {e.torch: e for e in table}
  missing = [e.torch for e in table if e.torch not in arrays]
  unexpected = [k for k in arrays
                if k not in by_torch and not _ignored(backbone, k)]
  shapes = []
  for name, entry in by_torch.items():
    if name in arrays:
      want = convert.torch_shape(entry.kind, tuple(expected[entry.flax]))
      if tuple(arrays[name].shape) != tuple(want):
        shapes.append((name, tuple(want), tuple(arrays[name].shape)))
  if missing or unexpected or shapes:
    raise ValueError(_mismatch(
        path, config, "torchvision" if backbone == "resnet" else "timm",
        missing, unexpected, shapes, describe_torch(backbone, arrays)))
  flat = {e.flax: np.ascontiguousarray(
      convert.from_torch(e.kind, np.asarray(arrays[e.torch])), np.float32)
          for e in table}
  info = {"format": "torchvision" if backbone == "resnet" else "timm",
          "loaded": len(flat),
          "ignored": sorted(k for k in arrays if k not in by_torch),
          "kept_at_init": [k for k in expected if k not in flat]}
  return flat, info


def _shapes(expected_variables: dict) -> dict[str, tuple]:
  """{'params/stem/...': shape} of a network's backbone variables."""
  from flax import traverse_util
  return {k: tuple(v.shape) for k, v in traverse_util.flatten_dict(
      {k: v for k, v in expected_variables.items() if v}, sep="/").items()}


def check(abstract_state, config) -> None:
  """Raises the mismatch error of config.init_from now, against the state's
  shapes (step.build's abstract_state), before the state's init compiles:
  a wrong file fails in seconds, not after a minute of compiling."""
  path = config.get("init_from") or ""
  if path:
    fmt, arrays = read_arrays(path)
    match(path, config, fmt, arrays, _shapes(
        _expected(abstract_state.params, abstract_state.batch_stats)))


def load_backbone(path: str, config, expected_variables: dict,
                  read: tuple | None = None) -> tuple[dict, dict]:
  """The backbone arrays in `path` under the config network's Flax names.

  Args:
    path: config.init_from (see the module docstring).
    config: the run's config.
    expected_variables: {'params': backbone params, 'batch_stats': backbone
      BN statistics ({} for transformers)} of the config's network: any
      leaves with a .shape (arrays, jax.ShapeDtypeStructs).
    read: `read_arrays(path)` when the caller has read the file already.
  Returns:
    ({flat Flax name 'params/...' / 'batch_stats/...': float32 array}: every
    name of `expected_variables` but those the format lacks (Swin's
    stage1-3 output norms under timm names: info['kept_at_init']);
    info: source, format, counts and the names ignored / kept, also logged).
  """
  fmt, arrays = read or read_arrays(path)
  flat, info = match(path, config, fmt, arrays, _shapes(expected_variables))
  info.update(source=str(path), backbone=_title(config),
              parameters=int(sum(v.size for k, v in flat.items()
                                 if k.startswith("params/"))))
  logging.info(
      "init_from: loaded %d arrays (%.2fM parameters) of the %s backbone "
      "from %s (%s names); ignored in the file: %s; kept at init: %s; "
      "heads (projector, predictor, FPN) keep their init.",
      info["loaded"], info["parameters"] / 1e6, info["backbone"], path,
      info["format"], _groups(info["ignored"]) or "nothing",
      _groups(info["kept_at_init"]) or "nothing")
  return flat, info


def _groups(names) -> str:
  """'fc.* x2, *.num_batches_tracked x20': names summarised for the log."""
  counts = {}
  for name in names:
    sep = "/" if "/" in name else "."
    key = (f"*{sep}{name.rsplit(sep, 1)[1]}" if name.endswith(
        _IGNORED_SUFFIXES) else f"{name.rsplit(sep, 1)[0]}{sep}*")
    counts[key] = counts.get(key, 0) + 1
  return ", ".join(f"{k} x{n}" if n > 1 else k for k, n in counts.items())


# --- Training and evaluation ----------------------------------------------


def _merged(tree, flat: dict, prefix: str, put):
  """`tree` (a network's params or batch_stats) with its 'backbone' leaves
  replaced by put(flat['<prefix>/<name>'], old leaf) where flat has them."""
  from flax import traverse_util
  old = traverse_util.flatten_dict(tree["backbone"], sep="/")
  new = {k: put(flat[f"{prefix}/{k}"], v) if f"{prefix}/{k}" in flat else v
         for k, v in old.items()}
  tree = dict(tree)
  tree["backbone"] = traverse_util.unflatten_dict(new, sep="/")
  return tree


def _like(value: np.ndarray, ref):
  """`value` as a jax.Array with the dtype and sharding of `ref` (a new
  buffer: θ, ξ and τ must never share one, the step donates the state)."""
  import jax
  value = np.asarray(value, ref.dtype)
  # A copy per shard: on CPU jax may alias a NumPy buffer instead of
  # copying it, and θ, ξ, τ are made from the same `value`.
  return jax.make_array_from_callback(
      value.shape, ref.sharding, lambda index: np.array(value[index]))


def _expected(params, batch_stats) -> dict:
  return {"params": params["backbone"],
          "batch_stats": (batch_stats or {}).get("backbone", {})}


def apply(state, config):
  """`state` with config.init_from's backbone in θ, ξ and τ (a fresh run).

  Called after the restore: a state at step > 0 was resumed from the
  workdir's own checkpoint, which wins (returned unchanged). The BN
  statistics are the file's too; the optimizer state does not depend on
  the parameters' values at step 0 (zero moments), so it is kept.
  """
  import jax
  path = config.get("init_from") or ""
  if not path:
    return state
  step = int(jax.device_get(state.step))
  if step != 0:
    logging.info("init_from=%s not applied: resumed at step %d from the "
                 "workdir's own checkpoint.", path, step)
    return state
  flat, _ = load_backbone(path, config,
                          _expected(state.params, state.batch_stats))
  # θ, ξ and every copy of θ in the method's state (Odin's τ).
  theta = jax.tree.structure(state.params)
  load = lambda tree: (_merged(tree, flat, "params", _like)
                       if tree and jax.tree.structure(tree) == theta else tree)
  updates = {"params": load(state.params),
             "target_params": load(state.target_params)}
  if isinstance(state.method_state, dict):
    updates["method_state"] = {k: load(v)
                               for k, v in state.method_state.items()}
  if _expected(state.params, state.batch_stats)["batch_stats"]:
    updates["batch_stats"] = _merged(state.batch_stats, flat, "batch_stats",
                                     _like)
  return state.replace(**updates)


def initial_params(config, path: str):
  """(params, batch_stats) host trees: the network at initialisation
  (config.seed, as `runner.init_params`) with `path`'s backbone."""
  from odin_jax.evaluate import runner
  read = read_arrays(path)   # a missing file fails before the compile
  params, batch_stats = runner.init_params(config)
  flat, _ = load_backbone(path, config, _expected(params, batch_stats), read)
  put = lambda value, ref: np.asarray(value, ref.dtype)
  params = _merged(params, flat, "params", put)
  if _expected(params, batch_stats)["batch_stats"]:
    batch_stats = _merged(batch_stats, flat, "batch_stats", put)
  return params, batch_stats
