"""The final report of a demo run (odin_jax/evaluate/report.py).

One tiny training run (the `:test` preset, 2 steps, the report switched
on): its rows are checked against direct `runner.evaluate` calls on the
checkpoint, the random init and the FH masks; a second report reads the
cached baselines instead of recomputing them.
"""
import json
import os

import pytest

from configs import byol, detcon_b, detcon_s, hiergroup, odin, r2o, simclr
from odin_jax import train
from odin_jax.evaluate import report, runner
from odin_jax.evaluate import settings as settings_lib


def test_verdict_sentence_follows_the_numbers():
  improved = report.verdict(0.31, 0.27, 0.553)
  assert improved == ("Training improved object discovery: ABO^i 0.27 → "
                      "0.31 (+4.0 points over random init; FH masks: 0.55).")
  worse = report.verdict(0.25, 0.27, 0.553)
  assert worse.startswith("Training did not improve object discovery: ")
  assert "-2.0 points over random init: worse" in worse
  # Within ±SAME_POINTS (1 point): about the same, i.e. not improved.
  same = report.verdict(0.2790, 0.27)
  assert same.startswith("Training did not improve")
  assert "+0.9 points" in same and "about the same" in same
  assert "FH" not in same
  assert report.verdict(0.2811, 0.27).startswith("Training improved")


def test_demo_presets_turn_the_report_on():
  for module in (detcon_b, detcon_s, byol, simclr, odin, r2o, hiergroup):
    assert module.get_config("demo").eval.final_report, module.__name__
    assert not module.get_config("test").eval.final_report, module.__name__
  assert not detcon_b.get_config().eval.final_report


def test_cache_key_follows_what_the_number_depends_on():
  config = detcon_b.get_config("test")
  settings = settings_lib.settings_from_config(config)
  key = report.baseline_key(config, settings, "random")
  fh = report.baseline_key(config, settings, "masks:fh")
  longer = detcon_b.get_config("test")
  longer.total_steps = 400    # training-only: the same entry
  assert report.baseline_key(longer, settings, "random") == key
  other = detcon_b.get_config("test")
  other.seed = 1              # another initialisation, the same FH masks
  assert report.baseline_key(other, settings, "random") != key
  assert report.baseline_key(other, settings, "masks:fh") == fh
  more = settings_lib.settings_from_config(config, num_images=8)
  assert report.baseline_key(config, more, "masks:fh") != fh


def _rows(result: dict) -> dict:
  return {row["network"].split(",")[0]: row for row in result["rows"]}


def _columns(metrics: dict) -> dict:
  return {name: metrics[f"discovery/{name}"] for name, _ in report.COLUMNS}


def test_final_report_after_training(tmp_path, monkeypatch, capsys):
  config = detcon_b.get_config("test")
  # As test_evaluate's periodic-eval test: the same compiled step.
  config.total_steps, config.eval.every_steps = 2, 2
  config.eval.final_report = True
  config.eval.report_cache_dir = str(tmp_path / "cache")
  workdir = tmp_path / "run"
  state = train.train_and_evaluate(config, str(workdir))

  with open(workdir / "eval" / "final_report.json", encoding="utf-8") as f:
    first = json.load(f)
  rows = _rows(first)
  assert list(rows) == ["online θ", "EMA target ξ",
                        "same network at random init", "FH masks"]
  assert "(the evaluated network)" in first["rows"][0]["network"]
  assert first["cached"] == {"random": False, "masks:fh": False}
  text = (workdir / "eval" / "final_report.txt").read_text(encoding="utf-8")
  assert first["sentence"] in text and "ABO^i" in text

  # Independent evaluations, in another workdir, of the same networks.
  other = str(tmp_path / "direct")
  which = ("discovery",)
  trained = runner.evaluate(config, str(workdir), which=which)   # checkpoint θ
  random = runner.evaluate(config, other, source="random", which=which)
  fh = runner.evaluate(config, other, source="masks:fh", which=which)
  target = runner.evaluate(config, str(workdir), which=which,
                           params_key="target_params")
  for label, direct in (("online θ", trained), ("EMA target ξ", target),
                        ("same network at random init", random),
                        ("FH masks", fh)):
    row = {k: v for k, v in rows[label].items() if k != "network"}
    assert row == pytest.approx(_columns(direct)), label
  assert first["sentence"] == report.verdict(
      trained["discovery/abo_instance"], random["discovery/abo_instance"],
      fh["discovery/abo_instance"])

  # A second report (a rerun) reads both baselines from the cache.
  files = first["cache_files"]
  mtimes = {k: os.stat(p).st_mtime_ns for k, p in files.items()}
  sources = []
  evaluate = runner.evaluate

  def recorded(*args, **kwargs):
    sources.append(kwargs.get("source", "checkpoint"))
    return evaluate(*args, **kwargs)

  monkeypatch.setattr(runner, "evaluate", recorded)
  second = report.final_report(config, str(workdir), state)
  assert second["cached"] == {"random": True, "masks:fh": True}
  assert "random" not in sources and "masks:fh" not in sources, sources
  assert {k: os.stat(p).st_mtime_ns for k, p in files.items()} == mtimes
  assert second["rows"] == first["rows"]
  assert second["sentence"] == first["sentence"]

  # Rerunning the finished run prints the saved report, evaluating nothing.
  sources.clear()
  capsys.readouterr()
  train.train_and_evaluate(config, str(workdir))
  assert sources == []
  assert first["sentence"] in capsys.readouterr().out
