"""Images as timm's transforms see them: PIL decoding, the eval resize and crop, and the one
normalisation (`normalize`) every path uses: the jitted train and eval steps, predict and the
experiments.

No TensorFlow: `python -m ats_jax.predict` and the experiments run on a bare accelerator machine;
the tf.data pipeline (`preprocessing`) calls the same functions inside the graph. The preprocessing
of a checkpoint (`registry.DataConfig`: mean, std, crop_pct, interpolation) comes with its model
(`model.data_config`, set by `create_model`).
"""

from __future__ import annotations

import io
import math
import os

import numpy as np
from PIL import Image, UnidentifiedImageError

from ats_jax.models import registry

CROP_PCT = registry.DEIT_DATA.crop_pct
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


def normalize(
  pixels,
  mean: tuple[float, ...] = registry.IMAGENET_MEAN,
  std: tuple[float, ...] = registry.IMAGENET_STD,
):
  """uint8 [..., 3] (NumPy, or JAX inside a jitted step) -> float32 (x / 255 - mean) / std, mean
  and std of [0, 1] values, as timm's ToTensor then Normalize."""
  x = pixels.astype(np.float32) / np.float32(255.0)
  return (x - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)


def eval_transform(
  photo: np.ndarray, size: int, data: registry.DataConfig = registry.DEIT_DATA
) -> np.ndarray:
  """timm's eval transform under `data`: uint8 [h, w, 3] -> float32 [size, size, 3]: resize the
  short side to size / crop_pct, centre crop, normalise. Default: DeiT's (bicubic, 0.875,
  ImageNet mean/std); a checkpoint's own is `model.data_config`."""
  image = resize_and_crop(Image.fromarray(photo), size, data.crop_pct, data.interpolation)
  return normalize(np.asarray(image), data.mean, data.std)


def denormalize(images: np.ndarray, data: registry.DataConfig = registry.DEIT_DATA) -> np.ndarray:
  """Model inputs back to displayable RGB in [0, 1] (same shape)."""
  return np.clip(
    images * np.asarray(data.std, np.float32) + np.asarray(data.mean, np.float32), 0, 1
  )
