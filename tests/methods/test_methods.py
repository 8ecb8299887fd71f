"""The methods registry: config.method selects, conflicts stop, and a new
discovered-mask method is one class, one config and one registry line.

The toy method below is such a method, written the way a user would add
one: it segments the spanning view on device by brightness (levels
quantiles of the grey value on an 8x8 grid), keeps a state of its own (a
counter the step updates) and has its own config section. Nothing in
step.py or train.py knows it.
"""
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from configs import detcon_b, hiergroup, odin
from odin_jax import config_check, methods, reporting, train
from odin_jax.methods import base, discovered


@methods.register
class Brightness(discovered.DiscoveredMasks):
  """Masks = brightness levels of the span; DetCon's loss on them."""
  names = ("toy_brightness",)
  section = "toy"
  schedule_metrics = ("train/toy_updates",)

  def validate(self):
    super().validate()
    config_check.require(self.config.toy.levels >= 2,
                         "toy.levels must be >= 2.")

  def span_view(self):
    return base.SpanView(size=self.config.image_size)

  def init_state(self, params):
    return {"updates": jnp.zeros((), jnp.int32)}

  def update_state(self, method_state, params, step):
    updates = method_state["updates"] + 1
    return {"updates": updates}, {"train/toy_updates": updates}

  def make_segment(self, model):
    levels = self.config.toy.levels

    def segment(state, batch, key):
      grey = batch["span"].mean(-1)                       # [B, P, P]
      b, p, _ = grey.shape
      grey = grey.reshape(b, 8, p // 8, 8, p // 8).mean((2, 4))
      return jnp.clip((grey * levels).astype(jnp.int32), 0, levels - 1)

    return segment


def toy_config():
  """The toy method's config: DetCon-B's test preset plus its section."""
  c = detcon_b.get_config("test")
  c.method = "toy_brightness"
  c.toy = ml_collections.ConfigDict({"levels": 3})
  c.mask_pictures_every_steps = 2
  return c


def test_config_method_selects_the_method():
  assert isinstance(methods.get(detcon_b.get_config("test")),
                    methods.method_class("detcon_b"))
  assert methods.get(odin.get_config("test")).names == ("odin",)
  assert methods.get(toy_config()).names == ("toy_brightness",)
  assert "toy_brightness" in methods.names()


@pytest.mark.parametrize("change, message", [
    # The run would be called detcon_b and train Odin, or the reverse.
    (lambda c: c.update({"method": "odin"}), "needs the config.odin section"),
    (lambda c: setattr(c, "odin", ml_collections.ConfigDict(
        {"num_clusters": 8})), "config.odin section: the odin settings "
     "would be ignored"),
    (lambda c: c.update({"method": "dino"}), "config.method='dino'"),
    (lambda c: c.loss.update({"name": "hiergroup"}),
     "trains with one of the mask losses"),
])
def test_contradictory_config_names_the_conflict(change, message):
  config = detcon_b.get_config("test")
  change(config)
  with pytest.raises(config_check.ConfigError, match=message):
    config_check.validate(config)


def test_method_specific_checks_come_from_the_method():
  config = hiergroup.get_config("test")
  config.loss.name = "contrastive_detection"
  with pytest.raises(config_check.ConfigError, match="its own pixel loss"):
    config_check.validate(config)
  # Another method's section is refused by every method, not only DetCon.
  config = hiergroup.get_config("test")
  config.r2o = ml_collections.ConfigDict({"k_start": 8})
  with pytest.raises(config_check.ConfigError, match="Train r2o with"):
    config_check.validate(config)
  config = toy_config()
  config.toy.levels = 1
  with pytest.raises(config_check.ConfigError, match="toy.levels"):
    config_check.validate(config)


def test_new_method_trains_resumes_and_keeps_its_state(tmp_path):
  """The toy method runs through the one step and train.py, its masks
  replace the data's, its state is checkpointed and resumed."""
  config = toy_config()
  config.total_steps, config.log_every_steps = 2, 1
  state = train.train_and_evaluate(config, str(tmp_path))
  assert int(state.method_state["updates"]) == 2
  config.total_steps = 3   # resume: the counter comes from the checkpoint
  state = train.train_and_evaluate(config, str(tmp_path))
  assert int(jax.device_get(state.method_state["updates"])) == 3
  records = reporting.read_metrics(str(tmp_path))
  assert [r["step"] for r in records] == [1, 2, 3]
  assert [r["train/toy_updates"] for r in records] == [1, 2, 3]
  for r in records:
    assert np.isfinite(r["train/loss"])
    assert 1.0 <= r["train/discovered_segments"] <= config.toy.levels
