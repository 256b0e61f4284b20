"""The last steps of preprocessing, on the device inside the jitted steps.

The input pipeline sends uint8 images (a quarter of float32's bytes over PCIe or the host link)
and, for training, random erasing's boxes; normalisation and the erasing noise run here, where
they cost nothing next to the model. `normalize` is `images.normalize`, the one normaliser.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from ats_jax.data.images import normalize

__all__ = ['erase', 'normalize']


def erase(images: jax.Array, boxes: jax.Array, key: jax.Array) -> jax.Array:
  """timm's RandomErasing 'pixel' mode on normalised images [B, H, W, C]: each box int32 [B, 4]
  (top, left, h, w; h = 0: none) filled with standard-normal noise."""
  _, h, w, _ = images.shape
  top, left, bh, bw = (boxes[:, i, None, None] for i in range(4))  # each [B, 1, 1]
  rows = jnp.arange(h)[None, :, None]  # [1, H, 1]
  cols = jnp.arange(w)[None, None, :]  # [1, 1, W]
  inside = (rows >= top) & (rows < top + bh) & (cols >= left) & (cols < left + bw)  # [B, H, W]
  noise = jax.random.normal(key, images.shape, images.dtype)
  return jnp.where(inside[..., None], noise, images)
