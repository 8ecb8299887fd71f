"""Hierarchical grouping: pixel embeddings learnt from region trees (Zhang &
Maire 2020).

Each image comes with a region tree (masks.method 'hierarchy',
data/hierarchy.py): leaf ids carried through each view like any mask
(mask1, mask2 [B, S, S]) and the tree distances between leaves (batch
'hierarchy' [B, L, L]). The network is a ResNet with a hypercolumn head
(models/hypercolumn.py) giving a per-pixel embedding [B, S/4, S/4, D]; the
loss samples pixel pairs by tree distance and contrasts them
(grouping_loss.py). No target network, no mask ids, no projections: the
health statistics do not apply.

Config: the `hiergroup` section, defaults in configs/hiergroup.py.
"""

from __future__ import annotations

from odin_jax import config_check, grouping_loss, objects
from odin_jax.methods import base
from odin_jax.models import hypercolumn

# hiergroup.objective: 'log_likelihood' (-log p at T = loss.temperature, the
# default) or 'paper' (eq. 1: maximise Σ p at T = 1).
OBJECTIVES = grouping_loss.OBJECTIVES
LOSS_NAME = "hiergroup"   # its loss.name (the method's own pixel loss)


class HierGroup(base.Method):
  """Hierarchical grouping (configs/hiergroup.py)."""
  names = ("hiergroup",)
  section = "hiergroup"
  health = False
  eval_feature = "embedding"   # the learnt per-pixel embedding F, stride 4

  def validate(self) -> None:
    super().validate()
    c, h, require = self.config, self.config.hiergroup, config_check.require
    require(c.loss.name == LOSS_NAME,
            f"config.method='hiergroup' trains its own pixel loss: set "
            f"loss.name={LOSS_NAME!r} (got {c.loss.name!r}).")
    require(c.masks.method == "hierarchy",
            "hiergroup samples pixels by region-tree distance: set "
            "masks.method='hierarchy'.")
    require(not c.ema.enabled, "hiergroup has no target network: set "
            "ema.enabled=False.")
    require(c.loss.negatives == "global", "hiergroup's cross-image "
            "negatives come from the whole batch: use loss.negatives="
            "'global'.")
    require(c.model.get("backbone", "resnet") == "resnet",
            "hiergroup uses the ResNet hypercolumn head: set "
            "model.backbone='resnet'.")
    require(c.model.get("output_stride", 32) == 32,
            "hiergroup's hypercolumn head needs model.output_stride=32.")
    require(h.num_regions >= 1 and h.num_positives >= 1 and
            h.num_negatives >= 0 and h.cross_image_negatives >= 0,
            "hiergroup.num_regions and num_positives must be >= 1, "
            "num_negatives and cross_image_negatives >= 0.")
    require(h.sigma_p > 0, "hiergroup.sigma_p must be > 0 (paper: 0.8).")
    require(h.get("objective", "log_likelihood") in OBJECTIVES,
            f"hiergroup.objective={h.get('objective')!r}; choose one of "
            f"{OBJECTIVES} ('paper': eq. 1's Σ p at T = 1).")
    require(set(h.stages) <= set(config_check.FEATURE_STAGES),
            f"hiergroup.stages={tuple(h.stages)}; use ResNet stages "
            "('stage2', 'stage3' = res3, res4 in the paper).")

  def batch_keys(self) -> tuple[str, ...]:
    return super().batch_keys() + ("hierarchy",)

  def loss_keys(self) -> tuple[str, ...]:
    return super().loss_keys() + ("hierarchy",)

  def network(self):
    return hypercolumn.from_config(self.config)

  def make_forward_loss(self, model, mesh):
    """forward_loss(params, batch_stats, target_params, batch, key) ->
    (loss, (batch_stats, segments_per_view, {})); target_params unused.
    Batch: view1/2 [B, S, S, 3], mask1/2 [B, S, S] leaf ids, hierarchy
    [B, L, L]."""
    del mesh   # the cross-image negatives are gathered by jit
    config = self.config
    grid = grouping_loss.embedding_grid(config)
    hg = config.hiergroup
    objective = hg.get("objective", "log_likelihood")
    # Eq. 1 has no temperature: 'paper' is T = 1 whatever loss.temperature.
    temperature = 1.0 if objective == "paper" else float(
        config.loss.temperature)

    def forward_loss(params, batch_stats, target_params, batch, key):
      del target_params
      if "hierarchy" not in batch:
        raise ValueError("hiergroup needs the region tree distances in the "
                         "batch ('hierarchy'): set masks.method='hierarchy'.")

      def embed(stats, view):
        return model.apply({"params": params, "batch_stats": stats}, view,
                           train=True, method=model.embedding,
                           mutable=["batch_stats"])

      emb1, upd = embed(batch_stats, batch["view1"])
      emb2, upd = embed(upd["batch_stats"], batch["view2"])
      cells1 = objects.downsample_segments(batch["mask1"], grid)
      cells2 = objects.downsample_segments(batch["mask2"], grid)
      loss = grouping_loss.batch_loss(key, emb1, emb2, cells1, cells2,
                                      batch["hierarchy"], hg, temperature,
                                      objective)
      segments = 0.5 * (objects.mean_num_ids(cells1) +
                        objects.mean_num_ids(cells2))
      return loss, (upd["batch_stats"], segments, {})

    return forward_loss
