"""FLOPs of a ViT at the token counts it actually runs, counting a multiply-add once (fvcore).

Counted: the patch embedding, per block the qkv projection, q k^T, S v, the output projection and
the MLP, and the head(s). Not counted (as fvcore): norms, softmax, GELU, residual adds. In a block
whose attention returns fewer query rows than it has keys (an ATS block), q k^T runs over all `keys`
tokens, while S v, the projection and the MLP run over the `queries` it keeps.
"""

from __future__ import annotations

import jax.numpy as jnp

from ats_jax.models.registry import ViTSpec


def block_flops(keys, queries, dim: int, mlp_ratio: float):
  """One block with `keys` tokens in and `queries` tokens out (scalars or arrays)."""
  hidden = int(dim * mlp_ratio)
  return (
    3 * dim * dim * keys  # qkv
    + dim * keys * keys  # q k^T
    + dim * queries * keys  # S v
    + dim * dim * queries  # proj
    + 2 * dim * hidden * queries
  )  # fc1 + fc2


def embed_and_head_flops(spec: ViTSpec, num_classes: int | None = None) -> int:
  num_patches = (spec.img_size // spec.patch_size) ** 2
  heads = 2 if spec.distilled else 1
  classes = spec.num_classes if num_classes is None else num_classes
  return num_patches * 3 * spec.patch_size**2 * spec.embed_dim + heads * spec.embed_dim * classes


def dense_gflops(spec: ViTSpec, num_classes: int | None = None) -> float:
  """GFLOPs per image of the dense model (DeiT-T/S/B at 224: 1.3 / 4.6 / 17.6)."""
  n = (spec.img_size // spec.patch_size) ** 2 + (2 if spec.distilled else 1)
  per_block = block_flops(n, n, spec.embed_dim, spec.mlp_ratio)
  return (embed_and_head_flops(spec, num_classes) + spec.depth * per_block) / 1e9


def gflops(spec: ViTSpec, keys: jnp.ndarray, queries: jnp.ndarray) -> jnp.ndarray:
  """GFLOPs per image from per-block token counts `keys`, `queries` of shape [..., depth]."""
  keys, queries = jnp.asarray(keys, jnp.float32), jnp.asarray(queries, jnp.float32)
  blocks = block_flops(keys, queries, spec.embed_dim, spec.mlp_ratio).sum(-1)
  return (embed_and_head_flops(spec) + blocks) / 1e9
