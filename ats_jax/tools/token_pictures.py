"""Which patches each ATS block kept, traced through the model and drawn with dropped patches greyed
(the paper's teaser figure). Used by `python -m ats_jax.predict --save_tokens` and
`experiments/visualize_tokens.py`."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from PIL import Image

from ats_jax.models import vit

DROPPED_GREY = 0.5  # dropped patches are blended towards this grey
DROPPED_ALPHA = 0.75


@nnx.jit
def trace_tokens(model: vit.VisionTransformer, images: jax.Array) -> dict:
  """Runs the model block by block, following each slot's original token.

  Returns 'kept_ids': per ATS block the original token index of each output slot [B, K] (-1 for
  padding; index - num_prefix_tokens is the patch, row-major), 'logits' of this block-by-block run,
  and the model's own 'model_logits' and 'model_kept_tokens' [B, depth] to check the trace with.
  """
  model_logits, stats = model(images, return_stats=True)
  x = model.embed(images.astype(model.dtype))  # [B, N0, C]
  ids = jnp.broadcast_to(jnp.arange(x.shape[1]), x.shape[:2])  # [B, N0]
  mask, kept_ids = None, []
  for block in model.blocks:
    x, mask, rows = block(x, mask, return_rows=True)  # rows: the input slot of each output slot
    if block.sampling is not None:
      ids = jnp.where(mask > 0, jnp.take_along_axis(ids, rows, axis=1), -1)  # [B, K]
      kept_ids.append(ids)
  return {
    'kept_ids': kept_ids,
    'logits': model.head_logits(x),
    'model_logits': model_logits,
    'model_kept_tokens': stats['kept_tokens'],
  }


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


def token_strip(
  image: np.ndarray, kept_ids: list[np.ndarray], model: vit.VisionTransformer, gap: int = 4
) -> Image.Image:
  """One picture: the input [S, S, 3] in [0, 1], then per ATS block the same image with its
  dropped patches greyed (`kept_ids`: that image's kept token ids per ATS block), side by side."""
  grid, patch = model.img_size // model.spec.patch_size, model.spec.patch_size
  panels = [image] + [
    grey_dropped(image, patch_keep_map(ids, model.num_prefix_tokens, grid), patch)
    for ids in kept_ids
  ]
  size = image.shape[0]
  strip = np.ones((size, len(panels) * (size + gap) - gap, 3), np.float32)
  for i, panel in enumerate(panels):
    strip[:, i * (size + gap) : i * (size + gap) + size] = panel
  return Image.fromarray(np.round(strip * 255).astype(np.uint8))
