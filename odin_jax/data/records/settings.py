"""Mask settings: 'method:field=value,...' strings <-> mask configs.

Mask settings name what a records directory holds under 'masks/<key>'
(format.py). They are written `method:field=value,...` on the command line,
with the field names of config.masks minus their method prefix:
  fh:scale=1000,sigma=0.8,min_size=1000   slic:n_segments=100,compactness=10
  grid:size=5                             gt
  hierarchy:max_leaves=40,superpixels=400,compactness=0,sigma=1,min_leaf_area=0.005
`precompute_command` spells the command that writes records for settings;
error messages across the data layer show it.
"""

from __future__ import annotations

from typing import Sequence

import ml_collections

# method -> {setting field: (config.masks field, type, default)}.
_FIELDS = {
    "fh": {"scale": ("fh_scale", float, 1000.0),
           "sigma": ("fh_sigma", float, 0.8),
           "min_size": ("fh_min_size", int, 1000)},
    "fh_opencv": {"scale": ("fh_scale", float, 1000.0),      # same fields
                  "sigma": ("fh_sigma", float, 0.8),
                  "min_size": ("fh_min_size", int, 1000)},
    "slic": {"n_segments": ("slic_n_segments", int, 64),
             "compactness": ("slic_compactness", float, 10.0)},
    "grid": {"size": ("grid_size", int, 5)},
    "gt": {},
    "hierarchy": {"max_leaves": ("hier_max_leaves", int, 40),
                  "superpixels": ("hier_superpixels", int, 400),
                  "compactness": ("hier_compactness", float, 0.0),
                  "sigma": ("hier_sigma", float, 1.0),
                  "min_leaf_area": ("hier_min_leaf_area", float, 0.005)},
}


# ----------------------------------------------------------- mask settings --
def parse_mask_setting(text: str) -> ml_collections.ConfigDict:
  """'fh:scale=500,min_size=500' -> mask config (method + config.masks fields).

  Missing fields take the defaults above; unknown ones raise ValueError.
  """
  method, _, rest = text.strip().partition(":")
  if method not in _FIELDS:
    raise ValueError(f"Mask setting {text!r}: method must be one of "
                     f"{tuple(_FIELDS)} (e.g. 'fh:scale=1000,sigma=0.8,"
                     "min_size=1000', 'slic:n_segments=100', 'grid:size=5').")
  fields = _FIELDS[method]
  cfg = ml_collections.ConfigDict({"method": method})
  for name, (field, kind, default) in fields.items():
    cfg[field] = kind(default)
  for item in filter(None, (s.strip() for s in rest.split(","))):
    name, eq, value = item.partition("=")
    if not eq or name.strip() not in fields:
      takes = ", ".join(f"{k}=..." for k in fields) or "no fields"
      raise ValueError(f"Mask setting {text!r}: bad item {item!r}; {method} "
                       f"takes {takes}.")
    field, kind, _ = fields[name.strip()]
    try:
      cfg[field] = kind(float(value)) if kind is int else kind(value)
    except ValueError:
      raise ValueError(f"Mask setting {text!r}: {name}={value!r} is not a "
                       f"{kind.__name__}.") from None
  return cfg


def mask_setting_string(mask_config) -> str:
  """Canonical 'method:field=value,...' of a mask config (inverse of parse)."""
  method = mask_config.method
  if method not in _FIELDS:
    raise ValueError(f"Unknown mask method {method!r}.")
  items = [f"{name}={getattr(mask_config, field):g}"
           for name, (field, _, _) in _FIELDS[method].items()]
  return method + (":" + ",".join(items) if items else "")


def as_mask_config(setting) -> ml_collections.ConfigDict:
  """A mask config from a config (has .method) or a setting string."""
  if hasattr(setting, "method"):
    return parse_mask_setting(mask_setting_string(setting))
  return parse_mask_setting(str(setting))


def is_setting(setting) -> bool:
  """True for a mask config or a setting string, False for a mask key."""
  text = str(setting)
  return hasattr(setting, "method") or ":" in text or text in _FIELDS


def precompute_command(source: str, output_dir: str, settings: Sequence[str],
                       **extra) -> str:
  """The shell command that writes records for `settings` (setting strings).

  extra: further flags (num_shards=16, ...); None / False values are left out.
  """
  flags = [f"--masks={s}" for s in settings] + [
      f"--{k}={v}" for k, v in extra.items()
      if v is not None and v is not False]
  return (f"python -m odin_jax.data.precompute --source={source} "
          f"--output_dir={output_dir} " + " ".join(flags))


RUN_FLAGS = ("seed", "min_side", "max_side", "jpeg_quality", "skip_one_segment",
             "folder_labels")
