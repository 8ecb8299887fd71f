"""Hierarchical grouping: region trees, pixel sampling, the loss, the method.

Trees are checked against hand-built hierarchies (known LCA heights) and on
a real photo (ultrametric); sampling frequencies against the paper's
formulas with a chi-square test at a fixed seed (and a wrong distribution
must fail the same test); the loss against a loop-by-loop NumPy version;
records, training and evaluation end to end on the tiny preset.
"""

from __future__ import annotations

import functools
import itertools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats
from skimage import data as skdata
from skimage import transform

from configs import hiergroup as hiergroup_config
from odin_jax import config_check, methods, reporting, step, train
from odin_jax import grouping_loss as hiergroup
from odin_jax.data import hierarchy, pipeline, records, sources
from odin_jax.data.records import precompute
from odin_jax.evaluate import runner


# ------------------------------------------------------------ region trees --
def test_ultrametric_of_hand_built_tree():
  # ((0, 1) @ 0.2, (2, 3) @ 0.5) @ 2.0, then 4 joins @ 4.0 (the root).
  merges = [(0, 1, 0.2), (2, 3, 0.5), (5, 6, 2.0), (4, 7, 4.0)]
  d = hierarchy.ultrametric(5, merges, size=7)
  want = np.array([[0, .2, 2, 2, 4], [.2, 0, 2, 2, 4], [2, 2, 0, .5, 4],
                   [2, 2, .5, 0, 4], [4, 4, 4, 4, 0]]) / 4.0
  np.testing.assert_allclose(d[:5, :5], want, rtol=1e-6)
  assert np.all(d[5:, :] == hierarchy.PAD_DISTANCE)
  assert np.all(d[:, 5:][:5] == hierarchy.PAD_DISTANCE)
  np.testing.assert_allclose(
      hierarchy.ultrametric(5, merges, normalize=False)[0, 2], 2.0)
  with pytest.raises(ValueError, match="non-decreasing"):
    hierarchy.ultrametric(3, [(0, 1, 0.5), (2, 3, 0.4)])


def test_agglomerate_merges_weakest_mean_boundary_first():
  # A chain 0 - 1 - 2 - 3 with mean boundaries 0.1, 0.9, 0.3, plus 4 hanging
  # off 3 (0.6) and a second, weak boundary 1 - 2 of length 3 (mean 0.2):
  # 1|2 as a whole has mean (0.9 + 3 * 0.2) / 4 = 0.375.
  pairs = [(0, 1), (1, 2), (2, 3), (3, 4)]
  sums = [0.1, 0.9 + 0.6, 0.3, 0.6]
  counts = [1, 4, 1, 1]
  leaf_of, merges = hierarchy.agglomerate(5, pairs, sums, counts,
                                          max_leaves=5)
  np.testing.assert_array_equal(leaf_of, np.arange(5))
  # {0,1} @ 0.1 (cluster 5); {2,3} @ 0.3 (6); {01, 23} share only the 1|2
  # boundary @ 0.375 (7); {23} - {4} is 0.6, merged last: {0123, 4} @ 0.6.
  np.testing.assert_allclose(merges, [[0, 1, 0.1], [2, 3, 0.3],
                                      [5, 6, 0.375], [4, 7, 0.6]])
  d = hierarchy.ultrametric(5, merges, normalize=False)
  assert d[0, 1] == pytest.approx(0.1) and d[1, 3] == pytest.approx(0.375)
  assert d[4, 0] == pytest.approx(0.6)
  # max_leaves=3: the first two merges are silent, the leaves are {0,1},
  # {2,3}, {4}; their tree keeps the later heights.
  leaf_of, merges = hierarchy.agglomerate(5, pairs, sums, counts,
                                          max_leaves=3)
  np.testing.assert_array_equal(leaf_of, [0, 0, 1, 1, 2])
  np.testing.assert_allclose(merges, [[0, 1, 0.375], [2, 3, 0.6]])
  # min_area: region 4 (area 1) must merge before any pair of large ones,
  # although its boundary (0.6) is the strongest.
  leaf_of, _ = hierarchy.agglomerate(5, pairs, sums, counts, max_leaves=5,
                                     areas=[9, 9, 9, 9, 1], min_area=5)
  np.testing.assert_array_equal(leaf_of, [0, 1, 2, 3, 3])


def _check_tree(tree, shape, max_leaves):
  n = tree.num_leaves
  assert tree.leaves.shape == shape and tree.leaves.dtype == np.int32
  assert 1 <= n <= max_leaves
  np.testing.assert_array_equal(np.unique(tree.leaves), np.arange(n))
  d = tree.distances
  assert d.shape == (max_leaves, max_leaves) and d.dtype == np.float32
  dl = d[:n, :n]
  np.testing.assert_array_equal(dl, dl.T)
  assert np.all(np.diag(dl) == 0) and dl.min() >= 0 and dl.max() == 1.0
  # Ultrametric: d(a, c) <= max(d(a, b), d(b, c)) for every triple.
  assert np.all(dl[:, None, :] <= np.maximum(dl[:, :, None],
                                             dl[None, :, :]) + 1e-6)
  assert np.all(d[n:] == hierarchy.PAD_DISTANCE)


def test_hierarchy_of_a_photo_is_a_valid_ultrametric():
  image = (transform.resize(skdata.astronaut(), (128, 128), anti_aliasing=True)
           * 255).astype(np.uint8)
  tree = hierarchy.region_hierarchy(image)
  _check_tree(tree, (128, 128), 40)
  assert tree.num_leaves == 40          # a busy photo fills every leaf
  # No leaf is a speck (min_leaf_area = 0.5 % of the image).
  assert np.bincount(tree.leaves.ravel()).min() >= 0.005 * 128 * 128
  again = hierarchy.region_hierarchy(image)
  np.testing.assert_array_equal(again.leaves, tree.leaves)
  np.testing.assert_array_equal(again.distances, tree.distances)


def test_two_colour_image_splits_at_the_root():
  rng = np.random.default_rng(0)
  image = np.zeros((64, 96, 3), np.uint8)
  image[:, :48] = (200, 40, 40)
  image[:, 48:] = (30, 60, 200)
  image = np.clip(image + rng.normal(0, 4, image.shape), 0, 255).astype(
      np.uint8)
  tree = hierarchy.region_hierarchy(image, max_leaves=8, num_superpixels=48)
  _check_tree(tree, (64, 96), 8)
  left = np.unique(tree.leaves[:, :40])
  right = np.unique(tree.leaves[:, 56:])
  assert not set(left) & set(right)
  d = tree.distances
  # Across the colour edge = the root; within a side, lower.
  assert np.all(d[np.ix_(left, right)] == 1.0)
  assert d[np.ix_(left, left)].max() < 1.0 and d[np.ix_(right, right)].max() < 1


# ----------------------------------------------------------------- sampling --
L_PAD, SIGMA = 8, 0.8
# A fixed tree over 6 leaves (padded to 8): ((0,1),(2,(3,4))),5.
_D6 = hierarchy.ultrametric(
    6, [(0, 1, 0.1), (3, 4, 0.2), (2, 7, 0.4), (6, 8, 0.7), (5, 9, 1.0)],
    size=L_PAD)


def _cells(visible, h=6, w=6):
  """[h, w] cells covering the `visible` ids in stripes of columns."""
  cols = np.array_split(np.arange(w), len(visible))
  cells = np.zeros((h, w), np.int32)
  for r, c in zip(visible, cols):
    cells[:, c] = r
  return cells


def _exact(a, visible, positive: bool):
  """The paper's P(R_b | R_a) over the visible leaves (eq. 2 / eq. 3)."""
  d = _D6[a, visible].astype(np.float64)
  w = np.exp(-d / SIGMA) if positive else np.exp(d / SIGMA)
  self_ = np.asarray(visible) == a
  w = np.where(self_, 1.0 if positive else 0.0, w)
  return w / w.sum()


@functools.lru_cache(maxsize=1)
def _references(batch=256):
  """Region draws for `batch` copies of one image (view 2 misses leaf 1)."""
  cells1 = np.broadcast_to(_cells([0, 1, 2, 3, 4, 5]), (batch, 6, 6))
  cells2 = np.broadcast_to(_cells([0, 2, 3, 4, 5]), (batch, 6, 6))
  dist = np.broadcast_to(_D6, (batch, L_PAD, L_PAD))
  fn = jax.jit(functools.partial(hiergroup.sample_references, num_regions=7,
                                 num_positives=10, num_negatives=5,
                                 sigma=SIGMA))
  out = fn(jax.random.PRNGKey(0), jnp.asarray(cells1), jnp.asarray(cells2),
           jnp.asarray(dist))
  return {k: np.asarray(v) for k, v in out.items()}, np.asarray(cells1), \
      np.asarray(cells2)


def _chi2_pvalue(draws, probs, support):
  counts = np.array([(draws == r).sum() for r in support])
  assert counts.sum() == draws.size      # nothing outside the support
  return stats.chisquare(counts, probs * counts.sum()).pvalue


@pytest.mark.parametrize("view,visible", [(0, [0, 1, 2, 3, 4, 5]),
                                          (1, [0, 2, 3, 4, 5])])
def test_region_frequencies_follow_the_formulas(view, visible):
  ref, _, _ = _references()
  anchors = ref["anchor_regions"][:, 0]                  # [B, A]
  for a in (0, 2, 5):
    rows = anchors == a                                  # a: in both views
    pos = ref["pos_regions"][:, view][rows]              # [n, P]
    neg = ref["neg_regions"][:, view][rows]
    assert pos.size > 1500 and np.all(ref["pos_valid"][:, view][rows])
    others = [r for r in visible if r != a]              # never the anchor
    p_pos = _exact(a, visible, positive=True)
    p_neg = _exact(a, others, positive=False)
    assert _chi2_pvalue(pos, p_pos, visible) > 1e-3
    assert _chi2_pvalue(neg, p_neg, others) > 1e-3
    if len(set(_D6[a, others])) == 1:
      continue                   # leaf 5: every rule is uniform over others
    # The same test rejects a wrong distribution: the complement rule
    # (1 - P_pos) for negatives, or uniform positives.
    wrong = 1 - _exact(a, others, positive=True)
    assert _chi2_pvalue(neg, wrong / wrong.sum(), others) < 1e-6
    uniform = np.full(len(visible), 1 / len(visible))
    assert _chi2_pvalue(pos, uniform, visible) < 1e-6


def test_anchor_and_pixel_sampling():
  ref, cells1, cells2 = _references()
  # Anchors: only leaves visible in both views, uniformly.
  anchors = ref["anchor_regions"]
  np.testing.assert_array_equal(anchors[:, 0], anchors[:, 1])
  assert np.all(ref["anchor_valid"])
  assert _chi2_pvalue(anchors[:, 0], np.full(5, 0.2), [0, 2, 3, 4, 5]) > 1e-3
  # One Gumbel noise for both views: a positive drawn in view 1 that is
  # visible in view 2 (not leaf 1) is drawn there too.
  p1, p2 = ref["pos_regions"][:, 0], ref["pos_regions"][:, 1]
  np.testing.assert_array_equal(p1[p1 != 1], p2[p1 != 1])
  # Every sampled cell lies in its region, uniformly over the region's cells.
  flat = [cells1.reshape(len(cells1), -1), cells2.reshape(len(cells2), -1)]
  for v in (0, 1):
    for kind in ("anchor", "pos", "neg"):
      cells = ref[f"{kind}_cells"][:, v].reshape(len(cells1), -1)
      regions = ref[f"{kind}_regions"][:, v].reshape(len(cells1), -1)
      np.testing.assert_array_equal(
          np.take_along_axis(flat[v], cells, axis=1), regions)
  in_0 = ref["pos_cells"][:, 0][ref["pos_regions"][:, 0] == 0]
  support = np.flatnonzero(cells1[0].ravel() == 0)
  assert _chi2_pvalue(in_0, np.full(len(support), 1 / len(support)),
                      support) > 1e-3


def test_cross_image_negatives_come_from_other_images():
  b, hw, num = 5, 9, 4
  # Image i's embedding is e_i everywhere: a negative's image is readable.
  emb = jnp.broadcast_to(jnp.eye(b)[:, None, :], (b, hw, b))
  neg = np.asarray(jax.jit(functools.partial(
      hiergroup.cross_image_negatives, num_anchors=7, num=num))(
          jax.random.PRNGKey(3), emb, emb))
  assert neg.shape == (b, 7, num, b)
  source = neg.argmax(-1)
  assert np.all(source != np.arange(b)[:, None, None])
  assert len(np.unique(source)) == b
  empty = hiergroup.cross_image_negatives(jax.random.PRNGKey(3), emb[:1],
                                          emb[:1], num_anchors=7, num=num)
  assert empty.shape == (1, 7, 0, b)


# --------------------------------------------------------------------- loss --
def _numpy_loss(anchors, pos, neg, a_ok, p_ok, n_ok, t):
  unit = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)  # noqa: E731
  total, count = 0.0, 0
  b, v, a, _ = anchors.shape
  for i, j, k in itertools.product(range(b), range(v), range(a)):
    if not a_ok[i, j, k] or not p_ok[i, k].any():
      continue
    x = unit(anchors[i, j, k])
    negs = [np.exp(x @ unit(n) / t) for n, ok in zip(neg[i, k], n_ok[i, k])
            if ok]
    terms = []
    for m, ok in zip(pos[i, k], p_ok[i, k]):
      if ok:
        e = np.exp(x @ unit(m) / t)
        terms.append(-np.log(e / (e + sum(negs))))
    total += np.mean(terms)
    count += 1
  return total / count


def _random_pixel_inputs(seed, b, v, a, p, n, d):
  """Random anchors [b, v, a, d], positives [b, a, p, d], negatives
  [b, a, n, d] and their validity masks; anchor (0, 0) has no negative."""
  rng = np.random.default_rng(seed)
  anchors = rng.normal(size=(b, v, a, d))
  pos = rng.normal(size=(b, a, p, d))
  neg = rng.normal(size=(b, a, n, d))
  a_ok = rng.random((b, v, a)) < 0.8
  p_ok = rng.random((b, a, p)) < 0.7
  n_ok = rng.random((b, a, n)) < 0.7
  n_ok[0, 0] = False
  return anchors, pos, neg, a_ok, p_ok, n_ok


def test_loss_matches_numpy():
  anchors, pos, neg, a_ok, p_ok, n_ok = _random_pixel_inputs(
      0, b=3, v=2, a=4, p=5, n=6, d=8)
  p_ok[1, 1] = False                       # an anchor without positives
  loss = jax.jit(hiergroup.pixel_contrastive_loss)
  for t in (0.1, 1.0):
    got = loss(*(jnp.asarray(x, jnp.float32) for x in (anchors, pos, neg)),
               a_ok, p_ok, n_ok, temperature=t)
    np.testing.assert_allclose(got, _numpy_loss(anchors, pos, neg, a_ok,
                                                p_ok, n_ok, t), rtol=2e-5)


def _numpy_eq1(anchors, pos, neg, a_ok, p_ok, n_ok):
  """Eq. 1 verbatim (T = 1): Σ over valid anchors i and positives m of
  e^{cos_im} / (e^{cos_im} + Σ_n e^{cos_in}), and the number of terms."""
  unit = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)  # noqa: E731
  total, count = 0.0, 0
  b, v, a, _ = anchors.shape
  for i, j, k in itertools.product(range(b), range(v), range(a)):
    if not a_ok[i, j, k]:
      continue
    x = unit(anchors[i, j, k])
    negs = sum(np.exp(x @ unit(n)) for n, ok in zip(neg[i, k], n_ok[i, k])
               if ok)
    for m, ok in zip(pos[i, k], p_ok[i, k]):
      if ok:
        e = np.exp(x @ unit(m))
        total += e / (e + negs)
        count += 1
  return total, count


def test_paper_objective_is_eq1():
  """objective='paper' = -(eq. 1's Σ p at T = 1) / its number of terms,
  against a loop; it is not the log-likelihood."""
  # Anchor (0, 0) has no negative: its p is 1.
  anchors, pos, neg, a_ok, p_ok, n_ok = _random_pixel_inputs(
      1, b=2, v=2, a=3, p=4, n=5, d=6)
  args = [jnp.asarray(x, jnp.float32) for x in (anchors, pos, neg)]
  got = jax.jit(functools.partial(hiergroup.pixel_contrastive_loss,
                                  temperature=1.0, objective="paper"))(
                                      *args, a_ok, p_ok, n_ok)
  total, count = _numpy_eq1(anchors, pos, neg, a_ok, p_ok, n_ok)
  np.testing.assert_allclose(got, -total / count, rtol=1e-5)
  log_lik = hiergroup.pixel_contrastive_loss(*args, a_ok, p_ok, n_ok,
                                             temperature=1.0)
  assert abs(float(log_lik) - float(got)) > 0.1
  with pytest.raises(ValueError, match="objective"):
    hiergroup.pixel_contrastive_loss(*args, a_ok, p_ok, n_ok,
                                     objective="sum")


def test_paper_objective_config_uses_t1():
  """hiergroup.objective='paper' validates, ignores loss.temperature (eq. 1
  has T = 1) and equals batch_loss at T = 1; a bad name is refused."""
  config = hiergroup_config.get_config("test")
  config.hiergroup.objective = "paper"
  config_check.validate(config)
  model = methods.get(config).network()
  bsz, size = 2, 80
  rng = np.random.default_rng(0)
  views = jnp.asarray(rng.random((2, bsz, size, size, 3)), jnp.float32)
  leaves = np.kron(_cells([0, 1, 2, 3, 4, 5], 8, 8),
                   np.ones((size // 8, size // 8), np.int32))
  batch = {"view1": views[0], "view2": views[1],
           "mask1": jnp.asarray(np.broadcast_to(leaves, (bsz, size, size))),
           "mask2": jnp.asarray(np.broadcast_to(leaves, (bsz, size, size))),
           "hierarchy": jnp.asarray(np.broadcast_to(_D6, (bsz, L_PAD,
                                                          L_PAD)))}
  variables = model.init(jax.random.PRNGKey(0), views[0], train=False)
  key = jax.random.PRNGKey(4)

  def value(objective, temperature):
    config.hiergroup.objective = objective
    config.loss.temperature = temperature
    fn = methods.get(config).make_forward_loss(model, None)
    return float(fn(variables["params"], variables["batch_stats"], None,
                    batch, key)[0])

  paper = value("paper", 0.1)
  assert value("paper", 0.5) == paper
  assert -1.0 <= paper < 0.0
  assert value("log_likelihood", 1.0) != pytest.approx(
      value("log_likelihood", 0.1))
  config.hiergroup.objective = "sum"
  with pytest.raises(config_check.ConfigError, match="hiergroup.objective"):
    config_check.validate(config)


def test_loss_trains_free_embeddings():
  """Gradient descent on free per-cell embeddings lowers the sampled loss
  and orders similarities by tree distance."""
  cfg = hiergroup_config.get_config("test").hiergroup
  b, h, w = 4, 6, 6
  labels = _cells([0, 1, 2, 3, 4, 5])
  cells = jnp.asarray(np.broadcast_to(labels, (b, h, w)))
  dist = jnp.asarray(np.broadcast_to(_D6, (b, L_PAD, L_PAD)))
  emb = jax.random.normal(jax.random.PRNGKey(0), (2, b, h, w, 8))

  def loss(e, key):
    return hiergroup.batch_loss(key, e[0], e[1], cells, cells, dist, cfg,
                                temperature=0.1)

  grad = jax.jit(jax.value_and_grad(loss))
  losses = []
  for i in range(100):
    value, g = grad(emb, jax.random.PRNGKey(i))
    emb = emb - 10.0 * g
    losses.append(float(value))
  assert np.all(np.isfinite(losses))
  assert np.mean(losses[-10:]) < 0.6 * np.mean(losses[:10])
  e = np.asarray(emb[0, 0]).reshape(h * w, -1)
  e = e / np.linalg.norm(e, axis=1, keepdims=True)
  cos = e @ e.T
  lab = labels.ravel()
  mean = lambda a, c: cos[np.ix_(lab == a, lab == c)].mean()  # noqa: E731
  same = np.mean([mean(r, r) for r in range(6)])
  near = np.mean([mean(0, 1), mean(3, 4)])        # d_T 0.1, 0.2
  far = np.mean([mean(r, 5) for r in range(5)])   # d_T 1 (the root)
  assert same > near > far + 0.1


# ------------------------------------------------------- schedule, network --
@pytest.mark.parametrize("preset", [None, "coco", "imagenet", "demo", "test"])
def test_presets_validate(preset):
  config = hiergroup_config.get_config(preset)
  config_check.validate(config)
  assert config.method == "hiergroup" and config.masks.method == "hierarchy"
  bad = hiergroup_config.get_config("test")
  bad.ema.enabled = True
  with pytest.raises(config_check.ConfigError, match="ema.enabled"):
    config_check.validate(bad)


def test_piecewise_schedule_and_adam():
  config = hiergroup_config.get_config()
  lr = step.learning_rate_schedule(config, total_steps=800, warmup_steps=0)
  got = [float(lr(s)) for s in (0, 249, 250, 449, 450, 600, 799)]
  want = [1e-2, 1e-2, 1e-3, 1e-3, 1e-4, 1e-5, 1e-5]
  np.testing.assert_allclose(got, want, rtol=1e-5)
  assert config.batch_size == 70 and config.num_epochs == 80
  assert not config.ema.enabled and config.hiergroup.sigma_p == 0.8
  tx = step.make_optimizer(config, lr)
  params = {"w": jnp.ones((3, 3))}
  updates, _ = tx.update({"w": jnp.full((3, 3), 5.0)}, tx.init(params), params)
  np.testing.assert_allclose(updates["w"], -1e-2, rtol=1e-4)   # Adam step 1


def test_network_shapes_and_eval_feature():
  config = hiergroup_config.get_config("test")
  model = methods.get(config).network()
  images = jnp.zeros((2, 80, 80, 3))
  # Shapes only (eval_shape): nothing is computed.
  variables = jax.eval_shape(
      lambda x: model.init(jax.random.PRNGKey(0), x, train=False), images)
  maps = jax.eval_shape(lambda v, x: model.apply(
      v, x, train=False, method=model.feature_maps), variables, images)
  assert maps["embedding"].shape == (2, 20, 20, 32)    # stride 4 of 80 px
  assert maps["stage2"].shape[1] == 10 and maps["stage3"].shape[1] == 5
  assert "backbone" in variables["params"] and "projector" not in \
      variables["params"]
  assert runner.default_feature(config) == "embedding"


# ---------------------------------------------------- records, end to end --
def test_records_carry_leaves_and_distances(tmp_path):
  from PIL import Image  # pylint: disable=g-import-not-at-top
  folder = tmp_path / "images"
  folder.mkdir()
  photos = [skdata.astronaut()[::4, ::4], skdata.coffee()[::4, ::4]]
  for i, photo in enumerate(photos):
    Image.fromarray(photo).save(folder / f"{i}.png")
  setting = "hierarchy:max_leaves=12,superpixels=100"
  meta = precompute.run(precompute.Options(
      source=f"folder:{folder}", output_dir=str(tmp_path / "rec"),
      masks=(setting,), num_workers=1, log_every_s=1e9))
  assert meta["num_examples"] == 2
  source = records.RecordSource(str(tmp_path / "rec"), setting)
  cfg = records.parse_mask_setting(setting)
  for i in range(2):
    ex = source.lookup(np.int64(i))
    tree = hierarchy.hierarchy_from_config(ex["image"].numpy(), cfg)
    np.testing.assert_array_equal(ex["segments"].numpy(), tree.leaves)
    np.testing.assert_array_equal(ex["hierarchy"].numpy(), tree.distances)
    assert ex["hierarchy"].shape == (12, 12)
  with pytest.raises(ValueError, match="precompute"):
    sources.make_source(hiergroup_config.get_config("coco"))


def test_test_preset_trains_and_evaluates(tmp_path):
  config = hiergroup_config.get_config("test")
  config.total_steps = 3
  config.log_every_steps = 1
  config.checkpoint_every_steps = 3
  batch = next(pipeline.make_train_dataset(
      config, sources.make_source(config),
      global_batch_size=config.batch_size).as_numpy_iterator())
  assert batch["hierarchy"].shape == (8, 40, 40)
  # Mask ids are leaves of the image's tree: below its leaf count (the
  # zeros on the diagonal; padded rows have PAD_DISTANCE there).
  num_leaves = (np.diagonal(batch["hierarchy"], axis1=1, axis2=2) == 0).sum(1)
  assert np.all(batch["mask1"].max(axis=(1, 2)) < num_leaves)
  assert np.all(batch["mask2"].max(axis=(1, 2)) < num_leaves)
  state = train.train_and_evaluate(config, str(tmp_path))
  assert int(state.step) == 3
  losses = [r["train/loss"] for r in reporting.read_metrics(str(tmp_path))]
  # Sane: finite, and near the loss of unrelated embeddings, log(1 + N)
  # with N = 2 x 5 + 5 negatives of equal weight (cosines ~ 0 at init).
  assert np.all(np.isfinite(losses)) and len(losses) == 3
  assert 0.3 * np.log(16) < losses[0] < 3 * np.log(16)
  metrics = runner.evaluate(config, str(tmp_path),
                            which=("discovery", "linear_probe"),
                            log_table=False)
  assert 0 <= metrics["discovery/abo_instance"] <= 1
  assert 0 <= metrics["linear_probe/miou"] <= 1
  with open(runner.results_path(str(tmp_path), "step_3")) as f:
    info = json.load(f)["info"]
  # 'auto' = the 32-d embedding at stride 4 (256 px eval images -> 64x64).
  assert info["discovery/feature"] == "embedding"
  assert info["discovery/grid"] == [64, 64]
