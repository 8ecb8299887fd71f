"""Backbone export (NumPy npz, torchvision, detectron2, timm) and import.

`python -m odin_jax.export --workdir=DIR` (see __main__.py); the library:
`export(workdir, ...)` in writer.py, the mapping tables and layout
conversions in convert.py, and their inverse, `--config.init_from=PATH`
(torchvision / timm checkpoints, backbone.npz, a workdir), in
weights_in.py.
"""

from odin_jax.export.convert import (DETECTRON2_DEPTHS, detectron2_checkpoint,
                                     detectron2_config, detectron2_name,
                                     flatten, timm_state_dict,
                                     torchvision_state_dict)
from odin_jax.export.weights_in import load_backbone
from odin_jax.export.writer import FORMATS, export

__all__ = ["DETECTRON2_DEPTHS", "FORMATS", "detectron2_checkpoint",
           "detectron2_config", "detectron2_name", "export", "flatten",
           "load_backbone", "timm_state_dict", "torchvision_state_dict"]
