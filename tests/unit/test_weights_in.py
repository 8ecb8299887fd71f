"""Weights in (odin_jax/export/weights_in.py), without torch.

Files with torchvision / timm names are written here from the export's own
converters and safetensors.numpy; tests/unit/test_weights_in_torch.py checks the
same tables against real torchvision and timm models.
"""

from __future__ import annotations

import dataclasses
import json
import os

import jax
import numpy as np
import optax
import pytest
from flax import traverse_util
from safetensors import numpy as st_numpy

from configs import byol, odin
from odin_jax import checkpoint, config_check, config_compat, step, train
from odin_jax.evaluate import features
from odin_jax.evaluate import runner
from odin_jax.export import convert, weights_in, writer
from odin_jax.models import network, swin, vit


def _random_backbone(config, seed=0) -> dict:
  """{flat Flax name: random float32} for config's backbone (no compute)."""
  shapes = features._abstract_variables(  # pylint: disable=protected-access
      config)
  tree = {"params": shapes["params"]["backbone"],
          "batch_stats": shapes["batch_stats"].get("backbone", {})}
  rng = np.random.default_rng(seed)
  return {k: rng.standard_normal(v.shape).astype(np.float32)
          for k, v in traverse_util.flatten_dict(
              {k: v for k, v in tree.items() if v}, sep="/").items()}


def _expected(flat):
  """A flat dict as the nested {'params', 'batch_stats'} load_backbone takes."""
  tree = traverse_util.unflatten_dict(flat, sep="/")
  return {"params": tree["params"], "batch_stats": tree.get("batch_stats", {})}


def _equal(a: dict, b: dict) -> None:
  assert sorted(a) == sorted(b)
  for k in a:
    assert a[k].dtype == b[k].dtype and np.array_equal(a[k], b[k]), k


@pytest.fixture(scope="module")
def resnet_config():
  return byol.get_config("test")     # ResNet-18 x0.125, 80 px


# --- Tables -----------------------------------------------------------------


@pytest.mark.parametrize("name", ["vit", "swin"])
def test_tables_write_what_the_models_document(name):
  """convert's table export == vit / swin.timm_state_dict, key for key."""
  config = byol.get_config(f"{name}_test")
  params = traverse_util.unflatten_dict(
      {k[len("params/"):]: v for k, v in _random_backbone(config).items()},
      sep="/")
  module = {"vit": vit, "swin": swin}[name]
  want, got = module.timm_state_dict(params), convert.timm_state_dict(name,
                                                                      params)
  assert list(got) == list(want)
  _equal(got, want)


def test_config_check_knows_the_suffixes(tmp_path):
  assert config_check.INIT_FROM_SUFFIXES == weights_in.FILE_SUFFIXES
  config = byol.get_config("test")
  config.init_from = str(tmp_path / "missing.pth")
  with pytest.raises(config_check.ConfigError, match="no such file"):
    config_check.validate(config)
  (tmp_path / "w.onnx").write_bytes(b"")
  config.init_from = str(tmp_path / "w.onnx")
  with pytest.raises(config_check.ConfigError, match="unknown checkpoint"):
    config_check.validate(config)
  config.init_from = str(tmp_path)   # a workdir
  config_check.validate(config)


# --- Round trips --------------------------------------------------------------


def test_torchvision_names_round_trip(resnet_config, tmp_path):
  flat = _random_backbone(resnet_config)
  state_dict = convert.torchvision_state_dict(
      traverse_util.unflatten_dict(flat, sep="/"), 18, 5)
  on_disk = {**state_dict, "fc.weight": np.ones((10, 64), np.float32),
             "fc.bias": np.zeros(10, np.float32)}
  for path in (tmp_path / "r18.safetensors", tmp_path / "r18.npz"):
    if path.suffix == ".npz":
      np.savez(path, **on_disk)
    else:
      st_numpy.save_file(on_disk, str(path))
    loaded, info = weights_in.load_backbone(str(path), resnet_config,
                                            _expected(flat))
    _equal(loaded, flat)
    assert info["format"] == "torchvision" and info["loaded"] == len(flat)
    assert "fc.weight" in info["ignored"] and not info["kept_at_init"]
    # ... and back: the export gives the file's state_dict bit for bit.
    _equal(convert.torchvision_state_dict(
        traverse_util.unflatten_dict(loaded, sep="/"), 18, 5), state_dict)


@pytest.mark.parametrize("name", ["vit", "swin"])
def test_timm_names_round_trip(name, tmp_path):
  config = byol.get_config(f"{name}_test")
  flat = _random_backbone(config)
  params = traverse_util.unflatten_dict(
      {k[len("params/"):]: v for k, v in flat.items()}, sep="/")
  state_dict = convert.timm_state_dict(name, params)
  path = tmp_path / f"{name}.safetensors"
  st_numpy.save_file({**state_dict, "head.weight": np.zeros((3, 2),
                                                            np.float32)},
                     str(path))
  loaded, info = weights_in.load_backbone(str(path), config, _expected(flat))
  kept = info["kept_at_init"]
  if name == "swin":   # our stage1-3 output norms: not in timm's model
    assert sorted(kept) == sorted(k for k in flat if k.startswith(
        convert.UNMAPPED["swin"]))
  else:
    assert not kept
  _equal(loaded, {k: v for k, v in flat.items() if k not in kept})
  assert info["ignored"] == ["head.weight"]
  back = convert.timm_state_dict(name, traverse_util.unflatten_dict(
      {k[len("params/"):]: v for k, v in {**flat, **loaded}.items()},
      sep="/"))
  _equal(back, state_dict)


def test_own_npz_round_trip(resnet_config, tmp_path):
  flat = _random_backbone(resnet_config, seed=1)
  # The export's own writer (deterministic npz).
  write_npz = writer._write_npz  # pylint: disable=protected-access
  write_npz(checkpoint.as_path(tmp_path / "backbone.npz"),
            traverse_util.unflatten_dict(flat, sep="/"))
  for path in (tmp_path / "backbone.npz", tmp_path):   # file, export folder
    loaded, info = weights_in.load_backbone(str(path), resnet_config,
                                            _expected(flat))
    assert info["format"] == "odin_jax"
    _equal(loaded, flat)


def test_wrapped_checkpoints_are_unwrapped():
  """{'state_dict': ...} / {'model': ...} wrappers and DDP's 'module.'."""
  a = np.zeros(2, np.float32)
  assert weights_in._unwrap(  # pylint: disable=protected-access
      {"epoch": 3, "state_dict": {"module.conv1.weight": a}}) == {
          "conv1.weight": a}
  flat = {"model": np.ones(1), "conv1.weight": a}   # a key named 'model'
  assert weights_in._unwrap(flat) is flat  # pylint: disable=protected-access


# --- Mismatches ---------------------------------------------------------------


def test_mismatch_names_the_first_keys(resnet_config, tmp_path):
  flat = _random_backbone(resnet_config)
  state_dict = convert.torchvision_state_dict(
      traverse_util.unflatten_dict(flat, sep="/"), 18)
  path = str(tmp_path / "r18.safetensors")
  st_numpy.save_file(state_dict, path)

  deeper = resnet_config.copy_and_resolve_references()
  deeper.model.depth = 34
  with pytest.raises(ValueError, match=r"ResNet-34 x0.125 backbone: missing: "
                     r"layer1\.2\.conv1\.weight.*The checkpoint is a "
                     r"ResNet-18 \(basic blocks \(2, 2, 2, 2\)"):
    weights_in.load_backbone(path, deeper, _expected(
        _random_backbone(deeper)))

  wider = resnet_config.copy_and_resolve_references()
  wider.model.width = 0.25
  with pytest.raises(ValueError, match=r"shape differs: conv1\.weight "
                     r"expected \(16, 3, 7, 7\) found \(8, 3, 7, 7\).*width "
                     r"0\.125"):
    weights_in.load_backbone(path, wider, _expected(_random_backbone(wider)))

  st_numpy.save_file({**state_dict, "layer5.0.conv1.weight": np.zeros(1)},
                     path)
  with pytest.raises(ValueError, match=r"unexpected: layer5\.0\.conv1"):
    weights_in.load_backbone(path, resnet_config, _expected(flat))

  # odin_jax's own names: another config's network.
  npz = tmp_path / "backbone.npz"
  np.savez(npz, **_random_backbone(wider))
  with pytest.raises(ValueError, match=r"\(odin_jax names\).*shape differs: "
                     r"params/stem_conv/kernel expected \(7, 7, 3, 8\) found "
                     r"\(7, 7, 3, 16\)"):
    weights_in.load_backbone(str(npz), resnet_config, _expected(flat))


def test_a_wrong_file_stops_training_before_the_state_is_built(
    resnet_config, tmp_path, monkeypatch):
  # The check runs on step.build's abstract state: the state's init (a
  # compile of a minute on a real network) never starts.
  flat = _random_backbone(resnet_config)
  path = str(tmp_path / "r18.safetensors")
  st_numpy.save_file(convert.torchvision_state_dict(
      traverse_util.unflatten_dict(flat, sep="/"), 18), path)
  config = resnet_config.copy_and_resolve_references()
  config.model.depth, config.init_from, config.total_steps = 34, path, 1
  real_build = step.build

  def build(*args, **kwargs):
    def never(*_):
      raise AssertionError("the train state was built before the check")
    return dataclasses.replace(real_build(*args, **kwargs), init_state=never)

  monkeypatch.setattr(step, "build", build)
  with pytest.raises(ValueError, match=r"ResNet-34 .* missing: layer1\.2"):
    train.train_and_evaluate(config, str(tmp_path / "run"))


# --- Training and evaluation --------------------------------------------------


def test_apply_fills_theta_xi_and_odin_tau(tmp_path):
  """On Odin's real initial state: θ, ξ and τ get the file's backbone, each
  in its own buffer (the step donates the state), heads untouched."""
  config = odin.get_config("test")
  flat = _random_backbone(config, seed=3)
  np.savez(tmp_path / "backbone.npz", **flat)
  config.init_from = str(tmp_path / "backbone.npz")
  model = network.from_config(config)
  init = jax.jit(lambda rng: step.create_train_state(
      config, model, optax.identity(), rng))
  rng = jax.random.PRNGKey(0)
  state = init.lower(rng).compile(compiler_options={   # as init_params
      "xla_backend_optimization_level": 0})(rng)
  out = weights_in.apply(state, config)
  want = {k: v for k, v in flat.items() if k.startswith("params/")}
  kernels = []
  trees = lambda s: {"params": s.params, "target_params": s.target_params,
                     "tau": s.method_state["tau"]}
  for name, tree in trees(out).items():
    before = jax.device_get(trees(state)[name])
    _equal(convert.flatten({"params": jax.device_get(tree)["backbone"]}),
           want)
    _equal(convert.flatten(jax.device_get(tree)["projector"]),
           convert.flatten(before["projector"]))
    kernels.append(tree["backbone"]["stem_conv"]["kernel"])
  assert len({k.addressable_data(0).unsafe_buffer_pointer()
              for k in kernels}) == 3
  assert kernels[0].sharding == state.params["backbone"]["stem_conv"][
      "kernel"].sharding


@pytest.fixture(scope="module")
def started(tmp_path_factory, resnet_config):
  """A 2-step BYOL :test run started from a backbone.npz (the config of
  test_export.py's run: they share the compilation cache). Returns the
  config, the file's arrays, the state init_from produced and the
  workdir."""
  folder = tmp_path_factory.mktemp("weights_in")
  flat = _random_backbone(resnet_config, seed=2)
  flat = {k: (np.abs(v) + 0.5 if k.endswith("/var") else v)
          for k, v in flat.items()}   # a valid BN variance
  np.savez(folder / "backbone.npz", **flat)
  config = resnet_config.copy_and_resolve_references()
  config.total_steps, config.log_every_steps = 2, 1
  config.init_from = str(folder / "backbone.npz")
  seen = []
  apply = weights_in.apply

  def spy(state, cfg):
    out = apply(state, cfg)
    seen.append((jax.device_get(state), jax.device_get(out)))
    return out
  with pytest.MonkeyPatch.context() as patch:
    patch.setattr(weights_in, "apply", spy)
    train.train_and_evaluate(config, str(folder / "run"))
  (before, after), = seen
  return config, flat, before, after, folder


def test_train_starts_from_init_from(started):
  config, flat, before, after, folder = started
  assert int(after.step) == 0
  for name in ("params", "target_params"):   # θ and ξ
    got = convert.flatten({"params": getattr(after, name)["backbone"]})
    _equal(got, {k: v for k, v in flat.items() if k.startswith("params/")})
    # The heads keep their initialisation.
    for head in ("projector", "predictor"):
      _equal(convert.flatten(getattr(after, name)[head]),
             convert.flatten(getattr(before, name)[head]))
  _equal(convert.flatten({"batch_stats": after.batch_stats["backbone"]}),
         {k: v for k, v in flat.items() if k.startswith("batch_stats/")})
  assert not np.array_equal(
      before.params["backbone"]["stem_conv"]["kernel"],
      after.params["backbone"]["stem_conv"]["kernel"])
  # Trained from there, and resuming keeps the run's own checkpoint.
  state, _, step = checkpoint.read(str(folder / "run"))
  assert step == 2
  resumed = after.replace(step=np.int32(2))
  assert weights_in.apply(resumed, config) is resumed
  # A relaunch without (or with another) init_from may resume the run.
  _, meta, _ = checkpoint.read(str(folder / "run"), with_state=False)
  relaunch = config.copy_and_resolve_references()
  relaunch.init_from = ""
  check = config_compat.check_compatible
  check(meta, relaunch, folder)


def test_workdir_round_trip(started):
  config, _, _, _, folder = started
  state, _, _ = checkpoint.read(str(folder / "run"))
  want = convert.flatten({"params": state["params"]["backbone"],
                          "batch_stats": state["batch_stats"]["backbone"]})
  loaded, info = weights_in.load_backbone(str(folder / "run"), config,
                                          _expected(want))
  assert info["format"] == "odin_jax"
  _equal(loaded, want)


def test_evaluate_source_init_from(started):
  config, flat, _, _, folder = started
  source = f"init_from:{folder / 'backbone.npz'}"
  params, batch_stats = weights_in.initial_params(config, source[10:])
  _equal(convert.flatten({"params": params["backbone"],
                          "batch_stats": batch_stats["backbone"]}), flat)
  workdir = str(folder / "eval_only")
  metrics = runner.evaluate(config, workdir, source=source,
                            which="discovery")
  assert metrics and all(k.startswith("discovery/") for k in metrics)
  with open(runner.results_path(workdir, "init_from_backbone.npz")) as f:
    record = json.load(f)
  assert record["source"] == source and record["step"] == 0
  assert os.path.isdir(os.path.join(workdir, "eval"))


def test_evaluate_cli_ends_a_bad_file_with_one_line(tmp_path):
  # Not a traceback as the last word: exit 1, `odin_jax failed: ...` last.
  import subprocess
  import sys
  bad = tmp_path / "bad.safetensors"
  bad.write_bytes(b"not a safetensors file")
  proc = subprocess.run(
      [sys.executable, "-m", "odin_jax.evaluate",
       "--config=configs/byol.py:test", f"--workdir={tmp_path / 'w'}",
       f"--source=init_from:{bad}", "--evals=discovery", "--notensorboard"],
      capture_output=True, text=True, timeout=600, check=False)
  assert proc.returncode == 1
  last = proc.stderr.strip().splitlines()[-1]
  assert last.startswith("odin_jax failed: ") and "Error" in last, last
