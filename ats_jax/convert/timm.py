"""timm/DeiT state dict <-> Flax parameters, as pure dict -> dict functions.

Names map one-to-one (`weight` -> `kernel` for Linear/Conv, `weight` -> `scale` for LayerNorm); only
layouts change (Linear kernels transposed, conv kernels OIHW -> HWIO). A missing, unexpected or
mis-shaped key is an error that names it: nothing is silently dropped.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np

from ats_jax.errors import CheckpointError
from ats_jax.models import registry

Shapes = Mapping[str, tuple[int, ...]]


def flax_to_timm_key(flax_key: str) -> str:
  """`blocks.0.norm1.scale` -> `blocks.0.norm1.weight`; `head.kernel` -> `head.weight`."""
  prefix, _, leaf = flax_key.rpartition('.')
  if leaf in ('kernel', 'scale'):  # Linear/Conv kernels and LayerNorm scales are timm's `weight`
    return f'{prefix}.weight'
  return flax_key


def _to_flax_layout(leaf: str, value: np.ndarray) -> np.ndarray:
  if leaf == 'kernel' and value.ndim == 4:
    return value.transpose(2, 3, 1, 0)  # conv OIHW -> HWIO
  if leaf == 'kernel':
    return value.T  # Linear (out, in) -> (in, out)
  return value


def _to_torch_shape(leaf: str, shape: tuple[int, ...]) -> tuple[int, ...]:
  if leaf == 'kernel' and len(shape) == 4:
    return (shape[3], shape[2], shape[0], shape[1])
  if leaf == 'kernel':
    return shape[::-1]
  return shape


def timm_to_flax(
  state_dict: Mapping[str, np.ndarray], expected: Shapes, model_name: str
) -> dict[str, np.ndarray]:
  """timm state dict -> flat Flax params with the shapes `expected` (flax key -> shape)."""
  flax_to_timm = {k: flax_to_timm_key(k) for k in expected}
  missing = sorted(t for t in flax_to_timm.values() if t not in state_dict)
  unexpected = sorted(set(state_dict) - set(flax_to_timm.values()))
  if missing or unexpected:
    parts = [f'missing keys: {", ".join(missing)}'] if missing else []
    parts += [f'unexpected keys: {", ".join(unexpected)}'] if unexpected else []
    raise CheckpointError(f'checkpoint does not match {model_name}: {"; ".join(parts)}')
  params = {}
  for flax_key, shape in expected.items():
    leaf = flax_key.rpartition('.')[2]
    value = np.asarray(state_dict[flax_to_timm[flax_key]], dtype=np.float32)
    if value.shape != _to_torch_shape(leaf, shape):
      raise CheckpointError(
        f'{flax_to_timm[flax_key]} has shape {tuple(value.shape)} but {model_name} expects '
        f'{_to_torch_shape(leaf, shape)}'
      )
    params[flax_key] = _to_flax_layout(leaf, value)
  return params


def infer_model_name(
  state_dict: Mapping[str, np.ndarray], family: str | None = None, num_heads: int | None = None
) -> str:
  """The registered variant whose architecture fits the checkpoint's shapes.

  Width, depth, patch and distillation come from the shapes; heads cannot be read from a timm
  state dict, so the registered head count for that width is used unless `num_heads` is known.
  Of equal architectures the one whose image size matches `pos_embed` wins (deit_base_patch16_224
  vs _384). Families whose keys coincide (deit_small_patch16_224 and vit_small_patch16_224: same
  shapes, different preprocessing) are never guessed between: unless `family` says which, that is
  an error asking for --model.
  """
  for key in ('cls_token', 'pos_embed', 'patch_embed.proj.weight'):
    if key not in state_dict:
      raise CheckpointError(f'not a ViT/DeiT state dict: missing key {key}')
  embed_dim = state_dict['cls_token'].shape[-1]
  patch_size = state_dict['patch_embed.proj.weight'].shape[-1]
  depth = len({k.split('.')[1] for k in state_dict if k.startswith('blocks.')})
  distilled = 'dist_token' in state_dict
  grid = _grid_size(state_dict['pos_embed'].shape[1], 2 if distilled else 1)
  candidates = [
    name
    for name, s in registry.MODELS.items()
    if (s.embed_dim, s.depth, s.patch_size, s.distilled)
    == (embed_dim, depth, patch_size, distilled)
    and num_heads in (None, s.num_heads)
    and family in (None, registry.family(name))
  ]
  if not candidates:
    raise CheckpointError(
      f'no registered {family + " " if family else ""}model has embed_dim={embed_dim}, '
      f'depth={depth}, patch_size={patch_size}, distilled={distilled}'
      f'{f", num_heads={num_heads}" if num_heads else ""}; pass --model'
    )
  exact = [n for n in candidates if registry.MODELS[n].img_size == grid * patch_size]
  candidates = exact or candidates
  if len({registry.family(n) for n in candidates}) > 1:
    raise CheckpointError(
      f'the keys and shapes fit {" and ".join(candidates)} alike (same architecture, different '
      'preprocessing); pass --model to say which'
    )
  return candidates[0]


def _grid_size(num_pos_tokens: int, num_prefix_tokens: int) -> int:
  grid = math.isqrt(num_pos_tokens - num_prefix_tokens)
  if grid * grid != num_pos_tokens - num_prefix_tokens:
    raise CheckpointError(f'pos_embed holds {num_pos_tokens} tokens: not a square grid plus prefix')
  return grid


def resize_pos_embed(pos_embed: np.ndarray, new_grid: int, num_prefix_tokens: int) -> np.ndarray:
  """Resizes the patch part of `pos_embed` [1, P + g*g, C] to `new_grid`, keeping prefix tokens.

  Antialiased bicubic, as timm's `resample_abs_pos_embed` (torch `interpolate(..., 'bicubic',
  antialias=True)`), so a 224 checkpoint loaded at 384 gives the numbers timm gives.
  """
  prefix, grid_tokens = pos_embed[:, :num_prefix_tokens], pos_embed[:, num_prefix_tokens:]
  old_grid = _grid_size(pos_embed.shape[1], num_prefix_tokens)
  grid = grid_tokens.reshape(old_grid, old_grid, -1).astype(np.float64)
  weights = _aa_bicubic_weights(old_grid, new_grid)  # [new, old]
  grid = np.einsum('ih,jw,hwc->ijc', weights, weights, grid)
  return np.concatenate(
    [prefix, grid.reshape(1, new_grid * new_grid, -1).astype(pos_embed.dtype)], axis=1
  )


def _aa_bicubic_weights(in_size: int, out_size: int, a: float = -0.5) -> np.ndarray:
  """Interpolation matrix [out, in] of PIL/torch antialiased bicubic (Keys kernel, a = -0.5)."""
  scale = in_size / out_size
  support = 2.0 * max(scale, 1.0)
  inv = 1.0 / max(scale, 1.0)
  weights = np.zeros((out_size, in_size))
  for i in range(out_size):
    center = scale * (i + 0.5)
    lo, hi = max(int(center - support + 0.5), 0), min(int(center + support + 0.5), in_size)
    x = np.abs((np.arange(lo, hi) - center + 0.5) * inv)
    w = np.where(
      x < 1,
      ((a + 2) * x - (a + 3)) * x * x + 1,
      np.where(x < 2, (((x - 5) * x + 8) * x - 4) * a, 0.0),
    )
    weights[i, lo:hi] = w / w.sum()
  return weights
