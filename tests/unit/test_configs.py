"""Every config and preset builds and validates; bad values fail clearly."""
import pytest

from configs import byol, common, detcon_b, detcon_s, odin, r2o, simclr
from odin_jax import config_check

METHODS = {"detcon_b": detcon_b, "detcon_s": detcon_s, "byol": byol,
           "simclr": simclr, "odin": odin, "r2o": r2o}


@pytest.mark.parametrize("name", sorted(METHODS))
@pytest.mark.parametrize("preset", [None, *common.PRESETS,
                                    *common.BACKBONE_PRESETS, "vit_demo",
                                    "vit_test", "swin_demo", "swin_test",
                                    "swin_t_coco"])
def test_every_config_builds_and_validates(name, preset):
  config = METHODS[name].get_config(preset)
  assert config.method == name
  config_check.validate(config)
  for field in ("batch_size", "num_epochs", "total_steps", "log_every_steps",
                "checkpoint_every_steps", "seed"):
    assert field in config


def test_paper_defaults():
  c = detcon_b.get_config()
  assert (c.batch_size, c.num_epochs, c.num_masks, c.image_size) == (4096, 1000, 16, 224)
  assert (c.masks.method, c.masks.fh_scale, c.loss.temperature) == ("fh", 1000.0, 0.1)
  assert (c.model.depth, c.model.projector_hidden, c.model.projector_dim) == (50, 4096, 256)
  assert (c.optimizer.base_learning_rate, c.optimizer.weight_decay) == (0.2, 1.5e-6)
  assert c.ema.base_decay == 0.996
  s = detcon_s.get_config()
  assert s.model.predictor_hidden == 0 and not s.ema.enabled
  for cfg in (byol, simclr):
    g = cfg.get_config()
    assert g.num_masks == 1 and g.masks.method == "grid" and g.masks.grid_size == 1
  assert detcon_b.get_config("demo").dataset.name == "demo"


def test_s_methods_take_simclr_recipe_and_heads_b_methods_byol():
  # DetCon S3.1: DetCon-S (and SimCLR) use SimCLR v1's augmentation and
  # projection head; DetCon-B, BYOL, Odin and R2O keep BYOL's.
  for cfg in (detcon_s, simclr):
    c = cfg.get_config()
    a = c.augment
    assert (a.brightness, a.contrast, a.saturation, a.hue) == (0.8, 0.8, 0.8, 0.2)
    assert (a.color_jitter_prob, a.grayscale_prob) == (0.8, 0.2)
    assert tuple(a.blur_prob) == (0.5, 0.5) and tuple(a.solarize_prob) == (0, 0)
    m = c.model
    assert (m.projector_hidden, m.projector_dim, m.predictor_hidden) == (2048, 128, 0)
    assert not c.ema.enabled
    assert (c.optimizer.base_learning_rate, c.optimizer.weight_decay) == (0.3, 1e-6)
  for cfg in (detcon_b, byol, odin, r2o):
    a = cfg.get_config().augment
    assert (a.brightness, a.contrast, a.saturation, a.hue) == (0.4, 0.4, 0.2, 0.1)
    assert (a.color_jitter_prob, a.grayscale_prob) == (0.8, 0.2)
    assert tuple(a.blur_prob) == (1.0, 0.1) and tuple(a.solarize_prob) == (0.0, 0.2)
  assert simclr.get_config().loss.name == "simclr"


def test_unknown_preset_names_the_choices():
  with pytest.raises(ValueError, match="demo"):
    detcon_b.get_config("imagenet21k")


@pytest.mark.parametrize("field,value,match", [
    ("loss.name", "infonce", "loss.name"),
    ("masks.method", "mcg", "masks.method"),
    ("model.depth", 42, "model.depth"),
    ("batch_size", 0, "batch_size"),
    ("num_masks", 4, "num_masks"),          # byol takes one global mask
    ("grad_accum_steps", 3, "grad_accum_steps"),
    ("model.output_stride", 4, "model.output_stride"),
    ("augment.blur_prob", (1.0, 1.5), "augment.blur_prob"),
    ("augment.solarize_prob", (0.2,), "augment.solarize_prob"),
    ("augment.grayscale_prob", -0.1, "augment.grayscale_prob"),
    ("augment.hue", 0.7, "augment.hue"),
    ("augment.blur_sigma_min", 0.0, "augment.blur_sigma_min"),
])
def test_bad_values_fail_with_the_field_name(field, value, match):
  config = byol.get_config("test")
  node = config
  *path, leaf = field.split(".")
  for p in path:
    node = node[p]
  node[leaf] = value
  with pytest.raises(config_check.ConfigError, match=match):
    config_check.validate(config)


def test_unknown_field_on_the_command_line_is_rejected(tmp_path):
  import subprocess
  import sys
  proc = subprocess.run(
      [sys.executable, "-m", "odin_jax.main", "--config=configs/detcon_b.py:demo",
       "--config.batch_sise=64", f"--workdir={tmp_path}"],
      capture_output=True, text=True, timeout=120)
  assert proc.returncode != 0
  assert "batch_sise" in proc.stderr
  assert not (tmp_path / "checkpoints").exists()


def test_odin_and_r2o_paper_defaults():
  o = odin.get_config()
  assert o.method == "odin" and "odin" in o and "r2o" not in o
  assert (o.odin.num_clusters, o.odin.ema_rate, o.odin.span_scale) == (16, 1e-3, 2.0)
  assert (o.model.fpn_channels, o.model.feature_stage) == (256, "p2")
  r = r2o.get_config()
  assert r.method == "r2o" and "r2o" in r and "odin" not in r
  assert r.loss.name == "mask_byol"
  assert (r.r2o.k_start, r.r2o.k_end, r.r2o.region_stage) == (128, 4, "stage3")
  assert (r.masks.method, r.optimizer.base_learning_rate) == ("slic", 0.3)


def test_bad_odin_and_r2o_fields_fail_clearly():
  c = odin.get_config("test")
  c.odin.tau_update = "sometimes"
  with pytest.raises(config_check.ConfigError, match="odin.tau_update"):
    config_check.validate(c)
  c = odin.get_config("test")
  c.model.fpn_channels = 0
  with pytest.raises(config_check.ConfigError, match="fpn_channels"):
    config_check.validate(c)
  c = odin.get_config("test")
  c.model.output_stride = 16      # an FPN needs the strides 4-32
  with pytest.raises(config_check.ConfigError, match="output_stride=16"):
    config_check.validate(c)
  c = r2o.get_config("test")
  c.r2o.group_size = 3
  with pytest.raises(config_check.ConfigError, match="group_size"):
    config_check.validate(c)
