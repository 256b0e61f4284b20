"""Images as timm's transforms see them: PIL decoding and DeiT's eval resize and crop, exactly.

No TensorFlow: `python -m ats_jax.predict` and the experiments run on a bare accelerator machine;
the tf.data pipeline (`preprocessing`) calls the same functions inside the graph.
"""

from __future__ import annotations

import io
import math
import os

import numpy as np
from PIL import Image, UnidentifiedImageError

from ats_jax.models.registry import IMAGENET_MEAN, IMAGENET_STD

CROP_PCT = 0.875
INTERPOLATIONS = {  # timm's str_to_pil_interp
  'nearest': Image.Resampling.NEAREST,
  'bilinear': Image.Resampling.BILINEAR,
  'bicubic': Image.Resampling.BICUBIC,
  'box': Image.Resampling.BOX,
  'hamming': Image.Resampling.HAMMING,
  'lanczos': Image.Resampling.LANCZOS,
}


def open_image(source: str | os.PathLike | bytes) -> Image.Image:
  """A file, or its bytes, opened lazily by PIL (the header read, nothing decoded yet); a
  ValueError names what PIL cannot identify."""
  try:
    return Image.open(io.BytesIO(source) if isinstance(source, bytes) else source)
  except UnidentifiedImageError:
    what = 'the file' if isinstance(source, bytes) else os.fspath(source)
    raise ValueError(f'unknown image format: PIL cannot identify {what}') from None


def load_rgb(source: str | os.PathLike | bytes) -> Image.Image:
  """An image file (or its bytes) as timm loads it, `Image.open(f).convert('RGB')` (greyscale,
  palette, CMYK, alpha converted)."""
  try:
    with open_image(source) as image:
      return image.convert('RGB')
  except OSError as e:  # truncated or broken data; bytes: the caller names the file
    raise ValueError(str(e) if isinstance(source, bytes) else f'{os.fspath(source)}: {e}') from None


def read_image(source: str | os.PathLike | bytes) -> np.ndarray:
  """`load_rgb` as uint8 [h, w, 3]."""
  return np.asarray(load_rgb(source))


def resize_and_crop(
  image: Image.Image, size: int, crop_pct: float = CROP_PCT, interpolation: str = 'bicubic'
) -> Image.Image:
  """timm's eval transform up to ToTensor: torchvision's Resize(int) of the shorter side to
  floor(size / crop_pct) (256 for 224 at 0.875), then CenterCrop(size)."""
  short = math.floor(size / crop_pct)
  w, h = image.size
  # torchvision: shorter side to `short`, longer int(short * long / short side)
  new = (short, short * h // w) if w <= h else (short * w // h, short)
  image = image.resize(new, INTERPOLATIONS[interpolation])
  # torchvision's CenterCrop: int(round((new - size) / 2)), Python rounding half to even
  left, top = (int(round((n - size) / 2)) for n in new)
  return image.crop((left, top, left + size, top + size))


def eval_transform(photo: np.ndarray, size: int, crop_pct: float = CROP_PCT) -> np.ndarray:
  """DeiT's eval transform as timm runs it: uint8 [h, w, 3] -> float32 [size, size, 3]: bicubic
  resize of the short side to size / crop_pct, centre crop, ImageNet mean/std."""
  image = np.asarray(resize_and_crop(Image.fromarray(photo), size, crop_pct), np.float32) / 255
  return (image - np.asarray(IMAGENET_MEAN, np.float32)) / np.asarray(IMAGENET_STD, np.float32)


def denormalize(images: np.ndarray) -> np.ndarray:
  """Model inputs back to displayable RGB in [0, 1] (same shape)."""
  return np.clip(
    images * np.asarray(IMAGENET_STD, np.float32) + np.asarray(IMAGENET_MEAN, np.float32), 0, 1
  )
