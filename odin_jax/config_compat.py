"""Configs of older checkpoints, read in today's layout; what may differ.

A checkpoint's JSON record holds the config that wrote it. Resuming checks
it against the run's config (`check_compatible`): fields that change what
is computed must agree, the _MUTABLE_FIELDS (logging, saving, layout knobs)
may differ. A checkpoint written by an older odin_jax is first translated
(`translate_config`): a field added since reads as the value that
reproduces what the code did then, a renamed one under its new name, a
removed one is dropped, and method sections switched by '<section>.enabled'
become the section of config.method alone (odin_jax/methods/). Every
translation is logged on restore.
"""

from __future__ import annotations

import json

from absl import logging

from odin_jax import numerics

# Fields that may change between a run and its resumption without
# invalidating the checkpoint (logging, schedules of saving, block mode), and
# (dotted: one field of a section) the memory/profiling knobs, which change
# how the same computation is laid out, not what it computes: a run resumed
# on a bigger slice may turn FSDP or remat off, and may profile other steps.
_MUTABLE_FIELDS = ("log_every_steps", "checkpoint_every_steps", "max_to_keep",
                   "restore_step", "init_from", "block_every_step",
                   "total_steps", "num_epochs", "eval", "profile", "sharding",
                   "model.remat", "health", "mask_pictures_every_steps",
                   "dataset.max_bad_fraction")

# Config translation: checkpoints written before a field existed (or under
# an older name) are read as if their config held the value that reproduces
# what the code did then, so that they resume. A field added later is
# listed with that value; a renamed one with its new name and a function of
# the old value. Changes here are logged on restore.
_ADDED_FIELDS = {   # (a field of a section only where the section is)
    "warmup_fraction": 0.0,           # warm-up was warmup_epochs only
    "loss.mask_sampling": "shared",   # both views pooled the same ids
    "r2o.cluster_view": "spanning",   # R2O clustered the spanning view
}
_RENAMED_FIELDS = {
    # 'this device only' was loss.local_negatives=True.
    "loss.local_negatives": ("loss.negatives",
                             lambda v: "device" if v else "global"),
}
# Fields whose removal changes nothing a checkpoint holds.
_REMOVED_FIELDS = ("eval.tfds_image_size",
                   "odin.image_every_steps")   # now mask_pictures_every_steps
# Method sections every config once had, switched by '<section>.enabled';
# config.method now selects the method and only its config has its section
# (odin_jax/methods/). R2O read its view scale from odin.span_scale.
_SWITCHED_SECTIONS = ("odin", "r2o")
_R2O_SPAN_SCALE = ("odin.span_scale", "r2o.span_scale")


def _translate_sections(out: dict, notes: list) -> None:
  """Drops the '<section>.enabled' switches and the sections of methods the
  checkpoint did not train (in place)."""
  if out.get("r2o.enabled") and _R2O_SPAN_SCALE[0] in out:
    out[_R2O_SPAN_SCALE[1]] = out[_R2O_SPAN_SCALE[0]]
    notes.append(f"{_R2O_SPAN_SCALE[0]} -> {_R2O_SPAN_SCALE[1]}="
                 f"{out[_R2O_SPAN_SCALE[1]]!r} (R2O's own section)")
  for section in _SWITCHED_SECTIONS:
    switch = f"{section}.enabled"
    if switch not in out:
      continue
    if out.pop(switch):
      notes.append(f"{switch} dropped (config.method={out.get('method')!r} "
                   "selects the method)")
      continue
    fields = [k for k in out if k.startswith(section + ".")]
    for k in fields:
      del out[k]
    notes.append(f"{section}.* dropped ({switch} was False: only the "
                 f"{section} method's config has the section now)")


def translate_config(saved: dict) -> tuple[dict, list[str]]:
  """An old checkpoint's flat config in today's layout, and what changed.

  Args:
    saved: the checkpoint's config, flattened ({'loss.negatives': ...}).
  Returns:
    (translated flat config, one line per translated field).
  """
  out, notes = dict(saved), []
  _translate_sections(out, notes)
  for old, (new, convert) in _RENAMED_FIELDS.items():
    if old in out:
      value = out.pop(old)
      if value is not None and new not in saved:
        out[new] = convert(value)
        notes.append(f"{old}={value!r} -> {new}={out[new]!r}")
  for field in _REMOVED_FIELDS:
    if out.pop(field, None) is not None:
      notes.append(f"{field} dropped (no longer a setting)")
  for field, legacy in _ADDED_FIELDS.items():
    section = field.rsplit(".", 1)[0] if "." in field else ""
    if section and not any(k.startswith(section + ".") for k in out):
      continue   # a method section this config does not have
    if field not in out:
      out[field] = legacy
      notes.append(f"{field} absent: read as {legacy!r}, the behaviour of "
                   "the code that wrote it")
  return out, notes


def check_compatible(meta: dict, config, directory) -> None:
  saved, notes = translate_config(
      numerics.flatten_config(json.loads(meta["config"])))
  now = numerics.flatten_config(json.loads(config.to_json()))
  if now.get("loss.local_negatives", 0) is None:   # today's placeholder
    now.pop("loss.local_negatives")
  diffs = [k for k in sorted(set(saved) | set(now))
           if not is_mutable(k) and saved.get(k) != now.get(k)]
  if diffs:
    shown = ", ".join(f"{k}: checkpoint {saved.get(k, '(absent)')!r}, now "
                      f"{now.get(k, '(absent)')!r}" for k in diffs[:8])
    raise ValueError(
        f"The checkpoint in {directory} was written with a different config "
        f"(fields {diffs} differ; {shown}). Use a new --workdir for a new "
        "experiment, or pass the original config to resume (e.g. "
        f"--config.{diffs[0]}={saved.get(diffs[0])!r}).")
  if notes:
    logging.info("Checkpoint in %s written by an older odin_jax; its config "
                 "was translated: %s.", directory, "; ".join(notes))


def is_mutable(name: str) -> bool:
  """True if `name` or a section containing it is in _MUTABLE_FIELDS."""
  parts = name.split(".")
  return any(".".join(parts[:i]) in _MUTABLE_FIELDS
             for i in range(1, len(parts) + 1))
