"""One input -> one record: image normalisation and mask computation.

`process_example` is a pure function of the input's bytes and an
`ExampleSpec` (input bytes -> record bytes or a skip reason); the precompute
runs it in worker processes (precompute.py) and on Apache Beam
(data/beam_precompute.py). Bad inputs are converted or skipped and counted
(`normalize_image` says how); one example never stops a run. Nothing here
imports TensorFlow.
"""

from __future__ import annotations

import dataclasses
import functools
import io

from absl import logging
import numpy as np

from odin_jax import numerics
from odin_jax.data import hierarchy as hierarchy_lib
from odin_jax.data import masks as masks_lib
from odin_jax.data.records import format as fmt
from odin_jax.data.records import settings
from odin_jax.data.records import writer


@dataclasses.dataclass(frozen=True)
class RawExample:
  """One input as read from its source (before any decoding)."""
  id: str                          # stable id: relative path / TFDS id
  data: bytes | None               # the encoded image file
  label: int = -1
  gt: np.ndarray | None = None     # int [H, W] instance ids (0 = background)
  error: str | None = None         # why data could not be read


@dataclasses.dataclass(frozen=True)
class ExampleSpec:
  """Everything process_example's output depends on besides the input."""
  mask_settings: tuple[str, ...]   # canonical settings.mask_setting_string()s
  min_side: int = 32               # skip images whose shorter side is smaller
  max_side: int = 0                # >0: downscale longer sides above this
  jpeg_quality: int = 95           # for converted images only
  skip_one_segment: bool = False   # else kept (a global mask) and counted


class _Skip(Exception):
  """Raised with the reason an input is skipped (process_example)."""


# ----------------------------------------------------- the per-example part --
def _to_uint8(array: np.ndarray, mode: str) -> np.ndarray:
  """High-bit-depth or float [H, W] pixels -> uint8 (full range kept)."""
  a = np.nan_to_num(array.astype(np.float64))
  lo, hi = float(a.min()), float(a.max())
  if mode.startswith("I;16") or (mode == "I" and lo >= 0 and 255 < hi < 65536):
    a = a / 257.0
  elif not (lo >= 0 and hi <= 255) or mode == "F":
    a = (a - lo) * (255.0 / max(hi - lo, 1e-12))
  return np.clip(np.round(a), 0, 255).astype(np.uint8)


def decode_pixels(im, data: bytes = b"") -> tuple[np.ndarray, list[str]]:
  """A loaded PIL image -> (uint8 [H, W] or [H, W, 3] pixels, notes).

  Grayscale stays one channel; CMYK and other colour modes -> RGB; alpha ->
  composited on black; 16-bit / float -> 8 bit over the full range;
  palette -> RGB; animations -> their first frame (the frame PIL loaded).
  data: the file's bytes, when known (a 16-bit PNG is noted from its
  header). FolderSource decodes the files TensorFlow cannot with this too.
  """
  mode, notes = im.mode, []
  if getattr(im, "n_frames", 1) > 1:
    notes.append("multi_frame")
  if mode.startswith("I;16") or (im.format == "PNG" and data[24:25] == b"\x10"):
    notes.append("high_bit_depth")          # byte 24 = PNG IHDR bit depth
  gray = mode in ("1", "L", "LA", "La", "I", "F") or mode.startswith("I;16")
  if gray:
    notes.append("grayscale")
  if mode in ("I", "F") or mode.startswith("I;16"):
    pixels = _to_uint8(np.asarray(im), mode)
  elif "A" in mode or "a" in mode or "transparency" in im.info:
    notes.append("alpha")
    rgba = np.asarray(im.convert("LA" if gray else "RGBA")).astype(np.uint32)
    alpha = rgba[..., -1:]
    pixels = ((rgba[..., :-1] * alpha + 127) // 255).astype(np.uint8)
    pixels = pixels[..., 0] if gray else pixels
  elif mode in ("1", "L"):
    pixels = np.asarray(im.convert("L"))
  elif mode == "RGB":
    pixels = np.asarray(im)
  else:                                     # P, CMYK, YCbCr, LAB, HSV, ...
    notes.append({"P": "palette", "CMYK": "cmyk"}.get(mode, f"mode_{mode}"))
    pixels = np.asarray(im.convert("RGB"))
  return pixels, notes


def as_rgb(pixels: np.ndarray) -> np.ndarray:
  """uint8 [H, W] or [H, W, C >= 3] -> contiguous uint8 [H, W, 3]."""
  if pixels.ndim == 2:
    pixels = np.repeat(pixels[..., None], 3, axis=-1)
  return np.ascontiguousarray(pixels[..., :3])


def normalize_image(data: bytes, spec: ExampleSpec):
  """Image file -> (stored JPEG bytes, uint8 [H, W, 3], notes, (H0, W0)).

  A plain 8-bit RGB or grayscale JPEG is stored as is. Everything else is
  converted once to a JPEG (grayscale stays one channel; `decode_pixels`
  says how). The returned pixels are the decoded *stored* JPEG, so masks
  are computed on what training reads. Raises _Skip('corrupt' | 'too_large'
  | 'too_small').
  """
  from PIL import Image  # pylint: disable=g-import-not-at-top
  try:
    im = Image.open(io.BytesIO(data))
    kind = (im.format or "unknown").lower()
    im.load()                       # decodes fully: truncation raises here
  except Image.DecompressionBombError:
    raise _Skip("too_large") from None
  except Exception:  # pylint: disable=broad-except
    raise _Skip("corrupt") from None
  # MPO: a camera JPEG with extra frames; decoders read its first one.
  keep = kind in ("jpeg", "mpo") and im.mode in ("RGB", "L")
  pixels, notes = decode_pixels(im, data)
  original_hw = pixels.shape[:2]
  if min(original_hw) < spec.min_side:
    raise _Skip("too_small")
  if spec.max_side and max(original_hw) > spec.max_side:
    f = spec.max_side / max(original_hw)
    size = (max(1, round(original_hw[1] * f)),
            max(1, round(original_hw[0] * f)))
    pixels = np.asarray(Image.fromarray(pixels).resize(size, Image.BICUBIC))
    notes.append("resized")
    keep = False
  if keep:
    stored = data
  else:
    notes.append(f"converted_{kind}")
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "JPEG", quality=spec.jpeg_quality,
                                 subsampling=0)   # 4:4:4, no timestamps
    stored = buf.getvalue()
    with Image.open(io.BytesIO(stored)) as decoded:
      pixels = np.array(decoded)
  return stored, as_rgb(pixels), notes, original_hw


@functools.lru_cache(maxsize=16)
def _mask_configs(texts: tuple[str, ...]):
  return tuple(settings.parse_mask_setting(t) for t in texts)


def _gt_segments(gt, original_hw, hw) -> np.ndarray:
  gt = np.asarray(gt)
  if gt.shape[:2] != tuple(original_hw):
    raise _Skip("gt_shape_mismatch")
  if tuple(hw) != tuple(original_hw):       # image was resized: nearest
    gt = numerics.resize_nearest(gt, hw, centre=False)
  return masks_lib.relabel_sequential(gt)


def process_example(raw: RawExample,
                    spec: ExampleSpec) -> writer.ExampleResult:
  """One input -> its record, or a skip reason. Pure; never raises.

  Skip reasons: the read error, 'corrupt', 'too_large', 'too_small',
  'one_segment:<key>' (FH/SLIC gave one segment, with spec.skip_one_segment;
  else kept and noted), 'too_many_segments:<key>'
  (> 65536, would not fit 16 bits), 'mask_error:<key>', 'no_gt',
  'gt_shape_mismatch', 'error:<ExceptionType>'.
  """
  try:
    if raw.error or raw.data is None:
      raise _Skip(raw.error or "unreadable")
    stored, rgb, notes, original_hw = normalize_image(raw.data, spec)
    h, w = rgb.shape[:2]
    features = {"id": raw.id, "image": stored, "height": h, "width": w,
                "label": int(raw.label)}
    counts, sizes = [], []
    for cfg in _mask_configs(spec.mask_settings):
      key = masks_lib.mask_config_key(cfg)
      if cfg.method == "gt":
        if raw.gt is None:
          raise _Skip("no_gt")
        seg = _gt_segments(raw.gt, original_hw, (h, w))
      else:
        try:
          if cfg.method == "hierarchy":   # leaf ids + the tree's distances
            tree = hierarchy_lib.hierarchy_from_config(rgb, cfg)
            seg = tree.leaves
            features[fmt.HIERARCHY_PREFIX + key] = (
                fmt.encode_distances(tree.distances))
          else:
            seg = masks_lib.compute_segments(rgb, cfg)
        except Exception:  # pylint: disable=broad-except
          raise _Skip(f"mask_error:{key}") from None
      n = int(seg.max()) + 1
      if n > fmt.MAX_SEGMENTS:
        raise _Skip(f"too_many_segments:{key}")
      if n == 1 and cfg.method in ("fh", "fh_opencv", "slic"):
        if spec.skip_one_segment:
          raise _Skip(f"one_segment:{key}")
        notes.append(f"one_segment:{key}")
      png = fmt.encode_mask_png(seg)
      features[fmt.MASK_PREFIX + key] = png
      counts.append((key, n))
      sizes.append((key, len(png)))
    return writer.ExampleResult(raw.id, fmt.encode_example(features), None,
                         tuple(notes), tuple(counts), len(stored), tuple(sizes))
  except _Skip as skip:
    return writer.ExampleResult(raw.id, skip_reason=str(skip))
  except Exception as e:  # pylint: disable=broad-except
    logging.warning("precompute: %s failed: %s: %s", raw.id,
                    type(e).__name__, e)
    return writer.ExampleResult(raw.id,
                                skip_reason=f"error:{type(e).__name__}")
