"""python -m odin_jax.export --workdir=DIR [--format=...] [--step=N] [--out=DIR]

Exports the online network's backbone of a training run's latest (or
--step) checkpoint for use outside odin_jax. Examples:

  python -m odin_jax.export --workdir=/tmp/detcon_demo
  python -m odin_jax.export --workdir=DIR --step=5000 --format=torchvision
  python -m odin_jax.export --workdir=DIR --format=npz,detectron2 --out=/tmp/r50
  python -m odin_jax.export --workdir=DIR --config=configs/detcon_b.py:demo

Files written to --out (default DIR/export/step_<N>):
  backbone.npz             npz: flat '/'-joined Flax names -> arrays
                           ('params/stem_conv/kernel', 'batch_stats/stem_bn/
                           mean', ...); flax.traverse_util.unflatten_dict(
                           dict(np.load(f)), sep='/') gives the variables of
                           odin_jax.models.resnet.ResNet.
  torchvision.safetensors  torchvision: a torchvision ResNet state_dict
  torchvision.pth            (conv1.weight, bn1.*, layer1.0.conv1.weight,
                           ..., layer1.0.downsample.0/1.*, no fc), conv
                           kernels OIHW; the .pth only if torch is
                           importable. model.load_state_dict(
                           safetensors.torch.load_file(f), strict=False)
                           reports fc.weight / fc.bias missing, nothing else.
  detectron2.pkl           detectron2 (R18/34/50/101/152): its pickled
                           checkpoint {'model': {name: array}, '__author__':
                           'odin_jax', 'matching_heuristics': True} with its
                           ResNet names (stem.conv1.*, stem.conv1.norm.*,
                           res2.0.conv1.*, res2.0.shortcut.*, ... res5.*).
  export_info.json         method, step, depth/width, input normalisation,
                           each file's format, key count and sha256, the
                           detectron2 config, warnings.
  README.md                how to load each file.
Default formats: all that apply (npz, torchvision, and detectron2 where it
has the depth).

Only the online backbone (params['backbone'], batch_stats['backbone']) is
written: EMA target, Odin's discovery network, projector / predictor and
FPN are dropped. The config is the one saved in the checkpoint unless
--config is given (a config file with preset, --config.* overrides, as for
python -m odin_jax.evaluate). The input normalisation is not part of the
weights: feed torchvision RGB images in [0, 1] normalised with the ImageNet
mean/std; give detectron2 MODEL.PIXEL_MEAN [123.675, 116.28, 103.53],
MODEL.PIXEL_STD [58.395, 57.12, 57.375], INPUT.FORMAT RGB and
MODEL.RESNETS.STRIDE_IN_1X1 False (the stride is on the 3x3 conv).

The inverse, weights in: --config.init_from=PATH on python -m odin_jax.main
(torchvision / timm checkpoints, backbone.npz, a workdir; weights_in.py).
"""

import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Optional: the run's config file with preset, e.g. "
    "configs/detcon_b.py:demo (default: the config saved in the "
    "checkpoint).", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None,
                               "The training run's workdir (checkpoints/); "
                               "a local path or a URL (gs://...).")
_STEP = flags.DEFINE_integer("step", None,
                             "Checkpoint step (default: the newest readable "
                             "one).")
_FORMAT = flags.DEFINE_list(
    "format", None, "Comma list of npz, torchvision, detectron2 (timm for "
    "ViT/Swin backbones); default: all that apply.")
_OUT = flags.DEFINE_string("out", None, "Output folder (default: "
                           "WORKDIR/export/step_<N>).")
flags.mark_flags_as_required(["workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  # Imported here so --help is fast. Not runtime.setup(), only its log
  # filter: export compiles nothing and never needs TensorFlow, which
  # setup() imports (to hide accelerators from it), ~20 s on a loaded host.
  from odin_jax import runtime
  from odin_jax.export import writer
  runtime._quiet_library_logs()  # pylint: disable=protected-access
  try:
    info = writer.export(_WORKDIR.value, config=_CONFIG.value,
                         step=_STEP.value, formats=_FORMAT.value,
                         out_dir=_OUT.value)
  except (FileNotFoundError, ValueError, NotImplementedError) as e:
    # Bad input (no checkpoint, unknown format or step): the message says
    # what to do; a traceback would only bury it.
    print(f"error: {e}", file=sys.stderr, flush=True)
    sys.exit(1)
  print(f"Exported step {info['step']} to {info['out_dir']}:", flush=True)
  for name, entry in info["files"].items():
    print(f"{name}  {entry['format']}  {entry['keys']} arrays  "
          f"sha256 {entry['sha256']}", flush=True)
  for warning in info["warnings"]:
    print(f"warning: {warning}", flush=True)


if __name__ == "__main__":
  app.run(main)
