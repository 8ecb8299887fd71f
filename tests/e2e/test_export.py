"""Backbone export: the torchvision weights reproduce the Flax backbone.

The reference forward pass below is written from torchvision's ResNet
definition (NCHW, OIHW kernels, stride on the bottleneck's 3x3, max-pool
padded with -inf, BatchNorm with running statistics) in float64 NumPy and
reads nothing but the exported state_dict: it shares no code with
odin_jax.models.resnet. Random BatchNorm statistics and affine parameters
make any BN mapping mistake visible.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util
from numpy.lib.stride_tricks import sliding_window_view

from configs import byol
from odin_jax import export as export_lib
from odin_jax import train
from odin_jax.evaluate import runner
from odin_jax.export import writer
from odin_jax.models import resnet

# torchvision: depth -> (bottleneck?, blocks per layer). Written out here
# rather than read from odin_jax so the reference stays independent.
_TORCHVISION_LAYERS = {18: (False, (2, 2, 2, 2)), 50: (True, (3, 4, 6, 3))}
_MEAN = np.array([0.485, 0.456, 0.406])
_STD = np.array([0.229, 0.224, 0.225])


# --- An independent torchvision forward pass ------------------------------


class _TorchvisionResNet:
  """torchvision.models.resnet's forward (eval mode) over a state_dict."""

  def __init__(self, state_dict, depth):
    self.sd = state_dict
    self.bottleneck, self.layers = _TORCHVISION_LAYERS[depth]
    self.used = set()

  def weight(self, name):
    self.used.add(name)
    return self.sd[name].astype(np.float64)

  def conv(self, x, name, stride=1, padding=0):
    """x [N, C, H, W], weight [O, C, kh, kw] -> [N, O, H', W']."""
    w = self.weight(f"{name}.weight")
    x = np.pad(x, ((0, 0), (0, 0), (padding, padding), (padding, padding)))
    windows = sliding_window_view(x, w.shape[2:], axis=(2, 3))
    windows = windows[:, :, ::stride, ::stride]     # [N, C, H', W', kh, kw]
    return np.einsum("nchwij,ocij->nohw", windows, w, optimize=True)

  def bn(self, x, name):
    count = self.sd[f"{name}.num_batches_tracked"]
    assert count.dtype == np.int64 and count.shape == ()
    self.used.add(f"{name}.num_batches_tracked")
    get = lambda k: self.weight(f"{name}.{k}")[None, :, None, None]
    return ((x - get("running_mean")) / np.sqrt(get("running_var") + 1e-5)
            * get("weight") + get("bias"))

  @staticmethod
  def max_pool(x):   # MaxPool2d(3, stride=2, padding=1): pads with -inf
    x = np.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1)), constant_values=-np.inf)
    return sliding_window_view(x, (3, 3), axis=(2, 3))[
        :, :, ::2, ::2].max(axis=(-2, -1))

  def block(self, x, prefix, stride):
    relu = lambda v: np.maximum(v, 0)
    if self.bottleneck:
      out = relu(self.bn(self.conv(x, f"{prefix}.conv1"), f"{prefix}.bn1"))
      out = relu(self.bn(self.conv(out, f"{prefix}.conv2", stride, 1),
                         f"{prefix}.bn2"))
      out = self.bn(self.conv(out, f"{prefix}.conv3"), f"{prefix}.bn3")
    else:
      out = relu(self.bn(self.conv(x, f"{prefix}.conv1", stride, 1),
                         f"{prefix}.bn1"))
      out = self.bn(self.conv(out, f"{prefix}.conv2", 1, 1), f"{prefix}.bn2")
    # torchvision builds a downsample iff stride != 1 or channels change.
    needs_downsample = stride != 1 or x.shape[1] != out.shape[1]
    assert needs_downsample == (f"{prefix}.downsample.0.weight" in self.sd)
    identity = x
    if needs_downsample:
      identity = self.bn(self.conv(x, f"{prefix}.downsample.0", stride),
                         f"{prefix}.downsample.1")
    return relu(out + identity)

  def __call__(self, images):
    """images [N, H, W, 3] in [0, 1] -> {'stem', 'stage1'..'stage4'} NCHW."""
    x = ((images.astype(np.float64) - _MEAN) / _STD).transpose(0, 3, 1, 2)
    x = np.maximum(self.bn(self.conv(x, "conv1", 2, 3), "bn1"), 0)
    feats = {"stem": self.max_pool(x)}
    x = feats["stem"]
    for i, blocks in enumerate(self.layers, 1):
      for j in range(blocks):
        x = self.block(x, f"layer{i}.{j}", 2 if i > 1 and j == 0 else 1)
      feats[f"stage{i}"] = x
    return feats


def _random_variables(depth, width, images, seed=0, calibrate=True):
  """Backbone variables: random weights and BN affine parameters, and
  running statistics = the true statistics of `images` perturbed (x0.5-2
  variance, mean shifted by up to ~0.3 std): far from the identity (so a
  BN mistake shows) while activations stay O(1) (so float32 errors do not
  swamp the comparison, as they do with statistics unrelated to the data).
  calibrate=False: statistics 0 / 1 (for tests of names only).
  """
  model = resnet.ResNet(depth=depth, width=width)
  shapes = jax.eval_shape(lambda: model.init(
      jax.random.PRNGKey(0), jnp.zeros(images.shape), train=False))
  rng = np.random.default_rng(seed)

  def sample(name, shape):
    leaf = name.rsplit("/", 1)[-1]
    if leaf == "kernel":   # He-normal on fan-in
      return rng.normal(0, np.sqrt(2 / np.prod(shape[:3])), shape)
    if leaf == "scale":
      return rng.uniform(0.5, 1.5, shape)
    if leaf == "bias":
      return rng.normal(0, 0.2, shape)
    return np.zeros(shape) if leaf == "mean" else np.ones(shape)
  flat = {k: sample(k, v.shape).astype(np.float32) for k, v in
          traverse_util.flatten_dict(shapes, sep="/").items()}
  variables = traverse_util.unflatten_dict(flat, sep="/")
  if not calibrate:
    return variables
  # momentum 0: the running statistics become this batch's statistics.
  measure = resnet.ResNet(depth=depth, width=width, bn_momentum=0.0)
  _, measured = jax.jit(lambda v, x: measure.apply(
      v, x, train=True, mutable=["batch_stats"]))(variables, images)
  stats = traverse_util.flatten_dict(jax.device_get(measured), sep="/")
  for name, value in stats.items():
    if name.endswith("/var"):
      flat[name] = value * rng.uniform(0.5, 2.0, value.shape)
    else:   # '.../mean'
      std = np.sqrt(stats[name[:-len("mean")] + "var"])
      flat[name] = value + 0.3 * std * rng.uniform(-1, 1, value.shape)
  return traverse_util.unflatten_dict(
      {k: np.asarray(v, np.float32) for k, v in flat.items()}, sep="/")


@pytest.mark.parametrize("depth,width,size", [(18, 0.125, 80),
                                              (50, 0.125, 80)],
                         ids=["basic_r18", "bottleneck_r50"])
def test_torchvision_weights_reproduce_flax_features(depth, width, size):
  images = np.random.default_rng(1).uniform(0, 1, (2, size, size, 3)).astype(
      np.float32)
  variables = _random_variables(depth, width, images)
  model = resnet.ResNet(depth=depth, width=width)
  flax_feats = jax.device_get(jax.jit(
      lambda v, x: model.apply(v, x, train=False))(variables, images))

  state_dict = export_lib.torchvision_state_dict(variables, depth, 7)
  assert "fc.weight" not in state_dict
  assert int(state_dict["bn1.num_batches_tracked"]) == 7
  reference = _TorchvisionResNet(state_dict, depth)
  ref_feats = reference(images)
  assert reference.used == set(state_dict)   # strict load: nothing extra
  for name in ("stem", "stage1", "stage2", "stage3", "stage4"):
    ours, ref = flax_feats[name].transpose(0, 3, 1, 2), ref_feats[name]
    assert ours.shape == ref.shape, name
    # float32 vs float64 through up to 50 layers: the absolute error grows
    # to ~1e-5 of the feature range (measured: 2e-4 at R50 stage4, whose
    # values reach 20), so atol is 1e-4 of the range. A layout mistake is
    # O(1) of it.
    np.testing.assert_allclose(ours, ref, rtol=1e-4,
                               atol=1e-4 * max(1.0, np.abs(ref).max()),
                               err_msg=name)
  stage4 = ref_feats["stage4"]
  assert 0.1 < (stage4 > 0).mean() < 0.9 and stage4.std() > 0.1  # not trivial

  # The comparison is sensitive to the layout: kernels transposed in space
  # (HWIO -> OIWH) or BN variances dropped no longer match.
  for wrong in (
      {k: (v.transpose(0, 1, 3, 2) if v.ndim == 4 else v)
       for k, v in state_dict.items()},
      {k: (np.ones_like(v) if k.endswith("running_var") else v)
       for k, v in state_dict.items()}):
    bad = _TorchvisionResNet(wrong, depth)(images)["stage4"]
    assert not np.allclose(flax_feats["stage4"].transpose(0, 3, 1, 2), bad,
                           rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("depth", [18, 50])
def test_detectron2_names_are_a_renaming_of_torchvision(depth):
  state_dict = export_lib.torchvision_state_dict(
      _random_variables(depth, 0.125, np.zeros((1, 64, 64, 3), np.float32),
                        calibrate=False), depth)
  d2 = export_lib.detectron2_checkpoint(state_dict)
  assert d2["__author__"] == "odin_jax" and d2["matching_heuristics"] is True
  model = d2["model"]
  assert len(model) == len(state_dict)
  for name, array in state_dict.items():
    assert model[export_lib.detectron2_name(name)] is array
  expected = {"stem.conv1.weight", "stem.conv1.norm.weight",
              "stem.conv1.norm.bias", "stem.conv1.norm.running_mean",
              "stem.conv1.norm.running_var", "res2.0.conv1.weight",
              "res2.0.conv1.norm.weight", "res3.0.shortcut.weight",
              "res3.0.shortcut.norm.running_var", "res5.1.conv2.norm.bias"}
  if depth == 50:
    expected |= {"res2.0.shortcut.weight", "res2.0.shortcut.norm.weight",
                 "res2.2.conv3.norm.running_mean", "res5.2.conv3.weight"}
  else:
    assert "res2.0.shortcut.weight" not in model   # 64 -> 64: identity
  assert expected <= set(model)
  assert not [k for k in model if any(t in k for t in
                                      ("layer", "bn", "downsample"))]
  assert export_lib.detectron2_name("layer4.0.downsample.1.running_var") == \
      "res5.0.shortcut.norm.running_var"


def test_detectron2_config_and_depths():
  cfg, warnings = export_lib.detectron2_config(50, 1.0)
  assert not warnings
  assert cfg["MODEL.PIXEL_MEAN"] == [123.675, 116.28, 103.53]
  assert cfg["MODEL.PIXEL_STD"] == [58.395, 57.12, 57.375]
  assert cfg["INPUT.FORMAT"] == "RGB"
  assert cfg["MODEL.RESNETS.STRIDE_IN_1X1"] is False
  assert cfg["MODEL.RESNETS.RES2_OUT_CHANNELS"] == 256
  cfg, warnings = export_lib.detectron2_config(18, 0.5)
  assert any("RES2_OUT_CHANNELS = 64" in w for w in warnings)
  with pytest.raises(ValueError, match="detectron2 has no ResNet-200"):
    writer.resolve_formats("detectron2", "resnet", 200)
  assert writer.resolve_formats(None, "resnet", 200) == ("npz",
                                                         "torchvision")
  with pytest.raises(ValueError, match="Unknown export format"):
    writer.resolve_formats("npz,onnx", "resnet", 50)


# --- End to end on a trained workdir --------------------------------------


def _sha256(path):
  with open(path, "rb") as f:
    return hashlib.sha256(f.read()).hexdigest()


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  """A 2-step BYOL :test run: the same config as test_train.py's BYOL run,
  so the two share the persistent XLA compilation cache."""
  config = byol.get_config("test")
  config.total_steps = 2
  config.log_every_steps = 1
  workdir = tmp_path_factory.mktemp("trained")
  train.train_and_evaluate(config, str(workdir))
  return config, workdir


def test_cli_exports_every_format(trained):
  config, workdir = trained
  proc = subprocess.run(
      [sys.executable, "-m", "odin_jax.export", f"--workdir={workdir}"],
      capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  out = workdir / "export" / "step_2"
  info = json.loads((out / "export_info.json").read_text())
  files = {"backbone.npz", "torchvision.safetensors", "detectron2.pkl"}
  try:
    import torch  # noqa: F401  pylint: disable=import-outside-toplevel
    files.add("torchvision.pth")
  except ImportError:
    pass
  assert set(info["files"]) == files
  assert (out / "README.md").exists()
  for name, entry in info["files"].items():
    assert entry["sha256"] == _sha256(out / name), name
    assert name in proc.stdout
  assert (info["method"], info["step"], info["depth"], info["width"]) == (
      "byol", 2, 18, 0.125)
  assert info["input"]["mean"] == list(resnet.IMAGENET_MEAN)
  assert any("width 0.125" in w for w in info["warnings"])
  assert info["output_stride"] == 32
  assert not any("output stride" in w for w in info["warnings"])

  # Contents: the online backbone (not the EMA target), every array.
  params, batch_stats, _ = runner.load_params(config, str(workdir))
  online = {"params": params["backbone"],
            "batch_stats": batch_stats["backbone"]}
  npz = np.load(out / "backbone.npz")
  assert set(npz.files) == set(export_lib.flatten(online))
  restored = traverse_util.unflatten_dict(dict(npz), sep="/")
  jax.tree.map(np.testing.assert_array_equal, restored, online)
  assert info["files"]["backbone.npz"]["keys"] == len(npz.files)

  from safetensors import numpy as st_numpy
  tv = st_numpy.load_file(str(out / "torchvision.safetensors"))
  expected = export_lib.torchvision_state_dict(online, 18, 2)
  assert set(tv) == set(expected)
  for name in expected:
    np.testing.assert_array_equal(tv[name], expected[name], err_msg=name)
    assert tv[name].dtype == expected[name].dtype
  target, _, _ = runner.load_params(config, str(workdir),
                                    params_key="target_params")
  assert not np.array_equal(
      tv["layer4.1.conv2.weight"],
      target["backbone"]["stage4_block2"]["Conv_1"]["kernel"].transpose(
          3, 2, 0, 1))

  with open(out / "detectron2.pkl", "rb") as f:
    raw = f.read()
  assert b"numpy._core" not in raw   # loadable by NumPy 1.x too
  d2 = pickle.loads(raw)
  assert set(d2["model"]) == {export_lib.detectron2_name(k) for k in tv}
  for name, array in tv.items():
    np.testing.assert_array_equal(d2["model"][export_lib.detectron2_name(
        name)], array)

  # Same checkpoint, same bytes; a chosen format and folder.
  again = export_lib.export(str(workdir), out_dir=str(workdir / "again"))
  assert {k: v["sha256"] for k, v in again["files"].items()} == {
      k: v["sha256"] for k, v in info["files"].items()}
  only = export_lib.export(str(workdir), formats="npz", step=2,
                           out_dir=str(workdir / "npz_only"))
  assert set(only["files"]) == {"backbone.npz"} and "detectron2" not in only
  assert sorted(os.listdir(workdir / "npz_only")) == [
      "README.md", "backbone.npz", "export_info.json"]


def test_clear_errors(trained, tmp_path):
  config, workdir = trained
  with pytest.raises(FileNotFoundError,
                     match=f"No checkpoint directory {tmp_path}.*odin_jax"
                           r"\.main"):
    export_lib.export(str(tmp_path))
  with pytest.raises(ValueError, match=r"available: \[2\]"):
    export_lib.export(str(workdir), step=5)
  with pytest.raises(ValueError, match="Unknown export format"):
    export_lib.export(str(workdir), formats="onnx")
  other = config.copy_and_resolve_references()
  other.model.backbone = "convnext"
  with pytest.raises(NotImplementedError, match="'timm' format"):
    export_lib.export(str(workdir), config=other)


def test_transformer_backbones_export_timm_only():
  # Table-driven (convert.py); tests/unit/test_weights_in.py checks that it
  # writes what vit / swin.timm_state_dict document.
  for name in ("vit", "swin"):
    assert writer.timm_converter(name).args == (name,)
  assert writer.resolve_formats(None, "vit", None) == ("npz", "timm")
  with pytest.raises(NotImplementedError, match="ResNet backbones only"):
    writer.resolve_formats("npz,torchvision", "swin", None)
  with pytest.raises(ValueError, match="ViT/Swin"):
    writer.resolve_formats("timm", "resnet", 50)
