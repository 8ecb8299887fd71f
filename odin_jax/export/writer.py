"""`export(workdir, ...)`: a checkpoint's online backbone -> files.

Restores the checkpoint as evaluation does (`checkpoint.read` for the
saved config, `runner.load_params` for the checked parameters), keeps
params['backbone'] / batch_stats['backbone'] and writes the requested
formats (see odin_jax/export/__main__.py for the files), then
export_info.json and a README.md that says how to load them.
Every file is written to a temporary name and renamed (on GCS, uploaded
as one object, which appears whole or not at all), so an interrupted
export never leaves a truncated file under a final name. The workdir and
the output folder may be URLs (gs://...): checkpoints are read by
`odin_jax.checkpoint.read` and files written through etils.epath, as
training does.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import pickle
import shutil
import tempfile
import zipfile

import numpy as np
from absl import logging
from etils import epath

from odin_jax import checkpoint
from odin_jax.export import convert

FORMATS = ("npz", "torchvision", "detectron2", "timm")
FILES = {"npz": ("backbone.npz",),
         "torchvision": ("torchvision.safetensors", "torchvision.pth"),
         "detectron2": ("detectron2.pkl",),
         "timm": ("timm.safetensors",)}
_ZIP_TIME = (1980, 1, 1, 0, 0, 0)   # the earliest a zip can store


def config_from_meta(meta: dict):
  """The ConfigDict a checkpoint was written with (its JSON record)."""
  import ml_collections
  return ml_collections.ConfigDict(json.loads(meta["config"]))


def resolve_formats(formats, backbone: str, depth: int | None) -> tuple:
  """The formats to write: the requested ones, checked, or all that apply.

  formats: None (all that apply), a comma string or a sequence.
  """
  applicable = (("npz", "torchvision", "detectron2") if backbone == "resnet"
                else ("npz", "timm"))
  if formats is None:
    return tuple(f for f in applicable
                 if f != "detectron2" or depth in convert.DETECTRON2_DEPTHS)
  if isinstance(formats, str):
    formats = formats.split(",")
  formats = tuple(dict.fromkeys(f.strip() for f in formats if f.strip()))
  unknown = [f for f in formats if f not in FORMATS]
  if unknown or not formats:
    raise ValueError(f"Unknown export format(s) {unknown or formats}; "
                     f"choose from {FORMATS} (comma-separated).")
  if backbone != "resnet" and set(formats) - set(applicable):
    raise NotImplementedError(
        f"Formats {sorted(set(formats) - set(applicable))} exist for ResNet "
        f"backbones only; export the {backbone!r} backbone as one of "
        f"{applicable}.")
  if backbone == "resnet" and "timm" in formats:
    raise ValueError("The 'timm' format is for ViT/Swin backbones; export "
                     "a ResNet as npz, torchvision or detectron2.")
  if "detectron2" in formats and depth not in convert.DETECTRON2_DEPTHS:
    raise ValueError(f"detectron2 has no ResNet-{depth} (its ResNets: "
                     f"{convert.DETECTRON2_DEPTHS}); export npz or "
                     "torchvision instead.")
  return formats


def timm_converter(backbone: str):
  """`timm_state_dict(backbone_params) -> {timm name: array}` of a
  non-ResNet backbone: `convert.timm_state_dict` with that backbone's
  mapping table (the table weights_in.py imports with; the keys, and how
  to load them in timm: odin_jax.models.vit / swin.timm_state_dict)."""
  if backbone not in ("vit", "swin"):
    raise NotImplementedError(
        f"Export of the {backbone!r} backbone is not implemented: "
        "torchvision/detectron2 names exist for ResNets only, and the "
        "'timm' format (timm state_dict names in .safetensors) for vit and "
        "swin (odin_jax/export/convert.py's mapping tables).")
  return functools.partial(convert.timm_state_dict, backbone)


def export(workdir: str, *, config=None, step: int | None = None,
           formats=None, out_dir: str | None = None) -> dict:
  """Writes the online backbone of a checkpoint (see the module docstring).

  Args:
    workdir: the training workdir (checkpoints in workdir/checkpoints); a
      local path or a URL (gs://...).
    config: the run's config; None = the one saved in the checkpoint.
    step: checkpoint step; None = the newest readable one.
    formats: subset of FORMATS (sequence or comma string); None = all that
      apply (detectron2 only for the depths it has).
    out_dir: output folder; None = workdir/export/step_<step>.
  Returns:
    The export_info.json record.
  Raises:
    FileNotFoundError: no checkpoint in workdir; ValueError: unknown step or
    format, a depth detectron2 lacks, parameters that do not fit the config;
    NotImplementedError: a non-ResNet backbone without a timm converter.
  """
  from odin_jax.evaluate import runner
  from odin_jax.models import network
  if config is None:
    # Only the JSON record; `step` stays the caller's, so that load_params
    # below still falls back past a newest step whose arrays are unreadable.
    _, meta, _ = checkpoint.read(workdir, step, with_state=False)
    config = config_from_meta(meta)
  backbone = config.model.get("backbone", "resnet")
  to_timm = timm_converter(backbone) if backbone != "resnet" else None
  depth = int(config.model.depth) if backbone == "resnet" else None
  formats = resolve_formats(formats, backbone, depth)
  params, batch_stats, step = runner.load_params(config, workdir, step)
  variables = {"params": params["backbone"],
               "batch_stats": batch_stats.get("backbone", {})}
  out_dir = (checkpoint.as_path(out_dir) if out_dir else
             checkpoint.as_path(workdir) / "export" / f"step_{step}")
  out_dir.mkdir(parents=True, exist_ok=True)

  info = {"method": config.method, "step": int(step),
          "workdir": str(checkpoint.as_path(workdir)),
          "out_dir": str(out_dir), "backbone": backbone,
          "num_backbone_arrays": len(convert.flatten(variables)),
          "input": _input_info(), "files": {}, "warnings": []}
  if backbone == "resnet":
    info.update(_resnet_info(depth, float(config.model.width), info))
    output_stride = int(config.model.get("output_stride", 32))
    info["output_stride"] = output_stride
    if output_stride != 32:
      info["warnings"].append(
          f"trained at output stride {output_stride} (dilated stage4"
          f"{'' if output_stride == 16 else ' and stage3'}): the weights are "
          "those of a stride-32 ResNet and load unchanged; to reproduce the "
          "trained geometry build the model with torchvision's "
          "replace_stride_with_dilation (Bottleneck ResNets only) or "
          "odin_jax.models.resnet.ResNet(output_stride=...).")
  else:
    info["timm"] = {
        "options": dict(network.transformer_fields(config).get(
            "backbone_options", ())),
        "load": f"see odin_jax.models.{backbone}.timm_state_dict's "
                "docstring: timm.create_model(<matching name>, "
                "num_classes=0).load_state_dict(safetensors.torch."
                "load_file('timm.safetensors'))"}
  logging.info("Exporting the %s backbone of step %d (%s) to %s as %s.",
               _title(info), step, config.method, out_dir, ", ".join(formats))

  def record(fmt, name, keys, written):
    info["files"][name] = {"format": fmt, "keys": keys, **written}
    logging.info("Wrote %s (%d arrays, %.1f MB).", out_dir / name, keys,
                 written["bytes"] / 1e6)

  # One metadata entry only: safetensors writes several in a random order,
  # and the same checkpoint should give the same bytes (and sha256).
  # Provenance is in export_info.json.
  tensor_metadata = {"format": "pt"}
  if "npz" in formats:
    name, = FILES["npz"]
    record("npz", name, info["num_backbone_arrays"],
           _write_npz(out_dir / name, variables))
  if "timm" in formats:
    name, = FILES["timm"]
    state_dict = {k: np.asarray(v) for k, v in
                  to_timm(variables["params"]).items()}
    record("timm", name, len(state_dict),
           _write_safetensors(out_dir / name, state_dict, tensor_metadata))
  if {"torchvision", "detectron2"} & set(formats):
    state_dict = convert.torchvision_state_dict(variables, depth, int(step))
  if "torchvision" in formats:
    st_name, pth_name = FILES["torchvision"]
    record("torchvision", st_name, len(state_dict),
           _write_safetensors(out_dir / st_name, state_dict, tensor_metadata))
    written = _write_pth(out_dir / pth_name, state_dict)
    if written:
      record("torchvision", pth_name, len(state_dict), written)
    else:
      info["warnings"].append(f"torch is not importable: {pth_name} "
                              f"skipped ({st_name} holds the same "
                              "state_dict).")
  else:
    info.pop("torchvision", None)
  if "detectron2" in formats:
    name, = FILES["detectron2"]
    record("detectron2", name, len(state_dict),
           _write_pickle(out_dir / name,
                         convert.detectron2_checkpoint(state_dict)))
    cfg, warnings = convert.detectron2_config(depth, info["width"])
    info["warnings"] += warnings
    info["detectron2"] = {
        "config": cfg, "yaml": convert.detectron2_yaml(cfg),
        "note": "MODEL.RESNETS.NORM: FrozenBN (default) or SyncBN to "
                "fine-tune; FrozenBN ignores the num_batches_tracked "
                "entries (logged as unused keys)."}
  for warning in info["warnings"]:
    logging.warning("%s", warning)
  _write_text(out_dir / "export_info.json", json.dumps(info, indent=1) + "\n")
  _write_text(out_dir / "README.md", _readme(info))
  logging.info("Wrote %s.", out_dir / "export_info.json")
  return info


def _input_info() -> dict:
  """The networks normalise their [0, 1] input inside (resnet.py, vit.py,
  swin.py); exported weights expect the caller to do it."""
  from odin_jax.models import resnet
  return {"color": "RGB", "scale": "[0, 1] (uint8 / 255)",
          "normalisation": "(x - mean) / std per channel, NOT part of the "
                           "exported weights: the caller applies it",
          "mean": list(resnet.IMAGENET_MEAN), "std": list(resnet.IMAGENET_STD)}


def _title(info: dict) -> str:
  if info["backbone"] != "resnet":
    return info["backbone"]
  return f"ResNet-{info['depth']} x{info['width']:g}"


def _resnet_info(depth: int, width: float, info: dict) -> dict:
  """export_info fields of a ResNet (shape, BN, torchvision use); appends
  its warnings to info['warnings']."""
  from odin_jax.models import resnet
  kind = resnet.STAGE_SIZES[depth][0]
  expansion = 1 if kind == "basic" else 4
  if width != 1.0:
    info["warnings"].append(
        f"width {width:g}: the channel counts are not those of "
        f"torchvision's resnet{depth}() (stem {convert.channels(width, 64)}"
        ", not 64): build a torchvision ResNet with matching widths (its "
        "width_per_group and wide_resnet* widen only the inner 3x3 convs, "
        "which is not this).")
  model = (f"torchvision.models.resnet{depth}()" if depth != 200 else
           "torchvision.models.resnet.ResNet("
           "torchvision.models.resnet.Bottleneck, [3, 24, 36, 3])")
  return {
      "depth": depth, "width": width, "block": kind,
      "stem_channels": convert.channels(width, 64),
      "stage_channels": [convert.channels(width, 64 * 2**i) * expansion
                         for i in range(4)],
      "batch_norm": {"epsilon": 1e-5, "momentum_torch": 0.1,
                     "num_batches_tracked": "the training step"},
      "torchvision": {
          "model": model, "standard_widths": width == 1.0,
          "load": "model.load_state_dict(safetensors.torch.load_file("
                  "'torchvision.safetensors'), strict=False)  # missing: "
                  "fc.weight, fc.bias only"}}


def _readme(info: dict) -> str:
  mean, std = info["input"]["mean"], info["input"]["std"]
  text = [f"# {_title(info)} backbone: {info['method']}, step "
          f"{info['step']}", "",
          f"Input: RGB images in [0, 1], normalised as (x - {mean}) / {std} "
          "by the caller (the weights do not include it).", "",
          "Files (sha256 in export_info.json):", ""]
  text += [f"- {name}: {entry['format']}, {entry['keys']} arrays"
           for name, entry in info["files"].items()]
  text.append("")
  if "timm" in info:
    text += ["timm: " + info["timm"]["load"], ""]
  if "torchvision" in info:
    t = info["torchvision"]
    text += ["torchvision:", "", "    import safetensors.torch, torchvision",
             f"    model = {t['model']}", f"    {t['load']}", ""]
  if "detectron2" in info:
    text += ["detectron2 config (YAML):", "",
             *("    " + line for line in
               info["detectron2"]["yaml"].splitlines()), "",
             info["detectron2"]["note"], ""]
  text += [f"Warning: {w}" for w in info["warnings"]]
  return "\n".join(text).rstrip() + "\n"


# --- Files ----------------------------------------------------------------


def _sha256(path: str) -> str:
  digest = hashlib.sha256()
  with open(path, "rb") as f:
    for chunk in iter(lambda: f.read(1 << 20), b""):
      digest.update(chunk)
  return digest.hexdigest()


def _atomic(path: epath.Path, write) -> dict:
  """write(local_tmp_path), then publish it at `path`; never a half-written
  file there. Returns {'bytes', 'sha256'} of what was written.

  A local `path` gets a temporary file beside it and a rename; a URL
  (gs://...) is uploaded from a local temporary file under its final name
  (an object store makes the object visible whole or not at all).
  """
  local = "://" not in str(path)
  if local:
    tmp = str(path) + ".tmp"
  else:
    handle, tmp = tempfile.mkstemp(suffix=".tmp")
    os.close(handle)
  try:
    write(tmp)
    written = {"bytes": os.path.getsize(tmp), "sha256": _sha256(tmp)}
    if local:
      os.replace(tmp, path)
    else:
      with open(tmp, "rb") as src, path.open("wb") as dst:
        shutil.copyfileobj(src, dst, 1 << 20)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)
  return written


def _write_text(path: epath.Path, text: str) -> dict:
  def write(tmp):
    with open(tmp, "w", encoding="utf-8") as f:
      f.write(text)
  return _atomic(path, write)


def _write_npz(path: epath.Path, variables: dict) -> dict:
  """np.savez's layout (one NAME.npy per array, np.load reads it) with a
  fixed timestamp, so that the same checkpoint gives the same sha256."""
  def write(tmp):
    with zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED,
                         allowZip64=True) as archive:
      for name, array in sorted(convert.flatten(variables).items()):
        member = zipfile.ZipInfo(name + ".npy", date_time=_ZIP_TIME)
        with archive.open(member, "w", force_zip64=True) as f:
          np.lib.format.write_array(f, array, allow_pickle=False)
  return _atomic(path, write)


def _write_safetensors(path: epath.Path, state_dict: dict,
                       metadata: dict) -> dict:
  from safetensors import numpy as st_numpy
  return _atomic(path, lambda tmp: st_numpy.save_file(state_dict, tmp,
                                               metadata=metadata))


def _write_pth(path: epath.Path, state_dict: dict) -> dict | None:
  """torch.save of the tensors; None without torch (the caller warns)."""
  try:
    import torch  # pylint: disable=import-outside-toplevel
  except ImportError:
    return None
  tensors = {k: torch.from_numpy(np.array(v)) for k, v in state_dict.items()}
  return _atomic(path, lambda tmp: torch.save(tensors, tmp))


class _PortablePickler(pickle.Pickler):
  """Pickles arrays as numpy.ndarray(shape, dtype, buffer=bytearray).

  NumPy 2 reduces arrays to numpy._core.multiarray._reconstruct, which
  NumPy 1.x (still common next to detectron2) cannot import; the ndarray
  constructor is the same in both. A bytearray buffer keeps the loaded
  arrays writable (torch.from_numpy warns on read-only ones).
  """

  def reducer_override(self, obj):
    if isinstance(obj, np.ndarray):
      array = np.asarray(obj, order="C")   # (ascontiguousarray makes 0-d 1-d)
      return np.ndarray, (array.shape, array.dtype.str,
                          bytearray(array.tobytes()))
    return NotImplemented


def _write_pickle(path: epath.Path, obj) -> dict:
  def write(tmp):
    with open(tmp, "wb") as f:
      _PortablePickler(f, protocol=4).dump(obj)
  return _atomic(path, write)
