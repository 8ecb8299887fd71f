"""The final report of a run: did training help object discovery?

A number alone (ABO^i 0.27 after 200 demo steps) says nothing about whether
training helped: the same network at random initialisation may score about
as much, and the FH masks DetCon trains on may score twice as much. When
config.eval.final_report is set (the `:demo` presets), `train_and_evaluate`
calls `final_report` after its last step; it prints one small table and one
sentence, e.g.

  Object discovery on 32 held-out demo scenes (feature stage3 at 256 px, ...):
    network                                          ABO^i  ABO^c   OR^i   OR^c
    online θ, step 200 (the evaluated network)       0.348  0.345  0.144  0.115
    EMA target ξ, step 200 (extra row)               0.340  0.339  0.160  0.138
    same network at random init, seed 0 (extra row)  0.265  0.266  0.008  0.016
    FH masks, no network (extra row)                 0.553  0.472  0.588  0.401
  Training improved object discovery: ABO^i 0.27 → 0.35 (+8.3 points over
  random init; FH masks: 0.55).

(`configs/detcon_b.py:demo`, seed 0; the numbers of one seed move by several
points) and writes it to workdir/eval/final_report.{json,txt}.

Which network. DetCon §3 keeps "only the feature extractor f_θ" for
downstream tasks (projection / prediction heads and EMA discarded), and Odin
§3 ("we discard the target and object discovery networks, and use only the
online object representation network for evaluation"): the verdict is the
online θ's. The EMA target ξ (methods with one) is an extra row, never the
verdict, however much better it scores on the demo.

Baselines. The random-init network (`runner.evaluate(source='random')`:
exactly the initialisation a run with config.seed starts from) and the FH
masks (`source='masks:fh'`) do not depend on training, so each is evaluated
once and cached as JSON under eval.report_cache_dir (default
~/.cache/odin_jax/eval_baselines) with a key hashing everything the number
depends on (`baseline_key`); a rerun or resume reads the cache.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os

import jax
from absl import logging
from etils import epath

from odin_jax import checkpoint
from odin_jax.evaluate import features
from odin_jax.evaluate import runner
from odin_jax.evaluate import settings as settings_lib

# |trained - random| ABO^i below this many points (of 100) is "about the
# same": demo seeds alone move the gain by several points (README).
SAME_POINTS = 1.0
# Columns: (metric name without the 'discovery/' prefix, header).
COLUMNS = (("abo_instance", "ABO^i"), ("abo_class", "ABO^c"),
           ("or_instance", "OR^i"), ("or_class", "OR^c"))
# EvalSettings fields the discovery numbers depend on (cache key).
_DISCOVERY_SETTINGS = ("feature", "resnet_feature", "image_size", "batch_size",
                       "seed", "demo_seed", "num_images", "discovery_ks")
_CACHE_VERSION = 1   # bump when the discovery evaluation's numbers change


def default_cache_dir() -> str:
  """~/.cache/odin_jax/eval_baselines (eval.report_cache_dir = '')."""
  return os.path.join(os.path.expanduser("~"), ".cache", "odin_jax",
                      "eval_baselines")


def baseline_key(config, settings: settings_lib.EvalSettings,
                 source: str) -> str:
  """A hex key of everything `source`'s discovery numbers depend on.

  Scenes and masks: config.dataset, config.masks and the discovery
  settings. The random network additionally: config.method, config.seed,
  config.model, config.loss and config.image_size (what
  `features.init_params` builds it from). Training-only fields (steps,
  learning rate, ...) are left out, so every run of one architecture and
  seed shares one entry.
  """
  parts = {"version": _CACHE_VERSION, "source": source,
           "dataset": config.dataset.to_dict(),
           "masks": config.masks.to_dict(),
           "settings": {k: getattr(settings, k) for k in _DISCOVERY_SETTINGS}}
  if source == "random":
    parts.update(method=config.method, seed=config.seed,
                 image_size=config.image_size, model=config.model.to_dict(),
                 loss=config.loss.to_dict())
  text = json.dumps(parts, sort_keys=True, default=str)
  return hashlib.sha256(text.encode("utf-8")).hexdigest()[:20]


def cached_baseline(config, workdir: str,
                    settings: settings_lib.EvalSettings,
                    source: str) -> tuple[dict, bool, str]:
  """Discovery metrics of `source` ('random' or 'masks:fh'), cached.

  Returns (metrics {'discovery/...': float}, cached: True when read from
  the cache, the cache file's path). A miss runs `runner.evaluate` (which
  also writes workdir/eval/results_<source>.json) and stores its metrics.
  """
  cache_dir = settings.report_cache_dir or default_cache_dir()
  path = epath.Path(cache_dir) / f"{source.replace(':', '_')}_" \
      f"{baseline_key(config, settings, source)}.json"
  if path.exists():
    try:
      return json.loads(path.read_text(encoding="utf-8"))["metrics"], True, \
          str(path)
    except (OSError, ValueError, KeyError):
      logging.warning("Recomputing the unreadable cached baseline %s.", path)
  metrics = runner.evaluate(config, workdir, source=source,
                            which=("discovery",), settings=settings,
                            log_table=False)
  metrics = {k: v for k, v in metrics.items() if k.startswith("discovery/")}
  if jax.process_index() == 0:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")   # never a half-written entry
    tmp.write_text(json.dumps({"source": source, "metrics": metrics},
                              indent=1), encoding="utf-8")
    tmp.replace(path)
  return metrics, False, str(path)


def verdict(trained: float, random: float, fh: float | None = None) -> str:
  """One sentence: did training improve ABO^i over the random init?

  'improved' when the gain is at least SAME_POINTS ABO points (of 100),
  otherwise 'did not improve' (saying "about the same" when the gain is
  within ±SAME_POINTS, "worse" below it). Values are ABO^i in [0, 1].
  """
  # Decided on the gain as printed (0.1 point), so words and number agree.
  gain = round(100.0 * (trained - random), 1)
  numbers = f"ABO^i {random:.2f} → {trained:.2f} ({gain:+.1f} points over " \
      "random init"
  if abs(gain) < SAME_POINTS:
    numbers += f", within ±{SAME_POINTS:.0f} point: about the same"
  elif gain < 0:
    numbers += ": worse"
  numbers += f"; FH masks: {fh:.2f})" if fh is not None else ")"
  if gain >= SAME_POINTS:
    return f"Training improved object discovery: {numbers}."
  return f"Training did not improve object discovery: {numbers}."


def _row(label: str, metrics: dict, prefix: str = "discovery") -> dict:
  return {"network": label,
          **{name: metrics.get(f"{prefix}/{name}") for name, _ in COLUMNS}}


def format_report(report: dict) -> str:
  """The report dict (`final_report`'s) as the console / .txt text."""
  width = max(len(r["network"]) for r in report["rows"])
  lines = [report["title"],
           f"  {'network':<{width}}  " + "  ".join(
               f"{h:>6}" for _, h in COLUMNS)]
  for r in report["rows"]:
    cells = ("   n/a" if r[n] is None else f"{r[n]:6.3f}" for n, _ in COLUMNS)
    lines.append(f"  {r['network']:<{width}}  " + "  ".join(cells))
  lines.append(report["sentence"])
  return "\n".join(lines)


def _online_metrics(config, workdir, settings, state, step) -> dict:
  """θ's discovery metrics: those the final periodic evaluation just wrote
  (results_step_<step>.json with the same settings), else evaluated now."""
  path = epath.Path(runner.results_path(workdir, f"step_{step}"))
  if path.exists():
    record = json.loads(path.read_text(encoding="utf-8"))
    same = all(json.dumps(record.get("settings", {}).get(k)) ==
               json.dumps(list(v) if isinstance(v, tuple) else v)
               for k, v in dataclasses.asdict(settings).items()
               if k in _DISCOVERY_SETTINGS)
    if same and record["metrics"].get("discovery/abo_instance") is not None:
      return record["metrics"]
  return runner.evaluate(config, workdir, params=state.params,
                         batch_stats=state.batch_stats, step=step,
                         which=("discovery",), settings=settings,
                         log_table=False)


def _saved_report(workdir: str, step: int) -> dict | None:
  """workdir/eval/final_report.json if it exists and is of `step`."""
  path = checkpoint.as_path(workdir) / "eval" / "final_report.json"
  try:
    saved = json.loads(path.read_text(encoding="utf-8"))
  except (OSError, ValueError):
    return None
  return saved if saved.get("step") == step else None


def final_report(config, workdir: str, state, reuse_saved: bool = False
                 ) -> dict:
  """Evaluates θ (and ξ) of `state` against the cached baselines.

  Args:
    config: the run's config (network, config.eval settings).
    workdir: the run's workdir; writes workdir/eval/final_report.{json,txt}.
    state: the final TrainState (params, batch_stats, target_params, step).
    reuse_saved: print the saved report of this step, if there is one,
      instead of evaluating again (a rerun of a finished demo).
  Returns:
    {'title', 'rows': [{'network', 'abo_instance', ...}], 'sentence',
     'gain_points', 'cached': {'random': bool, 'masks:fh': bool},
     'cache_files': {...}, 'step'}.
  """
  settings = settings_lib.settings_from_config(config)
  step = int(jax.device_get(state.step))
  saved = _saved_report(workdir, step) if reuse_saved else None
  if saved is not None:
    if jax.process_index() == 0:
      print(format_report(saved), flush=True)
    return saved
  online = _online_metrics(config, workdir, settings, state, step)
  rows = [_row(f"online θ, step {step} (the evaluated network)", online)]
  if jax.tree.leaves(state.target_params):
    target = runner.evaluate(config, workdir, params=state.target_params,
                             batch_stats=state.batch_stats, step=step,
                             params_key="target_params", which=("discovery",),
                             settings=settings, log_table=False)
    rows.append(_row(f"EMA target ξ, step {step} (extra row)", target))
  random, random_cached, random_file = cached_baseline(
      config, workdir, settings, "random")
  rows.append(_row(f"same network at random init, seed {config.seed} "
                   "(extra row)", random))
  fh, fh_cached, fh_file = cached_baseline(config, workdir, settings,
                                           "masks:fh")
  rows.append(_row("FH masks, no network (extra row)", fh))
  feature = (features.default_feature(config, settings.resnet_feature)
             if settings.feature == "auto" else settings.feature)
  report = {
      "title": f"Object discovery on {settings.num_images} held-out demo "
               f"scenes (feature {feature} at {settings.image_size} px, "
               f"k-means K = {', '.join(map(str, settings.discovery_ks))}):",
      "rows": rows,
      "sentence": verdict(online["discovery/abo_instance"],
                          random["discovery/abo_instance"],
                          fh["discovery/abo_instance"]),
      "gain_points": 100.0 * (online["discovery/abo_instance"] -
                              random["discovery/abo_instance"]),
      "cached": {"random": random_cached, "masks:fh": fh_cached},
      "cache_files": {"random": random_file, "masks:fh": fh_file},
      "step": step,
  }
  text = format_report(report)
  if jax.process_index() == 0:
    print(text, flush=True)   # stdout: the last thing a demo user sees
    out = checkpoint.as_path(workdir) / "eval"
    out.mkdir(parents=True, exist_ok=True)
    (out / "final_report.json").write_text(
        json.dumps(report, indent=1, ensure_ascii=False), encoding="utf-8")
    (out / "final_report.txt").write_text(text + "\n", encoding="utf-8")
    logging.info("Wrote %s/final_report.{json,txt}.", out)
  return report
