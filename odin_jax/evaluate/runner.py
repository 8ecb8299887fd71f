"""Evaluation driver: a checkpoint (or random init, or a mask set) -> metrics.

`evaluate(config, workdir, ...)` builds one `context.Context` (settings,
feature source, writer, results) and runs the registered evaluations named
in `which` (`REGISTRY`: name -> the module whose `run(ctx)` does it), then
writes
  workdir/eval/results_<tag>.json    metrics, info, timings, picture paths
  workdir/eval/<tag>/<picture>.png   e.g. discovery.png
(tag = 'step_<n>' for a checkpoint or in-memory parameters, 'random' for the
random-init network, 'masks_<m>' for a mask set), logs a table, and writes
scalars 'eval/<metric>' and images 'eval/<picture>' to a CLU writer if one
is given (prefix 'eval_<tag>/' for random / mask sources, so baselines never
mix with the run's curve). It is the body of `python -m odin_jax.evaluate`
and what the training loop calls with its in-memory parameters.

Sources
  'checkpoint'  the online network θ of the latest (or a chosen) checkpoint
                in workdir/checkpoints (`features.load_params`; `params_key`
                picks ξ 'target_params' or Odin's τ 'tau').
  'random'      the same network at initialisation (`features.init_params`:
                exactly the state a training run with config.seed starts
                from).
  'masks:fh' | 'masks:slic' | 'masks:grid' | 'masks:hierarchy'  a mask set
                used as proposals (one segmentation per image; the
                features-only evaluations, video / probes, are skipped).
  'masks:gt'    the ground-truth instance maps themselves (background is one
                more segment): perfect proposals, ABO^i = OR = 1. A sanity
                check of the whole pipeline.
  'init_from:PATH'  the network at initialisation with PATH's backbone
                (a torchvision / timm checkpoint, backbone.npz or a workdir:
                odin_jax/export/weights_in.py), untrained.

Evaluations (each module's docstring gives its protocol):
  discovery        abo.py: Odin App. A.4 k-means proposals, ABO / OR
                   (+ FH / SLIC / grid mask sets as proposals).
  instances        instances.py: spectral-clustering instance recall by
                   same-class co-occurrence (AR over IoU 0.5:0.95, R@0.5).
  video            video.py: DINO's label propagation, J / F / J&F.
  linear_probe     probes.py: per-pixel linear probe mIoU.
  knn              knn.py: weighted k-NN of pooled features.
  pictures         pictures.py: image | instances | k-means | feature PCA.
  imagenet_linear  linear.py (opt-in): BYOL's frozen-encoder linear
                   evaluation on a TFDS classification dataset.
Data (datasets.py): held-out demo scenes; COCO val2017, a folder of your
images and DAVIS 2017 when configured (prefixes 'coco/', 'folder/',
'davis/'). Settings: settings.py. Measured resolutions and their results:
docs/evaluation.md.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import time
from typing import Any

import jax
import numpy as np
from absl import logging
from etils import epath

from odin_jax import checkpoint
from odin_jax.evaluate import context as context_lib
from odin_jax.evaluate import datasets
from odin_jax.evaluate import features as features_lib

# The public entry points of the evaluation package, where notebooks,
# export and the CLI have always found them (their homes: datasets.py,
# features.py, settings.py).
from odin_jax.evaluate.datasets import demo_scenes
from odin_jax.evaluate.features import (
    FeatureSource, PARAM_KEYS, default_feature, init_params, load_params,
    restore_checkpoint)
from odin_jax.evaluate.settings import (
    EVALUATIONS, OPT_IN_EVALUATIONS, EvalSettings, parse_overrides,
    settings_from_config)

__all__ = ["evaluate", "format_table", "make_context", "results_path",
           "run_fn", "REGISTRY", "SOURCES", "MASK_METHODS", "demo_scenes",
           "FeatureSource", "PARAM_KEYS", "default_feature", "init_params",
           "load_params", "restore_checkpoint", "EVALUATIONS",
           "OPT_IN_EVALUATIONS", "EvalSettings", "parse_overrides",
           "settings_from_config"]

# name -> the module (odin_jax.evaluate.<module>) whose run(ctx) evaluates
# it; imported on first use, so an opt-in evaluation costs nothing unless
# it runs.
REGISTRY = {"discovery": "abo", "instances": "instances",
            "video": "video", "linear_probe": "probes", "knn": "knn",
            "pictures": "pictures", "imagenet_linear": "linear"}
MASK_METHODS = datasets.MASK_METHODS
SOURCES = ("checkpoint", "random") + tuple(f"masks:{m}" for m in MASK_METHODS)


def run_fn(name: str):
  """The `run(ctx)` of evaluation `name`."""
  module = importlib.import_module(f"odin_jax.evaluate.{REGISTRY[name]}")
  return module.run


def _tag(source: str, step: int | None) -> str:
  if source == "checkpoint":
    return f"step_{int(step or 0)}"
  if source.startswith("init_from:"):   # init_from_<file or folder name>
    name = source.split(":", 1)[1].rstrip("/").rsplit("/", 1)[-1]
    return "init_from_" + "".join(c if c.isalnum() or c in "._-" else "_"
                                  for c in name)
  return source.replace(":", "_")


def format_table(metrics: dict, title: str = "") -> str:
  """Metrics as an aligned two-column text table."""
  width = max([len(k) for k in metrics] + [6])
  lines = [title] if title else []
  lines.append(f"  {'metric':<{width}}  value")
  lines.append(f"  {'-' * width}  ------")
  for name in metrics:
    value = metrics[name]
    lines.append(f"  {name:<{width}}  {value:.4f}"
                 if isinstance(value, float) else f"  {name:<{width}}  "
                 f"{value}")
  return "\n".join(lines)


def _resolve_which(which, settings: EvalSettings) -> tuple:
  if which is None:
    which = settings.evals
  elif isinstance(which, str):
    which = settings.periodic if which == "periodic" else which.split(",")
  which = tuple(w.strip() for w in which if w.strip())
  unknown = [w for w in which if w not in REGISTRY]
  if unknown:
    raise ValueError(f"Unknown evaluations {unknown}; choose from "
                     f"{EVALUATIONS + OPT_IN_EVALUATIONS} (or 'periodic').")
  return which


def _network(config, workdir, params, batch_stats, step, source,
             params_key):
  """(params, batch_stats, step) of the source (params None: a mask set)."""
  if params is not None:
    if source != "checkpoint":
      raise ValueError("in-memory params are evaluated as source="
                       "'checkpoint' (their step names the results)")
    if batch_stats is None:
      raise ValueError("pass batch_stats with params")
    return params, batch_stats, int(step or 0)
  if source == "checkpoint":
    return features_lib.load_params(config, workdir, step, params_key)
  if source == "random":
    return (*features_lib.init_params(config), 0)
  if source.startswith("init_from:"):   # imported weights, untrained
    from odin_jax.export import weights_in
    return (*weights_in.initial_params(config, source.split(":", 1)[1]), 0)
  return None, None, 0


def make_context(config, settings: EvalSettings, params, batch_stats,
                 source: str, writer=None) -> context_lib.Context:
  """The Context of one evaluation call (features None for a mask set)."""
  features = None
  if params is not None:
    features = features_lib.FeatureSource(
        config, params, batch_stats, settings.feature, settings.image_size,
        settings.batch_size, settings.resnet_feature)
  mask_method = source.split(":", 1)[1] if source.startswith("masks:") \
      else None
  return context_lib.Context(config, settings, features, mask_method,
                             writer=writer)


def evaluate(config, workdir: str, *, params=None, batch_stats=None,
             step: int | None = None, which=None, source: str = "checkpoint",
             params_key: str = "params", writer=None,
             settings: EvalSettings | None = None,
             overrides: dict | None = None, log_table: bool = True) -> dict:
  """Runs evaluations and writes their results (see the module docstring).

  Args:
    config: the run's config (network in config.model, settings in
      config.eval).
    workdir: the run's workdir; results go to workdir/eval.
    params, batch_stats: in-memory network variables (the training loop's
      state.params / state.batch_stats); then `source` must be
      'checkpoint' and `step` names the results.
    step: checkpoint step to load (None = latest), or the step of `params`.
    which: evaluation names, a comma-separated string, 'periodic'
      (settings.periodic) or None (settings.evals).
    source: one of SOURCES.
    params_key: which parameters of the checkpoint ('params' = θ).
    writer: optional CLU MetricWriter (scalars and images).
    settings: EvalSettings (default: from config.eval and `overrides`).
    overrides: {field: value} applied over config.eval.
    log_table: log the metrics table (the command line prints it instead).
  Returns:
    {metric name: float} of every evaluation that ran (NaN where a metric
    has no data).
  """
  settings = settings or settings_from_config(config, **(overrides or {}))
  which = _resolve_which(which, settings)
  settings = dataclasses.replace(settings, evals=which)
  if source not in SOURCES and not source.startswith("init_from:"):
    raise ValueError(f"source must be one of {SOURCES} or init_from:PATH, "
                     f"got {source!r}")
  if settings.folder_discovery:  # a bad mask stops before any compute
    from odin_jax.evaluate import folder
    folder.check_folder(settings.folder_discovery,
                        settings.folder_num_images,
                        settings.folder_mask_encoding)
  params, batch_stats, step = _network(config, workdir, params, batch_stats,
                                       step, source, params_key)
  tag = _tag(source, step)
  if source == "checkpoint" and params_key != "params":
    tag += f"_{params_key}"
  ctx = make_context(config, settings, params, batch_stats, source, writer)

  info, images, timings = {}, {}, {}
  for name in which:
    start = time.time()
    out = run_fn(name)(ctx)
    timings[name] = round(time.time() - start, 3)
    if out is None:
      info[f"{name}/skipped"] = f"source {source} has no features"
      continue
    ctx.results.update(out.metrics)
    info.update(out.info)
    images.update(out.pictures)
    logging.info("Evaluation %s (%s) took %.1fs.", name, tag, timings[name])
  metrics = ctx.results

  title = (f"Evaluation of {source}"
           f"{' (' + params_key + ')' if params_key != 'params' else ''} "
           f"at step {step} ({workdir})")
  if log_table:
    logging.info("\n%s", format_table(metrics, title))
  paths = _write_outputs(workdir, tag, source, step, params_key, settings,
                         metrics, info, images, timings)
  if writer is not None:
    prefix = "eval" if source == "checkpoint" else f"eval_{tag}"
    writer.write_scalars(step, {f"{prefix}/{k}": v
                                for k, v in metrics.items()})
    if images:
      writer.write_images(step, {f"{prefix}/{k}": v[None]
                                 for k, v in images.items()})
    writer.flush()
  logging.info("Wrote %s.", ", ".join(paths))
  return metrics


def results_path(workdir: str, tag: str) -> str:
  """workdir/eval/results_<tag>.json (workdir a local path or a URL)."""
  return str(checkpoint.as_path(workdir) / "eval" / f"results_{tag}.json")


def _write_outputs(workdir, tag, source, step, params_key, settings, metrics,
                   info, images, timings) -> list:
  """Writes the PNGs and (merged with an earlier file) the JSON."""
  if jax.process_index() != 0:
    return []
  from odin_jax.evaluate import pictures
  # epath, not os: a gs:// workdir is written where its checkpoints are.
  out_dir = checkpoint.as_path(workdir) / "eval" / tag
  paths = {}
  for name, image in images.items():
    path = str(out_dir / f"{name}.png")
    pictures.save_png(path, image)
    paths[name] = path
  json_path = epath.Path(results_path(workdir, tag))
  record = {"metrics": {}, "info": {}, "pictures": {}, "seconds": {}}
  if json_path.exists():
    try:
      record.update(json.loads(json_path.read_text(encoding="utf-8")))
    except (OSError, ValueError):
      logging.warning("Overwriting unreadable %s.", json_path)
  record.update({"source": source, "step": int(step), "params": params_key,
                 "settings": dataclasses.asdict(settings)})
  record["metrics"].update({k: context_lib.json_float(v)
                            for k, v in metrics.items()})
  record["info"].update(info)
  record["pictures"].update(paths)
  record["seconds"].update(timings)
  json_path.parent.mkdir(parents=True, exist_ok=True)
  tmp = json_path.with_name(json_path.name + ".tmp")
  tmp.write_text(json.dumps(record, indent=1, sort_keys=True,
                            default=_to_json), encoding="utf-8")
  tmp.replace(json_path)
  return [str(json_path)] + list(paths.values())


def _to_json(value: Any):
  if isinstance(value, np.generic):
    return value.item()
  if isinstance(value, np.ndarray):
    return value.tolist()
  return str(value)
