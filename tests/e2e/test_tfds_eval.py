"""COCO val2017 panoptic and DAVIS 2017 evaluation on real-format TFDS data.

Nothing is downloaded: small raw datasets are written here in the layout of
the real archives (COCO: val2017/*.jpg, annotations/panoptic_val2017.json,
panoptic_val2017/*.png with segment id = R + 256 G + 65536 B; DAVIS:
ImageSets/2017/val.txt, JPEGImages/480p/<video>/*.jpg, palette PNGs in
Annotations/480p/<video>/) and turned into TFDS datasets by the REAL
registered builders `coco` and `davis` (their name, config, version, _info
and _generate_examples), subclassed with skip_registration only to point
`_split_generators` at those local files instead of downloading. The
evaluation then opens them by name through `tfds.builder` / `tfds.load`,
i.e. the real builder classes, exactly as it would a `tfds build` output.

Pixels: demo scenes (textured shapes over photos, exact instance / class
maps) for COCO and `clips.make_clip` clips for DAVIS.
"""

from __future__ import annotations

import json
import math
import os

from etils import epath
import numpy as np
from PIL import Image
import pytest
from skimage import transform
import tensorflow as tf
import tensorflow_datasets as tfds

from configs import detcon_b
from odin_jax.data import demo
from odin_jax.evaluate import clips as clips_lib
from odin_jax.evaluate import context
from odin_jax.evaluate import datasets
from odin_jax.evaluate import features as features_lib
from odin_jax.evaluate import settings as settings_lib
from odin_jax.evaluate import video
from odin_jax.evaluate import video_metrics
from tests import helpers
from tests.helpers import central_square, run_eval_cli

COCO, DAVIS = "coco/2017_panoptic", "davis/480p"
# eval.image_size: COCO's native central crop (120 px) is resized straight
# to it and scored there (Odin App. A.4: ~480 -> 1024; here 120 -> 128).
COCO_SIZE = 128
# (height, width) of the four COCO images: landscape and portrait.
COCO_SHAPES = ((120, 160), (160, 120), (120, 160), (160, 120))
# Demo class (1..5) -> COCO panoptic thing label (0..79).
THING_LABEL = {1: 0, 2: 17, 3: 41, 4: 62, 5: 79}
# The panoptic categories in the order of the real panoptic_val2017.json
# (80 things, then 53 stuff): TFDS label = position in this list. Real
# category ids / names are not needed by the evaluation; these stand in.
CATEGORIES = ([{"id": i + 1, "name": f"thing{i:02d}", "isthing": 1,
                "supercategory": "thing"} for i in range(80)]
              + [{"id": 101 + j, "name": f"stuff{j:02d}", "isthing": 0,
                  "supercategory": "stuff"} for j in range(53)])
DAVIS_HW = (96, 128)
DAVIS_FRAMES = 5
# video name -> (make_clip seed, objects, max speed px/frame).
CLIPS = {"still-shapes": (11, 2, 0.0), "moving-shapes": (12, 3, 10.0)}


class _LocalFiles(helpers.OfflineCodePath):
  """Mixin for a real registered builder that reads raw files from raw_dir
  instead of downloading them (no checksums: see helpers.OfflineCodePath)."""
  raw_dir = None


class _OfflineCoco(_LocalFiles, tfds.builder_cls("coco"),
                   skip_registration=True):
  """The real `coco` builder reading local files."""
  name = "coco"

  def _split_generators(self, dl_manager):
    del dl_manager
    root = epath.Path(self.raw_dir)
    return [tfds.core.SplitGenerator(
        name=tfds.Split.VALIDATION,
        gen_kwargs=dict(image_dir=root, annotation_dir=root,
                        split_name="val2017", annotation_type="panoptic",
                        panoptic_dir=root / "panoptic_val2017"))]


class _OfflineDavis(_LocalFiles, tfds.builder_cls("davis"),
                    skip_registration=True):
  """The real `davis` builder reading local files."""
  name = "davis"

  def _split_generators(self, dl_manager):
    del dl_manager
    val = epath.Path(self.raw_dir) / "DAVIS" / "ImageSets" / "2017" / "val.txt"
    return {tfds.Split.VALIDATION: self._generate_examples(val)}


# --- Raw COCO panoptic ---------------------------------------------------


def _coco_raw(root: str) -> dict:
  """Writes the raw COCO panoptic val2017 files; returns the ground truth.

  Each image is a demo scene cut to a non-square size. Its visible shapes
  are thing segments (label THING_LABEL[class]); the last one is a crowd
  region; background pixels of the bottom third are a stuff segment (label
  >= 80); the remaining background is unlabelled (id 0). Segment ids of an
  image share their R byte, so a decoding that ignored G / B would merge
  them. Returns {file name: (image uint8 [H, W, 3], instances int32 [H, W]
  without crowd / stuff, 1..G; classes int32 [H, W] = 1 + thing label)}.
  """
  scenes = demo.generate_demo(num_scenes=len(COCO_SHAPES), image_size=160,
                              seed=5)
  rng = np.random.default_rng(0)
  for sub in ("val2017", "annotations", "panoptic_val2017"):
    os.makedirs(os.path.join(root, sub), exist_ok=True)
  images, annotations, truth = [], [], {}
  for i, (h, w) in enumerate(COCO_SHAPES):
    top, left = (160 - h) // 2, (160 - w) // 2
    image = scenes.images[i, top:top + h, left:left + w]
    inst = scenes.instances[i, top:top + h, left:left + w]
    cls = scenes.classes[i, top:top + h, left:left + w]
    present = [j for j in np.unique(inst) if j > 0]
    assert len(present) >= 3, "need two things and a crowd region"
    red = int(rng.integers(1, 256))
    seg_ids = red + 256 * rng.choice(np.arange(1, 65536), len(present) + 1,
                                     replace=False)
    ids = np.zeros((h, w), np.int64)
    segments, expected_inst = [], np.zeros((h, w), np.int32)
    expected_cls = np.zeros((h, w), np.int32)
    for k, j in enumerate(present):
      mask = inst == j
      label = THING_LABEL[int(cls[mask][0])]
      crowd = k == len(present) - 1
      ids[mask] = seg_ids[k]
      segments.append((int(seg_ids[k]), label, crowd, mask))
      if not crowd:
        expected_inst[mask] = k + 1
        expected_cls[mask] = label + 1
    stuff = (inst == 0) & (np.arange(h)[:, None] >= 2 * h // 3)
    ids[stuff] = seg_ids[-1]
    segments.append((int(seg_ids[-1]), 80 + 7 * i, False, stuff))
    name = f"{i + 1:012d}"
    Image.fromarray(image).save(os.path.join(root, "val2017", name + ".jpg"),
                                quality=95)
    pan = np.stack([ids % 256, ids // 256 % 256, ids // 65536], -1)
    Image.fromarray(pan.astype(np.uint8)).save(
        os.path.join(root, "panoptic_val2017", name + ".png"))
    images.append({"id": i + 1, "file_name": name + ".jpg", "height": h,
                   "width": w})
    info = []
    for seg_id, label, crowd, mask in segments:
      ys, xs = np.nonzero(mask)
      info.append({"id": seg_id, "category_id": CATEGORIES[label]["id"],
                   "iscrowd": int(crowd), "area": int(mask.sum()),
                   "bbox": [int(xs.min()), int(ys.min()),
                            int(xs.max() - xs.min() + 1),
                            int(ys.max() - ys.min() + 1)]})
    annotations.append({"image_id": i + 1, "file_name": name + ".png",
                        "segments_info": info})
    truth[name + ".jpg"] = (image, expected_inst, expected_cls)
  with open(os.path.join(root, "annotations", "panoptic_val2017.json"), "w",
            encoding="utf-8") as f:
    json.dump({"images": images, "annotations": annotations,
               "categories": CATEGORIES}, f)
  return truth


# --- Raw DAVIS 2017 ------------------------------------------------------


def _davis_clip(name: str) -> clips_lib.Clip:
  seed, objects, speed = CLIPS[name]
  clip = clips_lib.make_clip(seed=seed, num_frames=DAVIS_FRAMES, image_size=128,
                         num_objects=objects, object_size=(0.35, 0.5),
                         max_speed=speed)
  top = (128 - DAVIS_HW[0]) // 2   # cut to 96x128, like DAVIS's 480x854
  return clips_lib.Clip(clip.frames[:, top:top + DAVIS_HW[0]],
                    clip.masks[:, top:top + DAVIS_HW[0]], clip.velocities)


def _davis_raw(root: str) -> dict:
  """Writes DAVIS-2017-trainval-480p's layout; returns {video: Clip} (the
  frames as decoded back from the JPEG files by TF)."""
  base = os.path.join(root, "DAVIS")
  os.makedirs(os.path.join(base, "ImageSets", "2017"))
  palette = np.zeros((256, 3), np.uint8)       # DAVIS's indexed PNGs
  palette[1:4] = [[128, 0, 0], [0, 128, 0], [128, 128, 0]]
  clips = {}
  for name in CLIPS:
    clip = _davis_clip(name)
    for sub in ("JPEGImages", "Annotations"):
      os.makedirs(os.path.join(base, sub, "480p", name))
    written = []
    for t in range(DAVIS_FRAMES):
      path = os.path.join(base, "JPEGImages", "480p", name, f"{t:05d}.jpg")
      Image.fromarray(clip.frames[t]).save(path, quality=95)
      with open(path, "rb") as f:   # decoded as TFDS does (libjpeg, fast)
        written.append(tf.io.decode_jpeg(f.read()).numpy())
      mask = Image.fromarray(clip.masks[t].astype(np.uint8), mode="P")
      mask.putpalette(palette.ravel().tolist())
      mask.save(os.path.join(base, "Annotations", "480p", name,
                             f"{t:05d}.png"))
    # The frames as stored (the JPEGs decoded by TF) with the exact masks.
    clips[name] = clips_lib.Clip(np.stack(written), clip.masks, clip.velocities)
  with open(os.path.join(base, "ImageSets", "2017", "val.txt"), "w",
            encoding="utf-8") as f:
    f.write("\n".join(CLIPS) + "\n")
  return clips


@pytest.fixture(scope="module")
def tfds_dir(tmp_path_factory):
  """A TFDS data_dir with coco/2017_panoptic and davis/480p 'validation'.

  Returns (data_dir, COCO truth, DAVIS clips).
  """
  data_dir = str(tmp_path_factory.mktemp("tfds"))
  raw = tmp_path_factory.mktemp("raw")
  truth = _coco_raw(str(raw / "coco"))
  clips = _davis_raw(str(raw / "davis"))
  for cls, config_name, sub in ((_OfflineCoco, "2017_panoptic", "coco"),
                                (_OfflineDavis, "480p", "davis")):
    builder = cls(config=config_name, data_dir=data_dir)
    builder.raw_dir = str(raw / sub)
    helpers.prepare_offline(builder)
  return data_dir, truth, clips


def _settings(data_dir, **overrides) -> settings_lib.EvalSettings:
  return settings_lib.settings_from_config(
      detcon_b.get_config("test"), tfds_discovery=COCO, tfds_video=DAVIS,
      tfds_data_dir=data_dir, image_size=COCO_SIZE, **overrides)


def test_real_builders_read_the_datasets(tfds_dir):
  data_dir, truth, clips = tfds_dir
  for name in (COCO, DAVIS):
    assert datasets.tfds_prepared(name, data_dir) == (True, "")
    builder = tfds.builder(name, data_dir=data_dir)
    # The registered class (not the offline subclass) opens them.
    assert type(builder) is tfds.builder_cls(name.split("/")[0])
    assert builder.info.splits["validation"].num_examples == (
        len(truth) if name == COCO else len(clips))
  coco = tfds.builder(COCO, data_dir=data_dir)
  assert str(coco.version) == "1.1.0"
  assert coco.info.features["panoptic_objects"]["label"].num_classes == 133
  assert str(tfds.builder(DAVIS, data_dir=data_dir).version) == "2.1.0"


def test_coco_ground_truth_decoding(tfds_dir):
  """The runner's COCO scenes = the masks written (crowd / stuff dropped),
  their native central square crop resized straight to eval.image_size
  by nearest sampling: the ground truth scored is at the network's input
  size, not at a smaller crop upsampled (Odin App. A.4)."""
  data_dir, truth, _ = tfds_dir
  settings = _settings(data_dir, tfds_num_images=len(truth))
  scenes = datasets.coco_scenes(settings)
  assert scenes is not None, "no thing instance decoded"
  names = [ex["image/filename"].decode() for ex in datasets.tfds_examples(
      COCO, "validation", data_dir, len(truth))]
  assert sorted(names) == sorted(truth)
  assert scenes.images.shape == (len(truth), COCO_SIZE, COCO_SIZE, 3)
  for i, name in enumerate(names):
    image, inst, cls = truth[name]
    want_inst = central_square(inst, COCO_SIZE)
    got_inst = scenes.instances[i]
    # Same partition into instances (numbering may differ), same classes.
    pairs = np.unique(np.stack([want_inst.ravel(), got_inst.ravel()]), axis=1)
    assert len(np.unique(pairs[0])) == len(np.unique(pairs[1])) == \
        pairs.shape[1], name
    assert ((pairs[0] == 0) == (pairs[1] == 0)).all(), name
    assert len(np.unique(want_inst)) >= 3   # background + >= 2 things
    np.testing.assert_array_equal(scenes.classes[i],
                                  central_square(cls, COCO_SIZE))
    # Pixels: the image's central square, resized (up to JPEG error).
    side = min(image.shape[:2])
    top, left = (image.shape[0] - side) // 2, (image.shape[1] - side) // 2
    want = transform.resize(image[top:top + side, left:left + side],
                            (COCO_SIZE, COCO_SIZE), anti_aliasing=True,
                            preserve_range=True)
    assert np.abs(scenes.images[i] - want).mean() < 4, name


def test_davis_propagation_still_vs_moving(tfds_dir):
  """The runner's DAVIS path, clip by clip: its J / F equal label
  propagation scored against the masks written here (so the segmentations
  are decoded as the object ids 0..N of frame 0), and the still clip scores
  far above the moving one."""
  data_dir, _, clips = tfds_dir
  config = detcon_b.get_config("test")
  params, batch_stats = features_lib.init_params(config)
  features = features_lib.FeatureSource(config, params, batch_stats,
                                        feature="stage2",
                                        batch_size=DAVIS_FRAMES)
  examples = list(datasets.tfds_examples(DAVIS, "validation", data_dir,
                                         len(clips)))
  order = [ex["metadata"]["video_name"].decode() for ex in examples]
  assert sorted(order) == sorted(CLIPS)
  expected = {}
  for name, ex in zip(order, examples):
    clip = clips[name]
    frames = ex["video"]["frames"]
    segs = ex["video"]["segmentations"]
    assert frames.shape == (DAVIS_FRAMES, *DAVIS_HW, 3)
    assert segs.shape == (DAVIS_FRAMES, *DAVIS_HW, 1)
    np.testing.assert_array_equal(segs[..., 0], clip.masks)
    np.testing.assert_array_equal(frames, clip.frames)
    pred = video.propagate_video(features(frames, image_size=None),
                                 clip.masks[0])
    expected[name] = video_metrics.evaluate_video(pred, clip.masks)
    assert len(expected[name]["J"]) == CLIPS[name][1]
  # The runner on the first video, then on both (means over objects).
  outs = [video.davis_scores(context.Context(
      config, _settings(data_dir, tfds_num_videos=n), features))
          for n in (1, 2)]
  counts = [CLIPS[order[0]][1], sum(c[1] for c in CLIPS.values())]
  assert [o.info["davis/num_objects"] for o in outs] == counts
  for key in ("J", "F"):
    first = np.mean(expected[order[0]][key])
    both = np.mean(np.concatenate([expected[n][key] for n in order]))
    assert outs[0].metrics[f"davis/{key}_mean"] == pytest.approx(first,
                                                                 abs=1e-9)
    assert outs[1].metrics[f"davis/{key}_mean"] == pytest.approx(both,
                                                                 abs=1e-9)
  still, moving = expected["still-shapes"], expected["moving-shapes"]
  assert still["J_mean"] > moving["J_mean"] + 0.2
  assert still["JF_mean"] > moving["JF_mean"] + 0.15


@pytest.mark.slow
def test_cli_on_coco_and_davis(tfds_dir, tmp_path):
  data_dir, truth, clips = tfds_dir
  sets = {"tfds_discovery": COCO, "tfds_video": DAVIS,
          "tfds_data_dir": data_dir, "tfds_num_images": len(truth),
          # The default 30 videos: more than this DAVIS holds (all are read).
          "image_size": COCO_SIZE,
          "spectral_ks": "2,3", "mask_baselines": "grid",
          "video_frames": 4}
  proc, record = run_eval_cli(tmp_path, "discovery,instances,video", sets)
  assert "not prepared" not in proc.stderr
  metrics, info = record["metrics"], record["info"]
  for name in ("coco/discovery/abo_instance", "coco/discovery/abo_class",
               "coco/discovery/or_instance", "coco/instances/recall_all",
               "davis/J_mean", "davis/F_mean", "davis/JF_mean",
               "discovery/abo_instance", "video/JF_mean"):
    assert name in metrics, (name, sorted(metrics))
    value = metrics[name]
    assert value is not None and math.isfinite(value) and 0 <= value <= 1, \
        (name, value)
  assert info["coco/discovery/num_images"] == len(truth)
  assert info["coco/image_size"] == COCO_SIZE
  assert info["coco/instances/feature"] == "stage4"   # eval.feature
  assert 0 <= metrics["coco/instances/ar_all"] <= \
      metrics["coco/instances/recall_all"]
  # Every non-crowd thing left in the crops is scored (count_k: instances
  # in images with k instances of their class).
  things = sum(len(np.unique(central_square(inst, COCO_SIZE))) - 1
               for _, inst, _ in truth.values())
  assert sum(v for k, v in info.items()
             if k.startswith("coco/instances/count_")) == things
  assert info["davis/num_objects"] == sum(c[1] for c in CLIPS.values())
  assert "coco/discovery/abo_instance" in proc.stdout   # the printed table


def test_more_examples_asked_than_the_split_holds(tfds_dir):
  """tfds_num_images / tfds_num_videos past the split's end read all of it
  (TFDS rejects the slice '[:count]' there)."""
  data_dir, truth, _ = tfds_dir
  settings = _settings(data_dir, tfds_num_images=len(truth) + 6)
  assert len(datasets.coco_scenes(settings).images) == len(truth)
