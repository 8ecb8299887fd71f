"""ViT and Swin backbones: sizes, window attention, timm layout, training."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import special

from configs import common, detcon_b, odin
from odin_jax import config_check, reporting, step, train
from odin_jax.models import network, resnet, swin, vit
from tests.helpers import run_steps as run_sharded_steps


def _count(tree) -> int:
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


def _init_shapes(module, size=224):
  x = jnp.zeros((1, size, size, 3))
  return jax.eval_shape(module.init, jax.random.PRNGKey(0), x)["params"]


# Backbone parameters without a classifier. timm's counts include the
# 1000-way head, D·1000 + 1000: vit_small_patch16_224 22,050,664 - 385,000;
# vit_base_patch16_224 86,567,656 - 769,000. Derivation for S/16 (D 384,
# MLP 1536, 197 tokens): patch conv 3·16²·384 + 384 = 295,296; CLS 384;
# positions 197·384 = 75,648; per block 2 LayerNorms 1,536 + qkv 443,520 +
# proj 147,840 + fc1 591,360 + fc2 590,208 = 1,774,464, x 12 = 21,293,568;
# final LayerNorm 768. B/8 differs from B/16 by its patch conv (3·8²·768)
# and 785 instead of 197 positions.
@pytest.mark.parametrize("name,expected", [("S/16", 21_665_664),
                                           ("B/16", 85_798_656),
                                           ("B/8", 85_807_872)])
def test_vit_parameter_counts(name, expected):
  p, depth, width, heads_ = vit.PRESETS[name]
  params = _init_shapes(vit.ViT(patch_size=p, depth=depth, width=width,
                                num_heads=heads_))
  assert _count(params) == expected == vit.num_params(p, depth, width)


# timm: swin_tiny 28,288,354 and swin_small 49,606,258 with the 768·1000 +
# 1000 = 769,000 head; ours adds the LayerNorms of stages 1-3 (for the FPN),
# 2·(96 + 192 + 384) = 1,344 parameters.
@pytest.mark.parametrize("name,timm_headless", [("T", 27_519_354),
                                                ("S", 48_837_258)])
def test_swin_parameter_counts(name, timm_headless):
  c, depths, nheads = swin.PRESETS[name]
  params = _init_shapes(swin.Swin(embed_dim=c, depths=depths,
                                  num_heads=nheads))
  assert _count(params) == timm_headless + 1_344
  assert swin.num_params(c, depths, nheads, stage_norms=False) == timm_headless


def test_output_shapes_at_paper_resolutions():
  # Odin App. A.4: ViT-B/8 at 448 px -> a 56x56 grid of 768-d tokens (the
  # position embeddings learnt at 224 are resampled).
  p, depth, width, nh = vit.PRESETS["B/8"]
  model = vit.ViT(patch_size=p, depth=depth, width=width, num_heads=nh)
  params = {"params": _init_shapes(model)}
  out = jax.eval_shape(model.apply, params, jnp.zeros((2, 448, 448, 3)))
  assert out["tokens"].shape == (2, 56, 56, 768)
  c, depths, nheads = swin.PRESETS["T"]
  model = swin.Swin(embed_dim=c, depths=depths, num_heads=nheads)
  params = {"params": _init_shapes(model)}
  for size in (224, 80, 96):   # 80 / 96: sides not multiples of the window
    out = jax.eval_shape(model.apply, params, jnp.zeros((2, size, size, 3)))
    for i, stage in enumerate(swin.STAGES):
      side = swin.stage_grid(size, stage)
      assert side == resnet.stage_grid(size, stage)   # the FPN's assumption
      assert out[stage].shape == (2, side, side, 96 * 2**i)


def _dense_window_attention(params, x, num_heads, window, shift):
  """Independent reference: attention over all real tokens of the map with
  a mask instead of windows. With shift s the (shifted) windows are, along
  each side, the token groups [0, s), [s, s + w), [s + w, s + 2w), ...,
  i.e. group(i) = (i + w - s) // w; no shift along a side that fits in one
  window. Bias: table[(dy + w - 1)(2w - 1) + dx + w - 1] for dy, dx =
  query - key."""
  b, h, w, c = x.shape
  sh, sw = (shift if h > window else 0), (shift if w > window else 0)
  ys, xs = np.divmod(np.arange(h * w), w)
  gy, gx = (ys + window - sh) // window, (xs + window - sw) // window
  same = (gy[:, None] == gy[None]) & (gx[:, None] == gx[None])
  dy = np.clip(ys[:, None] - ys[None] + window - 1, 0, 2 * window - 2)
  dx = np.clip(xs[:, None] - xs[None] + window - 1, 0, 2 * window - 2)
  bias = params["relative_position_bias_table"][dy * (2 * window - 1) + dx]
  tokens = x.reshape(b, h * w, c)
  qkv = tokens @ params["qkv"]["kernel"] + params["qkv"]["bias"]
  qkv = qkv.reshape(b, h * w, 3, num_heads, c // num_heads)
  q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
  logits = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(c // num_heads)
  logits = logits + np.transpose(bias, (2, 0, 1))[None]
  logits = np.where(same[None, None], logits, -np.inf)
  weights = np.exp(logits - logits.max(-1, keepdims=True))
  weights /= weights.sum(-1, keepdims=True)
  out = np.einsum("bhqk,bkhd->bqhd", weights, v).reshape(b, h * w, c)
  out = out @ params["proj"]["kernel"] + params["proj"]["bias"]
  return out.reshape(b, h, w, c)


@pytest.mark.parametrize("h,w,shift", [(9, 11, 2),   # padded, shifted
                                       (8, 8, 2),    # exact windows
                                       (3, 10, 2),   # rows fit one window
                                       (6, 7, 0)])   # padded, no shift
def test_window_attention_equals_masked_dense_attention(h, w, shift):
  module = swin.WindowAttention(num_heads=2, window=4, shift=shift)
  x = jnp.asarray(np.random.default_rng(0).standard_normal((2, h, w, 8)),
                  jnp.float32)
  params = jax.jit(module.init)(jax.random.PRNGKey(1), x)["params"]
  # A visible bias: timm's init (std 0.02) would hide an indexing error.
  table = params["relative_position_bias_table"]
  params = dict(params, relative_position_bias_table=jnp.asarray(
      np.random.default_rng(2).standard_normal(table.shape), jnp.float32))
  got = jax.jit(module.apply)({"params": params}, x)
  want = _dense_window_attention(jax.device_get(params), np.asarray(x), 2, 4,
                                 shift)
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def test_vit_position_embeddings_are_resampled_not_relearnt():
  model = vit.ViT(patch_size=8, depth=1, width=16, num_heads=2, pos_size=64)
  x = jnp.zeros((1, 64, 64, 3))
  variables = jax.eval_shape(model.init, jax.random.PRNGKey(1), x)
  assert variables["params"]["pos_embed"].shape == (1, 1 + 8 * 8, 16)
  big = jax.ShapeDtypeStruct((1, 128, 96, 3), jnp.float32)
  tokens = jax.eval_shape(model.apply, variables, big)["tokens"]
  assert tokens.shape == (1, 16, 12, 16)
  # Resampling a grid to its own size is the identity; a constant stays one.
  pos = np.random.default_rng(0).standard_normal((1, 64, 16))
  np.testing.assert_array_equal(vit.resample_pos_embed(pos, (8, 8), (8, 8)),
                                pos)
  flat = jnp.ones((1, 64, 16))
  up = jax.jit(vit.resample_pos_embed, static_argnums=(1, 2))
  np.testing.assert_allclose(up(flat, (8, 8), (16, 12)),
                             jnp.ones((1, 192, 16)), atol=1e-5)


def _layer_norm(x, weight, bias, eps):
  mean = x.mean(-1, keepdims=True)
  var = ((x - mean) ** 2).mean(-1, keepdims=True)
  return (x - mean) / np.sqrt(var + eps) * weight + bias


def _timm_vit_forward(sd, images, patch, num_heads):
  """timm's VisionTransformer.forward_features in numpy, on a state dict."""
  x = (images - np.asarray(resnet.IMAGENET_MEAN)) / np.asarray(
      resnet.IMAGENET_STD)
  b, size, _, _ = x.shape
  g = size // patch
  patches = x.reshape(b, g, patch, g, patch, 3)
  x = np.einsum("bhiwjc,ocij->bhwo", patches, sd["patch_embed.proj.weight"])
  x = x.reshape(b, g * g, -1) + sd["patch_embed.proj.bias"]
  d = x.shape[-1]
  x = np.concatenate([np.broadcast_to(sd["cls_token"], (b, 1, d)), x], 1)
  x = x + sd["pos_embed"]
  depth = len({k.split(".")[1] for k in sd if k.startswith("blocks.")})
  for i in range(depth):
    p = lambda name: sd[f"blocks.{i}.{name}"]
    y = _layer_norm(x, p("norm1.weight"), p("norm1.bias"), 1e-6)
    qkv = (y @ p("attn.qkv.weight").T + p("attn.qkv.bias")).reshape(
        b, -1, 3, num_heads, d // num_heads).transpose(2, 0, 3, 1, 4)
    q, k, v = qkv[0], qkv[1], qkv[2]
    attn = q @ k.transpose(0, 1, 3, 2) / np.sqrt(d // num_heads)
    attn = np.exp(attn - attn.max(-1, keepdims=True))
    attn /= attn.sum(-1, keepdims=True)
    y = (attn @ v).transpose(0, 2, 1, 3).reshape(b, -1, d)
    x = x + y @ p("attn.proj.weight").T + p("attn.proj.bias")
    y = _layer_norm(x, p("norm2.weight"), p("norm2.bias"), 1e-6)
    y = y @ p("mlp.fc1.weight").T + p("mlp.fc1.bias")
    y = 0.5 * y * (1 + special.erf(y / np.sqrt(2)))     # torch nn.GELU()
    x = x + y @ p("mlp.fc2.weight").T + p("mlp.fc2.bias")
  return _layer_norm(x, sd["norm.weight"], sd["norm.bias"], 1e-6)


def test_timm_export_of_a_vit_computes_the_same_tokens():
  model = vit.ViT(patch_size=8, depth=2, width=16, num_heads=2, pos_size=32)
  x = jnp.asarray(np.random.default_rng(1).random((2, 32, 32, 3)),
                  jnp.float32)
  variables = jax.jit(model.init)(jax.random.PRNGKey(1), x)
  # Non-trivial norms and biases, so a swapped weight / bias shows.
  rng = np.random.default_rng(0)
  params = jax.tree.map(lambda a: a + 0.1 * rng.standard_normal(a.shape),
                        variables["params"])
  tokens = jax.jit(model.apply)({"params": params}, x)["tokens"]
  sd = vit.timm_state_dict(params)
  ref = _timm_vit_forward(sd, np.asarray(x, np.float64), 8, 2)
  np.testing.assert_allclose(tokens.reshape(2, 16, 16), ref[:, 1:],
                             rtol=1e-3, atol=1e-4)


def _zeros(shapes):
  return jax.tree.map(lambda s: np.zeros(s.shape, np.float32), shapes)


def test_timm_keys_and_shapes_vit_s16():
  p, depth, width, nh = vit.PRESETS["S/16"]
  sd = vit.timm_state_dict(_zeros(_init_shapes(
      vit.ViT(patch_size=p, depth=depth, width=width, num_heads=nh))))
  d = 384
  expected = {"cls_token": (1, 1, d), "pos_embed": (1, 197, d),
              "patch_embed.proj.weight": (d, 3, 16, 16),
              "patch_embed.proj.bias": (d,),
              "norm.weight": (d,), "norm.bias": (d,)}
  for i in range(12):
    for name, shape in [("norm1.weight", (d,)), ("norm1.bias", (d,)),
                        ("attn.qkv.weight", (3 * d, d)),
                        ("attn.qkv.bias", (3 * d,)),
                        ("attn.proj.weight", (d, d)), ("attn.proj.bias", (d,)),
                        ("norm2.weight", (d,)), ("norm2.bias", (d,)),
                        ("mlp.fc1.weight", (4 * d, d)),
                        ("mlp.fc1.bias", (4 * d,)),
                        ("mlp.fc2.weight", (d, 4 * d)),
                        ("mlp.fc2.bias", (d,))]:
      expected[f"blocks.{i}.{name}"] = shape
  assert {k: v.shape for k, v in sd.items()} == expected
  assert sum(v.size for v in sd.values()) == 22_050_664 - 385_000


def test_timm_keys_and_shapes_swin_t():
  c, depths, nheads = swin.PRESETS["T"]
  sd = swin.timm_state_dict(_zeros(_init_shapes(
      swin.Swin(embed_dim=c, depths=depths, num_heads=nheads))))
  expected = {"patch_embed.proj.weight": (96, 3, 4, 4),
              "patch_embed.proj.bias": (96,), "patch_embed.norm.weight": (96,),
              "patch_embed.norm.bias": (96,), "norm.weight": (768,),
              "norm.bias": (768,)}
  for i, (depth, h) in enumerate(zip(depths, nheads)):
    d = 96 * 2**i
    if i:
      expected[f"layers.{i}.downsample.norm.weight"] = (2 * d,)
      expected[f"layers.{i}.downsample.norm.bias"] = (2 * d,)
      expected[f"layers.{i}.downsample.reduction.weight"] = (d, 2 * d)
    for j in range(depth):
      pre = f"layers.{i}.blocks.{j}."
      expected.update({
          pre + "norm1.weight": (d,), pre + "norm1.bias": (d,),
          pre + "attn.relative_position_bias_table": (169, h),
          pre + "attn.qkv.weight": (3 * d, d), pre + "attn.qkv.bias": (3 * d,),
          pre + "attn.proj.weight": (d, d), pre + "attn.proj.bias": (d,),
          pre + "norm2.weight": (d,), pre + "norm2.bias": (d,),
          pre + "mlp.fc1.weight": (4 * d, d), pre + "mlp.fc1.bias": (4 * d,),
          pre + "mlp.fc2.weight": (d, 4 * d), pre + "mlp.fc2.bias": (d,)})
  assert {k: v.shape for k, v in sd.items()} == expected
  assert sum(v.size for v in sd.values()) == 28_288_354 - 769_000


def test_presets_follow_the_paper():
  v = detcon_b.get_config("vit_b16")
  config_check.validate(v)
  assert (v.model.backbone, v.model.feature_stage, v.model.fpn_channels) == (
      "vit", "tokens", 0)
  assert (v.model.vit.patch_size, v.model.vit.width, v.model.vit.depth) == (
      16, 768, 12)
  o = v.optimizer   # Odin App. A.3
  assert (o.name, o.weight_decay, o.adam_b1, o.adam_b2) == (
      "adamw", 0.1, 0.9, 0.95)
  assert (v.batch_size, v.num_epochs) == (2048, 300)
  assert float(step.learning_rate_schedule(v, 100, 10)(10)) == (
      pytest.approx(3e-4))
  b8 = odin.get_config("vit_b8")
  config_check.validate(b8)
  assert (b8.model.vit.patch_size, b8.odin.span_scale, b8.num_epochs) == (
      8, 1.0, 100)
  assert b8.eval.image_size == 448 and network.feature_grid(b8, 448) == (56, 56)
  assert network.feature_grid(b8) == (28, 28)
  s = odin.get_config("swin_t")
  config_check.validate(s)
  assert (s.model.backbone, s.model.swin.depths) == ("swin", (2, 2, 6, 2))
  assert (s.optimizer.name, s.optimizer.clip_norm) == ("lars", 1.0)
  assert (s.model.feature_stage, s.odin.span_scale) == ("p2", 2.0)
  assert network.feature_grid(s, 448) == (112, 112)
  assert detcon_b.get_config("swin_s").model.swin.depths == (2, 2, 18, 2)
  # Backbone presets compose with the scale presets; the default is intact.
  assert common.split_backbone_preset("swin_t_coco") == ("swin_t", "coco")
  assert detcon_b.get_config("vit_demo").dataset.name == "demo"
  assert detcon_b.get_config().model.backbone == "resnet"
  bad = detcon_b.get_config("vit_test")
  bad.model.feature_stage = "stage4"
  with pytest.raises(config_check.ConfigError, match="tokens"):
    config_check.validate(bad)
  bad = detcon_b.get_config("swin_test")
  bad.model.swin.num_heads = (3, 3, 3, 3)
  with pytest.raises(config_check.ConfigError, match="num_heads"):
    config_check.validate(bad)


def test_adamw_skips_position_embeddings_and_clip_norm_clips():
  config = detcon_b.get_config("vit_test")
  params = {"dense": {"kernel": np.ones((3, 4), np.float32),
                      "bias": np.ones(4, np.float32)},
            "pos_embed": np.ones((1, 5, 4), np.float32),
            "cls_token": np.ones((1, 1, 4), np.float32),
            "attn": {"relative_position_bias_table": np.ones((9, 2),
                                                             np.float32)}}
  tx = step.make_optimizer(config, 1.0)
  zeros = jax.tree.map(np.zeros_like, params)
  updates, _ = jax.jit(tx.update)(zeros, tx.init(params), params)
  moved = jax.tree.map(lambda u: float(np.abs(u).max()), updates)
  assert moved["dense"]["kernel"] > 0           # decoupled weight decay
  assert moved["dense"]["bias"] == moved["pos_embed"] == 0
  assert moved["cls_token"] == moved["attn"]["relative_position_bias_table"] == 0

  config = detcon_b.get_config("swin_test")    # LARS + clipping at norm 1
  config.optimizer.weight_decay = 0.1
  grads = jax.tree.map(lambda p: 50.0 * np.arange(p.size, dtype=np.float32
                                                  ).reshape(p.shape), params)
  norm = float(np.sqrt(sum(np.sum(g**2) for g in jax.tree.leaves(grads))))
  unit = jax.tree.map(lambda g: g / norm, grads)
  assert config.optimizer.clip_norm == 1.0
  clipped = step.make_optimizer(config, 1.0)
  config.optimizer.clip_norm = 0.0
  plain = step.make_optimizer(config, 1.0)
  got, _ = jax.jit(clipped.update)(grads, clipped.init(params), params)
  update = jax.jit(plain.update)
  want, _ = update(unit, plain.init(params), params)
  raw, _ = update(grads, plain.init(params), params)
  for a, b, r in zip(jax.tree.leaves(got), jax.tree.leaves(want),
                     jax.tree.leaves(raw)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-8)
  assert any(np.abs(b - r).max() > 1e-6 for b, r in zip(
      jax.tree.leaves(want), jax.tree.leaves(raw)))


# DetCon with a ViT runs in test_vit_step_one_device_equals_four_devices
# and Odin with a Swin in test_odin_swin_network_shapes (same step, other
# masks): transformer blocks are slow to compile on XLA:CPU (a tiny Swin's
# train step takes ~3x a ResNet-18's), so only these two go end to end.
@pytest.mark.parametrize("module,preset", [(odin, "vit_test"),
                                           (detcon_b, "swin_test")],
                         ids=["odin_vit", "detcon_swin"])
def test_trains_end_to_end(module, preset, tmp_path):
  config = module.get_config(preset)
  config.total_steps = 2
  config.log_every_steps = 1
  state = train.train_and_evaluate(config, str(tmp_path))
  assert int(state.step) == 2
  records = reporting.read_metrics(str(tmp_path))
  assert [r["step"] for r in records] == [1, 2]
  for r in records:
    assert np.isfinite(r["train/loss"]) and np.isfinite(r["train/grad_norm"])
    if config.method == "odin":   # k-means on tokens / Swin-FPN projections
      assert r["train/discovered_segments"] > 1.5
  backbone = jax.device_get(state.params)["backbone"]
  assert ("block0" in backbone) == (config.model.backbone == "vit")
  assert ("stage1_block1" in backbone) == (config.model.backbone == "swin")
  assert "fpn" not in state.params


def test_odin_swin_network_shapes():
  """Odin's FPN sits on the Swin stages like on a ResNet: p2 at stride 4."""
  config = odin.get_config("swin_test")
  config_check.validate(config)
  model = network.from_config(config)
  span = round(config.odin.span_scale * config.image_size)       # 160 px
  assert network.feature_grid(config, span) == (40, 40)
  state = jax.eval_shape(lambda: step.create_train_state(
      config, model, step.make_optimizer(config, 0.1), jax.random.PRNGKey(0)))
  assert set(state.params) >= {"backbone", "fpn", "projector", "predictor"}
  variables = {"params": state.params, "batch_stats": state.batch_stats}
  z = jax.eval_shape(functools.partial(model.apply, train=False,
                                       method=model.dense_projection),
                     variables, jnp.zeros((2, span, span, 3)))
  assert z.shape == (2, 40, 40, config.model.projector_dim)


def test_vit_step_one_device_equals_four_devices():
  config = detcon_b.get_config("vit_test")
  # LARS, not the preset's AdamW: the biases right before a BatchNorm (and
  # the ViT's final LayerNorm bias, a constant shift the projector's BN
  # removes) have an identically zero gradient, i.e. float noise that
  # differs between 1 and 4 devices, and Adam scales noise up to ±lr steps.
  # The ViT's forward and backward are what this checks.
  config.optimizer.name = "lars"
  assert len(jax.devices()) == 4
  loss1, state1 = run_sharded_steps(config, jax.devices()[:1])
  loss4, state4 = run_sharded_steps(config, jax.devices())
  np.testing.assert_allclose(loss1, loss4, rtol=1e-5)
  for a, b in zip(jax.tree.leaves((state1.params, state1.target_params)),
                  jax.tree.leaves((state4.params, state4.target_params))):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
  # ξ started equal to θ and trails it by the EMA: they differ iff θ moved,
  # so the comparison above is not vacuous.
  moved = max(float(np.abs(np.asarray(a) - np.asarray(b)).max())
              for a, b in zip(jax.tree.leaves(state4.params),
                              jax.tree.leaves(state4.target_params)))
  assert moved > 1e-5
