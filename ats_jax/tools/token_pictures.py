"""Which patches each ATS block kept, as the model records them, drawn with dropped patches greyed
(the paper's teaser figure). Used by `python -m ats_jax.predict --save_tokens` and
`experiments/visualize_tokens.py`."""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from ats_jax.models import enable, vit

DROPPED_GREY = 0.5  # dropped patches are blended towards this grey
DROPPED_ALPHA = 0.75
LABEL_BAND = 16  # pixels above the panels for their labels (PIL's default font: 10 px)


def patch_keep_map(ids: np.ndarray, prefix: int, grid: int) -> np.ndarray:
  """Kept token ids of one image [K] -> a bool [grid, grid] map of the patches kept."""
  keep = np.zeros(grid * grid, bool)
  keep[ids[ids >= prefix] - prefix] = True
  return keep.reshape(grid, grid)


def grey_dropped(image: np.ndarray, keep: np.ndarray, patch: int) -> np.ndarray:
  """RGB [S, S, 3] in [0, 1] with the patches not in `keep` [grid, grid] blended towards grey."""
  keep = np.repeat(np.repeat(keep, patch, 0), patch, 1)[..., None]  # [S, S, 1]
  grey = (1 - DROPPED_ALPHA) * image + DROPPED_ALPHA * DROPPED_GREY
  return np.where(keep, image, grey)


def block_label(block: int, keep: np.ndarray) -> str:
  """A block panel's label: the block's index and its kept patches (`keep`: patch_keep_map's)."""
  return f'block {block}: {int(keep.sum())} kept'


def label_band(text: str, width: int) -> Image.Image:
  """`text` in black on white, LABEL_BAND high and cut at `width`."""
  band = Image.new('RGB', (width, LABEL_BAND), 'white')
  ImageDraw.Draw(band).text((2, 2), text, fill='black', font=ImageFont.load_default())
  return band


def token_strip(
  image: np.ndarray, kept_ids: list[np.ndarray], model: vit.VisionTransformer, gap: int = 4
) -> Image.Image:
  """One picture: the input [S, S, 3] in [0, 1], then per ATS block the same image with its
  dropped patches greyed (`kept_ids`: that image's kept token ids per ATS block), side by side,
  each under its label ('input', 'block 3: 97 kept') in a band above the images."""
  grid, patch = model.img_size // model.spec.patch_size, model.spec.patch_size
  keeps = [patch_keep_map(ids, model.num_prefix_tokens, grid) for ids in kept_ids]
  panels = [image] + [grey_dropped(image, keep, patch) for keep in keeps]
  blocks = enable.ats_blocks(model)
  labels = ['input'] + [block_label(b, keep) for b, keep in zip(blocks, keeps, strict=True)]
  size = image.shape[0]
  strip = np.ones((LABEL_BAND + size, len(panels) * (size + gap) - gap, 3), np.float32)
  for i, panel in enumerate(panels):
    strip[LABEL_BAND:, i * (size + gap) : i * (size + gap) + size] = panel
  picture = Image.fromarray(np.round(strip * 255).astype(np.uint8))
  for i, label in enumerate(labels):
    picture.paste(label_band(label, size), (i * (size + gap), 0))
  return picture
