"""ResNet: torchvision padding, stage shapes, width, BatchNorm settings."""
import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from odin_jax.models import network, resnet


def numpy_conv(x, w, stride, pad):
  """Cross-correlation with symmetric zero padding, PyTorch's Conv2d rule."""
  x = np.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
  k = w.shape[0]
  out_h = (x.shape[1] - k) // stride + 1
  out_w = (x.shape[2] - k) // stride + 1
  out = np.zeros((x.shape[0], out_h, out_w, w.shape[-1]))
  for i in range(out_h):
    for j in range(out_w):
      patch = x[:, i * stride:i * stride + k, j * stride:j * stride + k]
      out[:, i, j] = np.einsum("bhwc,hwco->bo", patch, w)
  return out


@pytest.mark.parametrize("kernel,stride,size", [(7, 2, 16), (3, 2, 16), (3, 1, 9), (1, 2, 8)])
def test_conv_padding_is_torchvision(kernel, stride, size):
  layer = resnet.conv(4, kernel, stride)
  x = np.random.default_rng(0).normal(size=(1, size, size, 3)).astype(np.float32)
  params = layer.init(jax.random.PRNGKey(0), x)
  got = np.asarray(layer.apply(params, x))
  want = numpy_conv(x, np.asarray(params["params"]["kernel"]), stride, kernel // 2)
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
  # 'SAME' differs for stride 2 on even sizes: that is the bug we avoid.
  if stride == 2 and kernel > 1:
    same = jax.lax.conv_general_dilated(
        x, params["params"]["kernel"], (stride, stride), "SAME",
        dimension_numbers=("NHWC", "HWIO", "NHWC"))
    assert not np.allclose(np.asarray(same), want, atol=1e-3)


def test_dilated_conv_matches_numpy():
  """resnet.conv(dilation=d): taps d apart, padded d * (k // 2) each side."""
  layer = resnet.conv(3, 3, dilation=2)
  x = np.random.default_rng(1).normal(size=(1, 9, 9, 2)).astype(np.float32)
  params = layer.init(jax.random.PRNGKey(0), x)
  w = np.asarray(params["params"]["kernel"])
  spread = np.zeros((5, 5, 2, 3), np.float32)    # the same taps, 2 apart
  spread[::2, ::2] = w
  np.testing.assert_allclose(np.asarray(layer.apply(params, x)),
                             numpy_conv(x, spread, 1, 2), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("depth", [18, 50])
def test_output_stride_dilates_with_the_same_parameters(depth):
  """Output stride 16 / 8: stage4 (stage3) at stage3's (stage2's) resolution,
  the same parameter tree, and at inference the dilated maps sampled every
  2nd / 4th cell equal the stride-32 maps (the a-trous identity)."""
  x = jnp.asarray(np.random.default_rng(2).uniform(size=(2, 80, 80, 3)),
                  jnp.float32)
  variables = resnet.ResNet(depth=depth, width=0.125).init(
      jax.random.PRNGKey(0), x, train=False)
  # Non-trivial running statistics (small means: ReLUs stay half open),
  # shared by the three networks.
  rng = np.random.default_rng(3)
  stats = flax.traverse_util.flatten_dict(variables["batch_stats"])
  stats = {k: jnp.asarray(rng.normal(0, 0.1, v.shape) if k[-1] == "mean"
                          else rng.uniform(0.5, 1.5, v.shape), v.dtype)
           for k, v in stats.items()}
  variables = {"params": variables["params"],
               "batch_stats": flax.traverse_util.unflatten_dict(stats)}
  base = resnet.ResNet(depth=depth, width=0.125).apply(variables, x,
                                                       train=False)
  assert base["stage4"].shape[1] == resnet.stage_grid(80) == 3
  # The maps vary from cell to cell (else any dilation would pass).
  assert float(jnp.std(base["stage4"], axis=(1, 2)).mean()) > 0.05
  for output_stride, step3, step4 in ((16, 1, 2), (8, 2, 4)):
    model = resnet.ResNet(depth=depth, width=0.125,
                          output_stride=output_stride)
    shapes = jax.eval_shape(lambda m=model: m.init(jax.random.PRNGKey(0), x,
                                                   train=False))
    assert jax.tree.map(lambda a: a.shape, shapes) == jax.tree.map(
        lambda a: a.shape, variables)
    out = model.apply(variables, x, train=False)
    side = 80 // output_stride + (80 % output_stride > 0)
    assert out["stage4"].shape[1] == side == resnet.stage_grid(
        80, "stage4", output_stride)
    assert out["stage3"].shape[1] == resnet.stage_grid(80, "stage3",
                                                       output_stride)
    np.testing.assert_allclose(out["stage2"], base["stage2"], rtol=1e-5)
    # float32 rounding: the dilated convs sum in another order.
    np.testing.assert_allclose(out["stage3"][:, ::step3, ::step3],
                               base["stage3"], rtol=1e-3, atol=1e-3)
    np.testing.assert_allclose(out["stage4"][:, ::step4, ::step4],
                               base["stage4"], rtol=1e-3, atol=1e-3)
    # ... and not trivially: the cells in between are new.
    assert out["stage4"].shape != base["stage4"].shape
  with pytest.raises(ValueError, match="output_stride"):
    resnet.ResNet(depth=18, output_stride=4).init(jax.random.PRNGKey(0), x)


def test_max_pool_pads_with_minus_infinity():
  x = -np.ones((1, 4, 4, 1), np.float32)        # all negative
  out = np.asarray(resnet.max_pool_3x3_s2(jnp.asarray(x)))
  assert out.shape == (1, 2, 2, 1) and (out == -1).all()   # zero pad would give 0


@pytest.mark.parametrize("depth,width,channels", [(18, 0.25, 128), (50, 0.125, 256)])
def test_stage_shapes(depth, width, channels):
  model = resnet.ResNet(depth=depth, width=width)
  x = jnp.zeros((2, 80, 80, 3))
  shapes = jax.eval_shape(lambda: model.init_with_output(
      jax.random.PRNGKey(0), x, train=False)[0])
  sides = {k: v.shape[1] for k, v in shapes.items()}
  assert sides == {"stem": 20, "stage1": 20, "stage2": 10, "stage3": 5, "stage4": 3}
  assert shapes["stage4"].shape[-1] == channels == resnet.feature_channels(depth, width)
  assert resnet.stage_grid(80) == 3 and resnet.stage_grid(224) == 7


def test_all_depths_build():
  for depth in resnet.STAGE_SIZES:
    out = jax.eval_shape(lambda d=depth: resnet.ResNet(depth=d, width=0.0625).init_with_output(
        jax.random.PRNGKey(0), jnp.zeros((1, 64, 64, 3)), train=False)[0])
    assert out["stage4"].shape[1:3] == (2, 2)
  with pytest.raises(ValueError, match="depth"):
    resnet.ResNet(depth=42).init(jax.random.PRNGKey(0), jnp.zeros((1, 64, 64, 3)))


def test_resnet50_parameter_count_matches_torchvision():
  # torchvision resnet50 without its fc layer: 23,508,032 parameters.
  shapes = jax.eval_shape(lambda: resnet.ResNet(depth=50).init(
      jax.random.PRNGKey(0), jnp.zeros((1, 64, 64, 3)), train=False))
  n = sum(np.prod(x.shape) for x in jax.tree.leaves(shapes["params"]))
  assert n == 23_508_032


def test_batchnorm_momentum_epsilon_and_input_normalisation():
  model = resnet.ResNet(depth=18, width=0.125)
  x = jax.random.uniform(jax.random.PRNGKey(1), (4, 64, 64, 3))
  variables = model.init(jax.random.PRNGKey(0), x)
  _, upd = model.apply(variables, x, mutable=["batch_stats", "intermediates"],
                       capture_intermediates=True)
  stem_out = np.asarray(upd["intermediates"]["stem_conv"]["__call__"][0])
  batch_mean = stem_out.mean((0, 1, 2))
  batch_var = stem_out.var((0, 1, 2))
  stats = upd["batch_stats"]["stem_bn"]
  # momentum 0.9: running stats move 10% of the way to the batch stats.
  np.testing.assert_allclose(stats["mean"], 0.1 * batch_mean, rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(stats["var"], 0.9 + 0.1 * batch_var, rtol=1e-4)
  # An image equal to the ImageNet mean is zero after normalisation, so the
  # bias-free stem conv outputs exactly zero.
  mean_image = jnp.broadcast_to(jnp.asarray(resnet.IMAGENET_MEAN), (1, 64, 64, 3))
  _, upd = model.apply(variables, mean_image, mutable=["batch_stats", "intermediates"],
                       capture_intermediates=True)
  assert np.abs(np.asarray(upd["intermediates"]["stem_conv"]["__call__"][0])).max() < 1e-5
  assert model.bn_epsilon == 1e-5 and model.bn_momentum == 0.9


def test_object_network_outputs_and_predictor():
  net = network.ObjectNetwork(depth=18, width=0.125, projector_hidden=32,
                            projector_dim=16, predictor_hidden=32)
  images = jnp.zeros((2, 80, 80, 3))
  cells = jnp.zeros((2, 3, 3), jnp.int32)
  ids = jnp.zeros((2, 4), jnp.int32)
  variables = net.init(jax.random.PRNGKey(0), images, cells, ids, train=False)
  assert set(variables["params"]) == {"backbone", "projector", "predictor"}
  out = net.apply(variables, images, cells, ids, train=False)
  assert out["hidden"].shape == (2, 4, 64)
  assert out["projection"].shape == out["prediction"].shape == (2, 4, 16)
  no_pred = net.apply(variables, images, cells, ids, train=False, with_predictor=False)
  np.testing.assert_array_equal(no_pred["prediction"], no_pred["projection"])
