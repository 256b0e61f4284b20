"""Image files to model inputs, as DeiT's eval transform prepares them (PIL, exactly as timm).

No TensorFlow: `python -m ats_jax.predict` and the experiments run on a bare accelerator machine.
"""

from __future__ import annotations

import os

import numpy as np
from PIL import Image, UnidentifiedImageError

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)  # ImageNet's, as DeiT
CROP_PCT = 0.875


def read_image(path: str | os.PathLike) -> np.ndarray:
  """An image file decoded by PIL as uint8 RGB [h, w, 3] (greyscale, palette, alpha converted)."""
  try:
    with Image.open(path) as image:
      return np.asarray(image.convert('RGB'))
  except (UnidentifiedImageError, OSError) as e:
    raise ValueError(f'{path} is not an image PIL can decode ({e})') from None


def eval_transform(photo: np.ndarray, size: int, crop_pct: float = CROP_PCT) -> np.ndarray:
  """DeiT's eval transform as timm runs it: uint8 [h, w, 3] -> float32 [size, size, 3]: bicubic
  resize of the short side to size / crop_pct, centre crop, ImageNet mean/std."""
  image = Image.fromarray(photo)
  short = int(size / crop_pct)
  w, h = image.size
  new = (short, int(short * h / w)) if w <= h else (int(short * w / h), short)
  image = image.resize(new, Image.BICUBIC)
  left, top = int(round((new[0] - size) / 2)), int(round((new[1] - size) / 2))
  image = np.asarray(image.crop((left, top, left + size, top + size)), np.float32) / 255
  return (image - np.asarray(MEAN, np.float32)) / np.asarray(STD, np.float32)


def denormalize(images: np.ndarray) -> np.ndarray:
  """Model inputs back to displayable RGB in [0, 1] (same shape)."""
  return np.clip(images * np.asarray(STD, np.float32) + np.asarray(MEAN, np.float32), 0, 1)
