"""Weights in and out against real torchvision and timm models.

Skipped where torch, torchvision or timm is missing (the main environment:
x86_64 torchvision needs PyPI's 5 GB CUDA build of torch); .ci/run runs it
in a side venv with ODIN_JAX_REQUIRE_TORCH=1, which turns the skip into a
failure. With random weights (and random BatchNorm statistics, calibrated
so that activations stay O(1) through 50 layers):
  model.state_dict() -> init_from -> export -> the same state_dict, bit for
  bit; and the torch model's features equal odin_jax's on the same image.
"""

from __future__ import annotations

import importlib
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from configs import detcon_b
from odin_jax.evaluate import features
from odin_jax.export import convert, weights_in
from odin_jax.models import network, resnet, vit

_REQUIRED = os.environ.get("ODIN_JAX_REQUIRE_TORCH") == "1"   # .ci/run's venv


def _import(name):
  return (importlib.import_module(name) if _REQUIRED else
          pytest.importorskip(name))


torch = _import("torch")
torchvision = _import("torchvision")
timm = _import("timm")
safetensors_torch = _import("safetensors.torch")

_MEAN = np.asarray(resnet.IMAGENET_MEAN, np.float32)
_STD = np.asarray(resnet.IMAGENET_STD, np.float32)


def _numpy(state_dict) -> dict:
  return {k: v.detach().cpu().numpy() for k, v in state_dict.items()}


def _expected(config) -> dict:
  shapes = features._abstract_variables(  # pylint: disable=protected-access
      config)
  return {"params": shapes["params"]["backbone"],
          "batch_stats": shapes["batch_stats"].get("backbone", {})}


def _assert_bit_identical(got: dict, want: dict) -> None:
  assert sorted(got) == sorted(want)
  for k in want:
    assert got[k].dtype == want[k].dtype, k
    assert got[k].shape == want[k].shape and np.array_equal(got[k], want[k]), k


def _images(size: int, seed: int = 0) -> np.ndarray:
  """[2, size, size, 3] float32 in [0, 1] (odin_jax's input)."""
  return np.random.default_rng(seed).uniform(
      0, 1, (2, size, size, 3)).astype(np.float32)


def _torch_input(images: np.ndarray):
  """The same images as torch models take them: normalised NCHW."""
  return torch.from_numpy(((images - _MEAN) / _STD).transpose(0, 3, 1, 2)
                          .copy())


def _assert_features_close(ours: np.ndarray, ref: np.ndarray) -> None:
  """To 1e-4 of the features' range (float32 through up to 50 layers in two
  libraries; a layout mistake is O(1) of it)."""
  scale = max(1.0, float(np.abs(ref).max()))
  np.testing.assert_allclose(ours, ref, rtol=1e-4, atol=1e-4 * scale)
  assert ref.std() > 0.1     # not trivially small


# --- torchvision ResNet-50 ----------------------------------------------------


def _random_resnet50(images):
  """torchvision resnet50(weights=None) with random BN affine parameters and
  running statistics: those of `images`, perturbed (x0.5-2 variance, the
  mean moved by up to 0.3 std), so that a BN mapping mistake shows."""
  torch.manual_seed(0)
  model = torchvision.models.resnet50(weights=None)
  norms = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
  with torch.no_grad():
    for m in norms:
      m.weight.uniform_(0.5, 1.5)
      m.bias.normal_(0, 0.2)
      m.reset_running_stats()
      m.momentum = None          # cumulative: the batch's own statistics
    model.train()(_torch_input(images))
    for m in norms:
      std = m.running_var.sqrt()
      m.running_var.mul_(torch.empty_like(std).uniform_(0.5, 2.0))
      m.running_mean.add_(0.3 * std * torch.empty_like(std).uniform_(-1, 1))
      m.num_batches_tracked.zero_()   # the export writes the step: 0 here
  return model.eval()


def _torchvision_stage4(model, x):
  with torch.no_grad():
    x = model.maxpool(model.relu(model.bn1(model.conv1(x))))
    for layer in (model.layer1, model.layer2, model.layer3, model.layer4):
      x = layer(x)
  return x.numpy()


def test_torchvision_resnet50(tmp_path):
  images = _images(96)
  model = _random_resnet50(images)
  state_dict = _numpy(model.state_dict())
  path = tmp_path / "resnet50.pth"
  torch.save(model.state_dict(), path)
  config = detcon_b.get_config()       # the paper's ResNet-50 x1
  flat, info = weights_in.load_backbone(str(path), config, _expected(config))
  assert info["format"] == "torchvision"
  assert info["ignored"] == sorted(
      ["fc.bias", "fc.weight"] +
      [k for k in state_dict if k.endswith("num_batches_tracked")])
  variables = traverse_util.unflatten_dict(flat, sep="/")

  # torchvision -> odin_jax -> torchvision: bit for bit (fc is not ours).
  back = convert.torchvision_state_dict(variables, 50, 0)
  _assert_bit_identical(back, {k: v for k, v in state_dict.items()
                               if not k.startswith("fc.")})

  # The same image, the same features (layer4 = 'stage4', NCHW vs NHWC):
  # float32 (measured: 3e-4 at values up to 12, so to 1e-4 of the range),
  # and float64 on both sides to 1e-4 absolute (measured: 3e-5; the input
  # normalisation stays float32 in both).
  ours = jax.jit(lambda v, x: resnet.ResNet(depth=50).apply(
      v, x, train=False)["stage4"])(variables, images)
  ref = _torchvision_stage4(model, _torch_input(images))
  _assert_features_close(np.asarray(ours).transpose(0, 3, 1, 2), ref)
  with jax.enable_x64(True):
    ours = jax.jit(lambda v, x: resnet.ResNet(depth=50, dtype=jnp.float64)
                   .apply(v, x, train=False)["stage4"])(
                       jax.tree.map(lambda a: a.astype(np.float64),
                                    variables), images.astype(np.float64))
  ref = _torchvision_stage4(model.double(), _torch_input(images).double())
  np.testing.assert_allclose(np.asarray(ours).transpose(0, 3, 1, 2), ref,
                             rtol=0, atol=1e-4)


# --- timm ViT-S/16 and Swin-T ------------------------------------------------


def _perturbed(model, seed: int = 0):
  """Every parameter + 0.02·N(0, 1): LayerNorm weights and all biases away
  from their 1 / 0 init, so that a swapped weight / bias shows."""
  torch.manual_seed(seed)
  with torch.no_grad():
    for p in model.parameters():
      p.add_(0.02 * torch.randn_like(p))
  return model.eval()


def test_timm_vit_s16(tmp_path):
  model = _perturbed(timm.create_model("vit_small_patch16_224",
                                       pretrained=False, num_classes=0))
  state_dict = _numpy(model.state_dict())
  path = tmp_path / "vit_s16.safetensors"
  safetensors_torch.save_file(model.state_dict(), str(path))
  config = detcon_b.get_config("vit_s16")
  flat, info = weights_in.load_backbone(str(path), config, _expected(config))
  assert info["format"] == "timm" and not info["ignored"]
  params = traverse_util.unflatten_dict(flat, sep="/")["params"]

  _assert_bit_identical(convert.timm_state_dict("vit", params), state_dict)

  images = _images(224, seed=1)
  options = dict(network.transformer_fields(config)["backbone_options"])
  ours = jax.jit(lambda p, x: vit.ViT(**options).apply(
      {"params": p}, x)["tokens"])(params, images)
  with torch.no_grad():
    ref = model.forward_features(_torch_input(images)).numpy()
  assert ref.shape == (2, 1 + 14 * 14, 384)     # CLS, then the patches
  _assert_features_close(np.asarray(ours).reshape(2, 196, 384), ref[:, 1:])


def test_timm_swin_t_round_trip(tmp_path):
  model = _perturbed(timm.create_model("swin_tiny_patch4_window7_224",
                                       pretrained=False, num_classes=0))
  state_dict = _numpy(model.state_dict())
  path = tmp_path / "swin_t.safetensors"
  safetensors_torch.save_file(model.state_dict(), str(path))
  config = detcon_b.get_config("swin_t")
  expected = _expected(config)
  flat, info = weights_in.load_backbone(str(path), config, expected)
  assert info["format"] == "timm"
  assert sorted(info["kept_at_init"]) == [
      f"params/stage{i}_norm/{p}" for i in (1, 2, 3) for p in ("bias",
                                                               "scale")]
  kept = traverse_util.flatten_dict(expected, sep="/")
  params = traverse_util.unflatten_dict(
      {k[len("params/"):]: v for k, v in flat.items()} |
      {k[len("params/"):]: np.zeros(kept[k].shape, np.float32)
       for k in info["kept_at_init"]}, sep="/")
  _assert_bit_identical(convert.timm_state_dict("swin", params), state_dict)


def test_versions_are_the_documented_ones():
  """docs/export.md names the versions these checks ran with."""
  docs = os.path.join(os.path.dirname(__file__), "..", "..", "docs", "export.md")
  with open(docs, encoding="utf-8") as f:
    text = f.read()
  for module in (torch, torchvision, timm):
    version = module.__version__.split("+")[0]
    assert f"{module.__name__} {version}" in text, (module.__name__, version)
