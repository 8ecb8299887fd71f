"""Backbone export: NumPy (npz), torchvision (safetensors/pth), detectron2.

`python -m odin_jax.export --workdir=DIR` (see __main__.py); the library:
`export(workdir, ...)` in writer.py and the name/layout conversions in
convert.py.
"""

from odin_jax.export.convert import (DETECTRON2_DEPTHS, detectron2_checkpoint,
                                     detectron2_config, detectron2_name,
                                     flatten, torchvision_state_dict)
from odin_jax.export.writer import FORMATS, export

__all__ = ["DETECTRON2_DEPTHS", "FORMATS", "detectron2_checkpoint",
           "detectron2_config", "detectron2_name", "export", "flatten",
           "torchvision_state_dict"]
